"""``fluxredux upscale``: a final made on a server from one output of a draft, followed
and downloaded as ``run`` does it (run.py's code: this module only says what to create)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fluxredux.cli.app import app, setup_logging
from fluxredux.cli.options import DEFAULT_SERVER, KeyOption, OutputDirOption, ServerOption, VerboseOption
from fluxredux.cli.run import create_and_download, final_stem, server_base, server_errors
from fluxredux.client.core import Scale, UpscaleOptions
from fluxredux.errors import InvalidInput
from fluxredux.schema import PredictionInput, UpscaleSource, field_errors

# Each input the command sets, by the option (or argument) that gives it: a bad value's
# message names what the user typed, as the model's own message says what is wrong.
_GIVEN_BY = {
    "upscale_from.prediction": "ID",
    "upscale_from.index": "--index",
    "scale": "--scale",
    "upscale_strength": "--strength",
    "seed": "--seed",
}


def _described(model: type[PredictionInput] | type[UpscaleSource], field: str) -> str:
    """The help of an option: the input model's own description of the field it sets
    (without the "With upscale_from:" that every upscale goes without saying here)."""
    described = (model.model_fields[field].description or "").removeprefix("With upscale_from: ")
    return described[:1].upper() + described[1:]


@app.command()
def upscale(
    prediction_id: Annotated[
        str, typer.Argument(help="The draft: one of your own finished predictions (its id).")
    ],
    index: Annotated[int, typer.Option("--index", help=_described(UpscaleSource, "index"))] = 0,
    scale: Annotated[
        int,
        typer.Option("--scale", metavar="<2|4>", help="The final's sides are this many times the draft's."),
    ] = 2,
    strength: Annotated[
        float | None,
        typer.Option(
            "--strength",
            help=_described(PredictionInput, "upscale_strength") + " Default: the server's (0.35).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed of the refinement. Default: the draft's.")
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    key: KeyOption = None,
    output_dir: OutputDirOption = Path("."),
    verbose: VerboseOption = False,
) -> None:
    """Make a final from a draft: output --index of prediction ID, resized to --scale times
    its sides and refined there under the draft's own references, prompt and seed. Then,
    as `run` does, wait for it and download its images."""
    started = time.monotonic()
    setup_logging(verbose)
    with server_errors(server):
        base, key = server_base(server, key)
        checked = check_upscale(prediction_id, index, scale, strength, seed)
        final_scale: Scale = 4 if checked.scale == 4 else 2  # checked: 2, 4 or not given
        options = _options(checked)
        create_and_download(
            base,
            key,
            lambda client: client.upscale(prediction_id, index, final_scale, **options),
            started=started,
            uploads=False,
            output_dir=output_dir,
            stem=final_stem(prediction_id, index, final_scale),
        )


def check_upscale(
    prediction_id: str, index: int, scale: int, strength: float | None, seed: int | None
) -> PredictionInput:
    """The command's values checked by the input model itself, before anything is sent:
    the server's messages, each naming the option that gave the value."""
    given: dict[str, object] = {"upscale_from": {"prediction": prediction_id, "index": index}, "scale": scale}
    if strength is not None:
        given["upscale_strength"] = strength
    if seed is not None:
        given["seed"] = seed
    try:
        return PredictionInput.model_validate(given)
    except ValidationError as exc:
        messages = [f"{_GIVEN_BY.get(e.field, e.field)}: {e.message}" for e in field_errors(exc)]
        raise InvalidInput("; ".join(messages)) from None


def _options(checked: PredictionInput) -> UpscaleOptions:
    """What the final sets beyond its draft: only what was given (the server's defaults,
    and the draft's seed, for the rest)."""
    options: UpscaleOptions = {}
    if "upscale_strength" in checked.model_fields_set:
        options["upscale_strength"] = checked.upscale_strength
    if checked.seed is not None:
        options["seed"] = checked.seed
    return options

"""``fluxredux download``: fetch the real weights into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated

import typer

from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.options import VerboseOption
from fluxredux.errors import FluxReduxError
from fluxredux.pipeline.weights import (
    LICENSE_NOTE,
    REDUX,
    SCHNELL,
    TEXT_ENCODERS,
    TEXT_ENCODERS_SIZE,
    download_weights,
)


@app.command()
def download(
    schnell: Annotated[str, typer.Option(help="FLUX.1 [schnell] repo id.")] = SCHNELL.default_repo,
    redux: Annotated[str, typer.Option(help="FLUX.1 Redux repo id (gated).")] = REDUX.default_repo,
    with_text_encoders: Annotated[
        bool,
        typer.Option(
            "--with-text-encoders",
            help=f"Also fetch FLUX.1 [schnell]'s text encoders and tokenizers (T5-XXL + CLIP-L, "
            f"{TEXT_ENCODERS_SIZE} more), which only the optional `prompt` input needs.",
        ),
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or hf login)."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Download FLUX.1 [schnell] and the Redux prior (diffusers files only, ~24 GB).

    The text encoders are left out unless --with-text-encoders asks for them."""
    setup_logging(verbose)
    err.print(LICENSE_NOTE, highlight=False)
    # The gated one first: fail fast.
    wanted = [(REDUX, redux), (SCHNELL, schnell)]
    if with_text_encoders:
        wanted.append((TEXT_ENCODERS, schnell))
    try:
        for spec, repo in wanted:
            err.print(f"downloading {spec.title} from {repo} ...", highlight=False)
            path = download_weights(spec, repo, token=token)
            out.print(f"{spec.title}: {path}", highlight=False)
    except FluxReduxError as exc:
        raise fail(exc) from None

"""``fluxredux predict``: one prediction in this process, files written locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.download import PROMPT_STEM, output_file_name
from fluxredux.cli.input_flags import check_reference_choice, parse_flags, validate_flags, with_input_flags
from fluxredux.cli.options import (
    LoraFlags,
    ModelFlags,
    VerboseOption,
    require_model_packages,
    settings_from,
    with_bundles,
)
from fluxredux.config import Settings
from fluxredux.errors import FluxReduxError, ImageError, InvalidInput
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult


@app.command()
@with_input_flags
@with_bundles
def predict(
    image: Annotated[
        Path | None,
        typer.Argument(
            help="Reference image file (JPEG, PNG, WEBP or GIF); or several, with --redux-images; "
            "or none, for a --prompt alone."
        ),
    ] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where to write the images.")] = Path(
        "."
    ),
    model: ModelFlags = ModelFlags(),
    adapter_flags: LoraFlags = LoraFlags(),
    verbose: VerboseOption = False,
    *,
    inputs: dict[str, Any],
) -> None:
    """Generate variations of IMAGE (or of --redux-images mixed; or an image of a --prompt
    alone) in this process and write them to --output-dir."""
    settings = settings_from(model, adapter_flags)
    require_model_packages(settings)
    setup_logging(verbose)
    try:
        parsed = parse_flags(inputs)
        if "upscale_from" in parsed:
            # The drafts are a server's predictions: this process has none to start from.
            raise InvalidInput(
                "--upscale-from needs the server that made the draft: fluxredux upscale ID --server URL"
            )
        check_reference_choice(image is not None, parsed)
        prediction_input = validate_flags(parsed, image_given=image is not None)
        paths = (
            [image] if image is not None else [Path(item["image"]) for item in parsed.get("redux_images", [])]
        )
        references = [_read_image(path, settings)[1] for path in paths]
        result = _run(prediction_input, references, settings)
    except FluxReduxError as exc:
        raise fail(exc) from None
    # A prompt alone has no reference to name its images after.
    _report(result, paths[0].stem if paths else PROMPT_STEM, output_dir)


def _read_image(path: Path, settings: Settings) -> tuple[bytes, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError("image_unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    return data, decode_image(data, limits)


def _run(inputs: PredictionInput, references: list[Any], settings: Settings) -> PredictionResult:
    # Imported here: torch and diffusers take seconds to import, and `--help` should not.
    from fluxredux.loras.catalog import LoraCatalog
    from fluxredux.loras.fetch import AdapterFiles
    from fluxredux.worker.factories import build_checker, build_model
    from fluxredux.worker.predictor import Predictor

    with err.status("loading the model..."):
        image_model = build_model(settings)
        checker = None if inputs.disable_safety_checker else build_checker(settings)
    if image_model.info.is_demo:
        err.print(f"[bold yellow]{image_model.info.notice}[/]")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("denoising", total=inputs.num_inference_steps)
        adapters = AdapterFiles(LoraCatalog.from_settings(settings))  # --loras: --lora-dir's files
        result = Predictor(image_model, checker, adapters=adapters).predict(
            inputs,
            references,
            on_step=lambda done, total: progress.update(task, completed=done, total=total),
        )
    return result


def _report(result: PredictionResult, stem: str, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for output in result.outputs:
        path = output_dir / output_file_name(stem, result.seed, output.index, output.extension)
        path.write_bytes(output.data)
        out.print(f"{path}  {output.width}x{output.height}  {len(output.data):,} bytes", highlight=False)
    dropped = [i for i, verdict in enumerate(result.safety) if verdict.unsafe]
    if dropped:
        err.print(f"safety checker removed {len(dropped)} image(s): {dropped}")
    timings = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items())
    err.print(f"time: {timings}", highlight=False)
    if result.sequence:
        err.print(f"sequence: {result.sequence}", highlight=False)
    if result.notice:
        out.print(f"[bold yellow]{result.notice}[/]")
    out.print(f"seed: {result.seed}", highlight=False)

"""``fluxredux run``: one prediction on a server, with progress, files downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fluxredux.api.eachlabs.shapes import Prediction
from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.input_flags import check_reference_choice, parse_flags, validate_flags, with_input_flags
from fluxredux.cli.options import VerboseOption
from fluxredux.client import FluxRedux
from fluxredux.errors import FluxReduxError, InvalidInput


@app.command()
@with_input_flags
def run(
    image: Annotated[
        str | None,
        typer.Argument(
            help="Reference image: a local file, an http(s) URL or an uploaded file id; "
            "or several, with --redux-images (local files among them are uploaded)."
        ),
    ] = None,
    server: Annotated[
        str, typer.Option(envvar="FLUXREDUX_SERVER", help="Server URL.")
    ] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(envvar="FLUXREDUX_API_KEY", help="API key.")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where to save the images.")] = Path(
        "."
    ),
    verbose: VerboseOption = False,
    *,
    inputs: dict[str, Any],
) -> None:
    """Run a prediction on a fluxredux server and download its images."""
    setup_logging(verbose)
    if not key:
        raise fail(InvalidInput("an API key is needed: --key or FLUXREDUX_API_KEY"))
    try:
        parsed = parse_flags(inputs)
        check_reference_choice(image is not None, parsed)
        validate_flags(parsed)  # locally first: same model, same messages as the server
        if image is not None:
            parsed["redux_image"] = _local_or_remote(image)
        else:
            parsed["redux_images"] = [
                {**item, "image": _local_or_remote(str(item["image"]))} for item in parsed["redux_images"]
            ]
        with FluxRedux(server, key) as client:
            prediction = _run_with_progress(client, parsed)
            _save(client, prediction, output_dir)
    except FluxReduxError as exc:
        raise fail(exc) from None
    except httpx.HTTPError as exc:
        raise fail(FluxReduxError(f"cannot reach the server at {server}: {exc}")) from None


def _local_or_remote(reference: str) -> Any:
    """A local file as a Path (the client uploads it), anything else as given."""
    local = Path(reference)
    return local if local.is_file() else reference


def _run_with_progress(client: FluxRedux, inputs: dict[str, Any]) -> Prediction:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        references = [inputs.get("redux_image"), *(i["image"] for i in inputs.get("redux_images") or [])]
        local = any(isinstance(reference, Path) for reference in references)
        task = progress.add_task("uploading" if local else "creating", total=None, state="")
        prediction_id = client.create(inputs)
        progress.update(task, description=prediction_id)

        def show(prediction: Prediction) -> None:
            if prediction.status == "starting":
                progress.update(task, state="queued")
            elif prediction.status == "processing":
                step, total = prediction.progress.step, prediction.progress.total
                progress.update(task, total=total, completed=step, state=f"step {step} of {total}")
            else:
                progress.update(task, completed=prediction.progress.total, state=prediction.status)

        return client.wait(prediction_id, poll=0.25, on_update=show)


def _save(client: FluxRedux, prediction: Prediction, output_dir: Path) -> None:
    if prediction.status != "success":
        raise FluxReduxError(prediction.error or f"the prediction ended as {prediction.status}")
    urls = [prediction.output] if isinstance(prediction.output, str) else list(prediction.output or [])
    output_dir.mkdir(parents=True, exist_ok=True)
    for url in urls:
        path = output_dir / url.rsplit("/", 1)[-1]
        data = client.download(url)
        path.write_bytes(data)
        out.print(f"{path}  {len(data):,} bytes", highlight=False)
    if prediction.demo:
        out.print("[bold yellow]demo model: random weights, outputs are noise[/]")
    out.print(f"seed: {prediction.seed}", highlight=False)

"""``fluxredux run``: one prediction on a server, with progress, files downloaded."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from fluxredux.api.eachlabs.shapes import Prediction
from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.download import output_file_name, output_indices, reference_stem
from fluxredux.cli.input_flags import check_reference_choice, parse_flags, validate_flags, with_input_flags
from fluxredux.cli.options import VerboseOption
from fluxredux.client import FluxRedux
from fluxredux.client.core import TERMINAL, server_url
from fluxredux.errors import FluxReduxError, ImageError, InvalidInput
from fluxredux.storage import is_valid_id


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
    started = time.monotonic()  # the run's clock: the upload is part of the wait
    setup_logging(verbose)
    if not key:
        raise fail(InvalidInput("an API key is needed: --key or FLUXREDUX_API_KEY"))
    try:
        base = server_url(server)
        if base.note:
            err.print(f"note: {base.note}", highlight=False, soft_wrap=True)
        parsed = parse_flags(inputs)
        check_reference_choice(image is not None, parsed)
        validate_flags(parsed)  # locally first: same model, same messages as the server
        if image is not None:
            parsed["redux_image"] = reference_argument(image)
            first: str | Path = parsed["redux_image"]
        else:
            parsed["redux_images"] = [
                {**item, "image": reference_argument(item["image"])} for item in parsed["redux_images"]
            ]
            first = parsed["redux_images"][0]["image"]
        # The files are listed once the bar is gone: while it is shown, rich sends stdout
        # through it (to stderr).
        with FluxRedux(base.base, key) as client, RunProgress(started, uploads=_uploads(parsed)) as progress:
            prediction = progress.follow(client, client.create(parsed))
            saved = _download(client, prediction, output_dir, reference_stem(first), progress)
        _report(prediction, saved)
    except FluxReduxError as exc:
        raise fail(exc) from None
    except httpx.HTTPError as exc:
        raise fail(FluxReduxError(f"cannot reach the server at {server}: {exc}")) from None


def reference_argument(reference: str) -> str | Path:
    """A reference as given on the command line, told apart by its shape: an http(s) URL
    or a data: URI is sent as it is; anything else names a local file (a Path: the client
    uploads it), unless no such file exists and it has an upload id's shape (sent as the
    id). So a mistyped file name is "no such file", not an upload id the server never had."""
    if reference[:8].lower().startswith(("http://", "https://")) or reference[:5].lower() == "data:":
        return reference
    local = Path(reference)
    if local.is_file():
        return local
    if is_valid_id(reference):
        return reference
    if local.exists():
        raise ImageError("image_unreadable", f"not a file: {reference}")
    raise ImageError("image_unreadable", f"no such file: {reference}")


def _uploads(inputs: dict[str, Any]) -> bool:
    references = [inputs.get("redux_image"), *(i["image"] for i in inputs.get("redux_images") or [])]
    return any(isinstance(reference, Path) for reference in references)


def state_of(prediction: Prediction) -> str:
    """What the bar says the prediction is doing."""
    if prediction.status == "starting":
        ahead = prediction.queue_position
        return "queued" if not ahead else f"queued, {ahead} ahead"
    if prediction.status == "processing":
        # After its last step: decoding, safety check, encoding, storing (a server that
        # does not report its phase: the step still).
        return prediction.progress.phase or f"step {prediction.progress.step} of {prediction.progress.total}"
    return prediction.status  # success, error, cancelled: the API's own words


class RunClock(ProgressColumn):
    """The time since ``run`` started (its upload included) until the prediction ended:
    one clock for every phase. Rich's own elapsed column stops when the bar is full,
    which is at the last denoising step, well before the images exist."""

    def render(self, task: Task) -> Text:
        started, ended = task.fields["started"], task.fields["ended"]
        seconds = (time.monotonic() if ended is None else ended) - started
        return Text(str(timedelta(seconds=int(seconds))), style="progress.elapsed")


class RunProgress:
    """The one line ``run`` shows on stderr: the prediction's id (or "uploading"), a bar of
    its denoising steps, what it is doing, and the run's clock."""

    def __init__(self, started: float, *, uploads: bool, console: Console = err) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[state]}"),
            RunClock(),
            console=console,
        )
        description = "uploading" if uploads else "creating"
        self._task: TaskID = self._progress.add_task(
            description, total=None, state="", started=started, ended=None
        )

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def follow(self, client: FluxRedux, prediction_id: str) -> Prediction:
        """Poll the prediction until it ends, showing each state."""
        self._update(description=prediction_id)
        return client.wait(prediction_id, poll=0.25, on_update=self.show)

    def show(self, prediction: Prediction) -> None:
        progress = prediction.progress
        fields: dict[str, Any] = {"state": state_of(prediction)}
        if prediction.status != "starting":  # queued, it has no steps yet: the bar pulses
            past_the_steps = prediction.status == "success" or progress.phase is not None
            fields.update(total=progress.total, completed=progress.total if past_the_steps else progress.step)
        if prediction.status in TERMINAL:
            fields["ended"] = time.monotonic()  # the clock stops; downloading is not the prediction's time
        self._update(**fields)

    def downloading(self, done: int, count: int) -> None:
        self._update(state=f"downloading {done + 1} of {count}" if count > 1 else "downloading")

    def done(self) -> None:
        self._update(state="success, downloaded")

    def _update(self, **fields: Any) -> None:
        # refresh: a state that lasts less than rich's refresh period is shown all the same.
        self._progress.update(self._task, refresh=True, **fields)


def _download(
    client: FluxRedux, prediction: Prediction, output_dir: Path, stem: str, progress: RunProgress
) -> list[tuple[Path, int]]:
    """The prediction's images saved in ``output_dir``, named as ``predict`` names its own:
    each file and its size."""
    if prediction.status != "success":
        raise FluxReduxError(prediction.error or f"the prediction ended as {prediction.status}")
    urls = [prediction.output] if isinstance(prediction.output, str) else list(prediction.output or [])
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for done, (url, index) in enumerate(zip(urls, output_indices(prediction.safety, len(urls)), strict=True)):
        progress.downloading(done, len(urls))
        path = output_dir / output_file_name(stem, prediction.seed, index, _extension(url, prediction))
        data = client.download(url)
        path.write_bytes(data)
        saved.append((path, len(data)))
    progress.done()
    return saved


def _report(prediction: Prediction, saved: list[tuple[Path, int]]) -> None:
    for path, size in saved:
        out.print(f"{path}  {size:,} bytes", highlight=False)
    if prediction.demo:
        out.print("[bold yellow]demo model: random weights, outputs are noise[/]")
    out.print(f"seed: {prediction.seed}", highlight=False)


def _extension(url: str, prediction: Prediction) -> str:
    """The file's own extension (what the server stored), else the format asked for."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lstrip(".").lower()
    return suffix or str(prediction.input.get("output_format", "webp"))

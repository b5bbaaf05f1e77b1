"""``fluxredux run``: one prediction on a server, with progress, files downloaded; and
what ``upscale`` shares with it (the server and key checked, the prediction followed, its
images downloaded and listed)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from fluxredux.cli.download import PROMPT_STEM, output_file_name, output_indices, reference_stem
from fluxredux.cli.input_flags import check_reference_choice, parse_flags, validate_flags, with_input_flags
from fluxredux.cli.options import DEFAULT_SERVER, KeyOption, OutputDirOption, ServerOption, VerboseOption
from fluxredux.client import FluxRedux
from fluxredux.client.core import TERMINAL, server_url
from fluxredux.errors import FluxReduxError, ImageError, InvalidInput
from fluxredux.schema import PredictionInput
from fluxredux.storage import is_valid_id


@app.command()
@with_input_flags
def run(
    image: Annotated[
        str | None,
        typer.Argument(
            help="Reference image: a local file, an http(s) URL or an uploaded file id; "
            "or several, with --redux-images (local files among them are uploaded). None for a "
            "--prompt alone (text to image), or a final made with --upscale-from."
        ),
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    key: KeyOption = None,
    output_dir: OutputDirOption = Path("."),
    preview: Annotated[
        Path | None,
        typer.Option(
            "--preview",
            metavar="DIR",
            help="Ask for step previews and write each as it comes (DIR/<id>-step-<n>.jpg); the "
            "progress follows the prediction's event stream.",
        ),
    ] = None,
    verbose: VerboseOption = False,
    *,
    inputs: dict[str, Any],
) -> None:
    """Run a prediction on a fluxredux server and download its images."""
    started = time.monotonic()  # the run's clock: the upload is part of the wait
    setup_logging(verbose)
    with server_errors(server):
        base, key = server_base(server, key)
        parsed = parse_flags(inputs)
        check_reference_choice(image is not None, parsed)
        # Locally first: same model, same messages as the server.
        checked = validate_flags(parsed, image_given=image is not None)
        if image is not None:
            parsed["redux_image"] = reference_argument(image)
        elif "redux_images" in parsed:
            parsed["redux_images"] = [
                {**item, "image": reference_argument(item["image"])} for item in parsed["redux_images"]
            ]
        if preview is not None:
            parsed["preview"] = True
        create_and_download(
            base,
            key,
            lambda client: client.create(parsed),
            started=started,
            uploads=_uploads(parsed),
            output_dir=output_dir,
            stem=_stem(parsed, checked),
            previews=preview,
        )


@contextmanager
def server_errors(server: str) -> Iterator[None]:
    """Domain errors printed plainly (exit 2 for a caller's mistake, else 1), and a server
    that cannot be reached said so in one line: never a trace."""
    try:
        yield
    except FluxReduxError as exc:
        raise fail(exc) from None
    except httpx.HTTPError as exc:
        raise fail(FluxReduxError(f"cannot reach the server at {server}: {exc}")) from None


def server_base(server: str, key: str | None) -> tuple[str, str]:
    """The server's base URL (a note printed when it was corrected) and the key, checked
    before anything is sent."""
    if not key:
        raise InvalidInput("an API key is needed: --key or FLUXREDUX_API_KEY")
    base = server_url(server)
    if base.note:
        err.print(f"note: {base.note}", highlight=False, soft_wrap=True)
    return base.base, key


def create_and_download(
    base: str,
    key: str,
    create: Callable[[FluxRedux], str],
    *,
    started: float,
    uploads: bool,
    output_dir: Path,
    stem: str,
    previews: Path | None = None,
) -> None:
    """Create a prediction (``create``: its id), follow it on the progress line, save its
    images in ``output_dir`` as ``<stem>-<seed>-<i>.<ext>`` and list them; with
    ``previews``, its step previews there as they come."""
    # The files are listed once the bar is gone: while it is shown, rich sends stdout
    # through it (to stderr).
    with FluxRedux(base, key) as client, RunProgress(started, uploads=uploads) as progress:
        prediction_id = create(client)
        if previews is None:
            prediction = progress.follow(client, prediction_id)
        else:
            prediction = progress.stream(client, prediction_id, previews)
        saved = _download(client, prediction, output_dir, stem, progress)
    _report(prediction, saved)


def final_stem(draft: str, index: int, scale: int | None) -> str:
    """The stem of a final's images: its draft's id and output, and the scale (``x2``) when
    the size was given by one (``final`` when by megapixels or width and height)."""
    return f"{draft}-{index}-{f'x{scale}' if scale else 'final'}"


def _stem(inputs: dict[str, Any], checked: PredictionInput) -> str:
    """What names the images: the (first) reference, else the draft, else the prompt."""
    if inputs.get("redux_image") is not None:
        return reference_stem(inputs["redux_image"])
    if inputs.get("redux_images"):
        return reference_stem(inputs["redux_images"][0]["image"])
    if checked.upscale_from is not None:
        sized = checked.custom_size is not None or "megapixels" in checked.model_fields_set
        scale = None if sized else checked.scale or 2
        return final_stem(checked.upscale_from.prediction, checked.upscale_from.index, scale)
    return PROMPT_STEM


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

    def stream(self, client: FluxRedux, prediction_id: str, previews: Path) -> Prediction:
        """Follow the prediction's event stream until it ends, writing each preview."""
        self._update(description=prediction_id)
        previews.mkdir(parents=True, exist_ok=True)
        for event in client.stream(prediction_id):
            if event.prediction is not None:
                self.show(event.prediction)
                return event.prediction
            if event.event == "queued":
                ahead = event.queue_position
                self._update(state="queued" if not ahead else f"queued, {ahead} ahead")
            elif event.event == "step" and event.step is not None:
                self._update(
                    state=f"step {event.step} of {event.total}", total=event.total, completed=event.step
                )
            elif event.event == "phase":
                self._update(state=event.phase)
            elif event.event == "preview" and event.image is not None:
                data = base64.b64decode(event.image.partition(",")[2])
                (previews / f"{prediction_id}-step-{event.step}.jpg").write_bytes(data)
        raise FluxReduxError("the prediction's event stream ended before the prediction did")

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

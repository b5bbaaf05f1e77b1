"""The official `replicate` client (1.0.7), unchanged but for its base URL and token,
against `fluxredux serve --model demo` (a real server process and its worker process):
run with a local file, create/wait/reload/cancel/list, a failed prediction, a bad input."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.cluster import wait_for
from tests.conftest import SAMPLE_IMAGE
from tests.test_faults import Server, serve

replicate = pytest.importorskip("replicate")

MODEL = "black-forest-labs/flux-redux-schnell"
SAMPLE_DATA_URI = "data:image/jpeg;base64," + base64.b64encode(SAMPLE_IMAGE.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[Server]:
    with serve(
        tmp_path_factory.mktemp("replicate-serve"),
        model="demo",
        env={"FLUXREDUX_CACHE_DIR": str(model_cache_dir)},
    ) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Any:
    made = replicate.Client(api_token=server.key, base_url=server.url)
    made.poll_interval = 0.1  # the default 0.5 s only makes the test slower
    return made


def image_bytes(item: Any) -> bytes:
    """An output's bytes. The client turns https:// and data: outputs into FileOutput
    objects (``read()``); this server is plain http on loopback, so it keeps the URL."""
    if hasattr(item, "read"):
        return bytes(item.read())
    response = httpx.get(str(item), timeout=30)
    response.raise_for_status()
    return response.content


def test_run_with_a_local_file_returns_images_of_the_asked_size(
    client: Any, server: Server, tmp_path: Path
) -> None:
    local = tmp_path / "reference.png"
    Image.open(SAMPLE_IMAGE).convert("RGB").resize((96, 64)).save(local)

    outputs = client.run(
        MODEL,
        input={
            "redux_image": local,  # uploaded by the client through POST /v1/files (field "content")
            "aspect_ratio": "16:9",
            "megapixels": "0.25",
            "num_outputs": 2,
            "num_inference_steps": 1,
            "output_format": "png",
        },
    )

    assert isinstance(outputs, list) and len(outputs) == 2
    for item in outputs:
        with Image.open(io.BytesIO(image_bytes(item))) as image:
            assert (image.format, image.size) == ("PNG", (672, 384))
    # The upload was used in place (not fetched back over HTTP): the prediction shows it.
    [prediction] = [p for p in client.predictions.list().results if p.input.get("aspect_ratio") == "16:9"]
    assert prediction.input["redux_image"].startswith(server.url + "/files/")
    assert prediction.status == "succeeded" and prediction.model == MODEL


def test_a_pinned_version_runs_and_the_model_describes_its_input(client: Any) -> None:
    """run("owner/name:version") creates through /v1/predictions, then reads the version
    (its schema says how outputs come): both must answer."""
    version = "e8e9ba0b5d8c66a4e9f9b4de6b2a1c0f"  # a hosted version id, as a user's code pins it
    outputs = client.run(
        f"{MODEL}:{version}",
        input={"redux_image": SAMPLE_DATA_URI, "megapixels": "0.25", "num_inference_steps": 1},
    )
    assert isinstance(outputs, list) and len(outputs) == 1
    with Image.open(io.BytesIO(image_bytes(outputs[0]))) as image:
        assert image.size == (512, 512)

    model = client.models.get(MODEL)
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert "redux_image" in schema["Input"]["properties"] and schema["Output"]["type"] == "array"
    assert client.models.get(MODEL).versions.get(version).id == version
    with pytest.raises(replicate.exceptions.ReplicateError):
        client.models.get("someone/else")


def test_an_output_fed_back_in_is_read_from_storage_not_fetched(client: Any, server: Server) -> None:
    """A previous output's URL as redux_image (a common Redux loop): this server's own file,
    taken from its storage (a loopback URL would be refused as private if fetched)."""
    small = {"megapixels": "0.25", "num_inference_steps": 1}
    [first] = client.run(MODEL, input={"redux_image": SAMPLE_DATA_URI, **small})
    [again] = client.run(MODEL, input={"redux_image": str(first), **small})
    assert image_bytes(again) != image_bytes(first)
    missing = str(first).rsplit("/", 1)[0] + "/AAAAAAAAAAAAAAAAAAAAAA.png"
    with pytest.raises(replicate.exceptions.ReplicateError) as refused:
        client.predictions.create(model=MODEL, input={"redux_image": missing, **small})
    assert "input.redux_image" in str(refused.value) and "no longer stored" in str(refused.value)
    assert refused.value.status == 404


def test_create_wait_reload_cancel_and_list(client: Any, server: Server) -> None:
    upload = client.files.create(SAMPLE_IMAGE)
    small = {"redux_image": upload.urls["get"], "megapixels": "0.25", "num_inference_steps": 1}

    created = client.predictions.create(model=MODEL, input=small)
    assert created.status in {"starting", "processing"} and created.output is None
    created.wait()
    assert created.status == "succeeded"
    assert len(created.output) == 1 and created.metrics["predict_time"] > 0
    created.reload()
    assert created.status == "succeeded" and created.completed_at is not None

    # A long one, cancelled through the client, while it waits or runs.
    long = client.predictions.create(model=MODEL, input={**small, "num_outputs": 4, "num_inference_steps": 4})
    long.cancel()
    long.wait()
    assert long.status == "canceled" and long.output is None

    page = client.predictions.list()
    ids = [p.id for p in page.results]
    assert ids.index(long.id) < ids.index(created.id)  # newest first

    # One state machine: the Eachlabs surface reads (and names) the same predictions.
    headers = {"X-API-Key": server.key}
    eachlabs = httpx.get(f"{server.url}/v1/prediction/{long.id}", headers=headers).json()
    assert eachlabs["status"] == "cancelled"


def test_a_failed_prediction_raises_model_error(client: Any, server: Server) -> None:
    """A reference lost from storage (the disk's file removed behind the server's back)
    while the prediction that uses it waits in the queue: that prediction fails when its
    turn comes, and run() raises ModelError with its error."""
    upload = client.files.create(SAMPLE_IMAGE)
    stored = server.log.parent / "data" / "files" / upload.urls["get"].rsplit("/", 1)[-1]
    assert stored.is_file()
    busy = client.predictions.create(  # keeps the worker busy while run()'s prediction waits
        model=MODEL, input={"redux_image": SAMPLE_DATA_URI, "num_outputs": 4, "num_inference_steps": 4}
    )
    raised: list[BaseException] = []

    def run() -> None:
        try:
            client.run(MODEL, input={"redux_image": upload.urls["get"], "megapixels": "0.25", "seed": 7})
        except BaseException as exc:
            raised.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    wait_for(
        lambda: any(p.input.get("seed") == 7 for p in client.predictions.list().results),
        30,
        "run() created no prediction",
    )
    stored.unlink()
    busy.reload()
    assert busy.status != "succeeded", "the worker finished before the file was removed: make it slower"
    runner.join(90)

    assert len(raised) == 1 and isinstance(raised[0], replicate.exceptions.ModelError), raised
    failed = raised[0].prediction
    assert failed.status == "failed" and "no longer stored" in str(failed.error)
    assert str(raised[0]) == failed.error
    busy.wait()
    assert busy.status == "succeeded"


def test_deleting_a_file_keeps_the_predictions_already_accepted(client: Any, server: Server) -> None:
    """DELETE /v1/files/{id} stops new predictions from using the file at once, but one
    already accepted (queued behind another) still runs with it: nothing accepted is lost."""
    upload = client.files.create(SAMPLE_IMAGE)
    busy = client.predictions.create(
        model=MODEL, input={"redux_image": SAMPLE_DATA_URI, "num_outputs": 4, "num_inference_steps": 4}
    )
    queued = client.predictions.create(model=MODEL, input={"redux_image": upload.urls["get"], "seed": 3})
    assert client.files.delete(upload.id) is True
    queued.reload()
    assert queued.status == "starting", "the prediction ran before the delete: make the busy one slower"

    with pytest.raises(replicate.exceptions.ReplicateError) as refused:  # gone for new predictions
        client.predictions.create(model=MODEL, input={"redux_image": upload.id})
    assert "redux_image" in str(refused.value)
    with pytest.raises(replicate.exceptions.ReplicateError):
        client.files.get(upload.id)

    busy.wait()
    queued.wait()
    assert queued.status == "succeeded", queued.error


def test_a_bad_input_raises_replicate_error_naming_the_field(client: Any) -> None:
    started = time.monotonic()
    with pytest.raises(replicate.exceptions.ReplicateError) as raised:
        client.run(MODEL, input={"redux_image": SAMPLE_IMAGE.open("rb"), "num_outputs": 9})
    error = raised.value
    assert error.status == 422 and error.title == "Input validation failed"
    assert "input.num_outputs" in (error.detail or "")
    assert time.monotonic() - started < 30  # refused at once, not after a wait

    with pytest.raises(replicate.exceptions.ReplicateError) as unknown:
        client.run("someone/else", input={"redux_image": "https://example.com/x.png"})
    assert unknown.value.status == 404 and "someone/else" in (unknown.value.detail or "")


def test_stream_yields_progress_logs_then_each_output_then_done(client: Any, server: Server) -> None:
    events = list(
        client.stream(
            MODEL,
            input={
                "redux_image": SAMPLE_DATA_URI,
                "megapixels": "0.25",
                "num_inference_steps": 2,
                "num_outputs": 2,
            },
        )
    )
    kinds = [event.event.value for event in events]
    assert kinds[-1] == "done" and set(kinds) <= {"logs", "output", "done"}
    logs = [event.data for event in events if event.event.value == "logs"]
    assert any(line.endswith("1/2") for line in logs) and any(line.endswith("2/2") for line in logs), logs
    outputs = [str(event) for event in events if event.event.value == "output"]  # str(): an output's data
    assert len(outputs) == 2 and all(url.startswith(server.url + "/files/") for url in outputs)
    assert kinds.index("output") > max(i for i, kind in enumerate(kinds) if kind == "logs")
    for url in outputs:
        assert image_bytes(url)  # the files are there

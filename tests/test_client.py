"""The Python client, sync and async, against a real server (fake model)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from fluxredux.client import ApiError, AsyncFluxRedux, FluxRedux
from fluxredux.worker.fake import FakeModel
from tests.conftest import SAMPLE_IMAGE
from tests.harness import Harness, running_server


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.05)) as harness:
        yield harness


def test_run_with_a_local_file_uploads_it(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        prediction = client.run({"redux_image": SAMPLE_IMAGE, "num_outputs": 2, "megapixels": "0.25"})
        assert prediction.status == "success" and isinstance(prediction.output, list)
        data = client.download(prediction.output[0])
        assert Image.open(io.BytesIO(data)).size == (512, 512)
        assert client.list(limit=1).items[0].id == prediction.id


def test_create_wait_with_progress_and_cancel(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        seen: list[str] = []
        prediction_id = client.create({"redux_image": SAMPLE_IMAGE})
        done = client.wait(prediction_id, poll=0.02, on_update=lambda p: seen.append(p.status))
        assert done.status == "success" and seen[-1] == "success"
        cancelled = client.cancel(
            client.create({"redux_image": SAMPLE_IMAGE.read_bytes(), "num_inference_steps": 4})
        )
        assert cancelled.status in {"cancelled", "processing"}
        assert client.wait(cancelled.id, timeout=10).status in {"cancelled", "success"}


def test_errors_raise_with_status_and_code(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        with pytest.raises(ApiError) as info:
            client.create({"redux_image": SAMPLE_IMAGE, "num_outputs": 9})
        assert (info.value.status, info.value.code) == (400, "invalid_input")
        with pytest.raises(ApiError) as info:
            client.get("does-not-exist")
        assert info.value.status == 404
    with FluxRedux(api.url, "fr_000000000000_wrong") as client, pytest.raises(ApiError) as info:
        client.list()
    assert info.value.status == 401


def test_async_client(api: Harness) -> None:
    async def go() -> None:
        async with AsyncFluxRedux(api.url, api.key) as client:
            prediction = await client.run({"redux_image": SAMPLE_IMAGE, "output_format": "png"})
            assert prediction.status == "success" and isinstance(prediction.output, str)
            assert (await client.download(prediction.output))[:8] == b"\x89PNG\r\n\x1a\n"
            got = await client.get(prediction.id)
            assert got.seed == prediction.seed

    asyncio.run(go())

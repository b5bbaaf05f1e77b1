"""The Python client, sync and async, against a real server (fake model)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

import fluxredux.client.aio
import fluxredux.client.sync
from fluxredux.client import ApiError, AsyncFluxRedux, FluxRedux
from fluxredux.pipeline.fake import FakeModel
from tests.conftest import SAMPLE_IMAGE
from tests.harness import Harness, png_data_uri, running_server


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


def test_create_and_wait_with_progress(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        seen: list[str] = []
        prediction_id = client.create({"redux_image": SAMPLE_IMAGE})
        done = client.wait(prediction_id, poll=0.02, on_update=lambda p: seen.append(p.status))
        assert done.status == "success" and seen[-1] == "success"


def test_cancel_stops_a_running_prediction(tmp_path: Path) -> None:
    # Four 2 s steps: the run cannot end by itself before the cancel lands mid-way.
    with running_server(tmp_path, model=FakeModel(step_seconds=2.0)) as api, FluxRedux(api.url, api.key) as c:
        prediction_id = c.create({"redux_image": SAMPLE_IMAGE.read_bytes(), "num_inference_steps": 4})
        deadline = time.monotonic() + 10
        while c.get(prediction_id).status != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        requested = time.monotonic()
        assert c.cancel(prediction_id).status in {"processing", "cancelled"}  # flagged; ends at its next step
        ended = c.wait(prediction_id, timeout=10)
        assert ended.status == "cancelled" and ended.output is None, ended
        assert time.monotonic() - requested < 4.0  # within about one step, not after the whole run


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


def test_several_local_references_are_uploaded_then_mixed(api: Harness) -> None:
    """Local files among redux_images are uploaded first, like redux_image; the mix keeps
    its order and weights, and match_input takes the first one's proportions."""
    references = [{"image": SAMPLE_IMAGE, "weight": 0.7}, {"image": SAMPLE_IMAGE.read_bytes(), "weight": 0.3}]
    inputs = {"redux_images": references, "aspect_ratio": "match_input", "megapixels": "0.25"}
    with FluxRedux(api.url, api.key) as client:
        prediction = client.run(inputs)
        assert prediction.status == "success" and isinstance(prediction.output, str)
        assert Image.open(io.BytesIO(client.download(prediction.output))).size == (624, 416)  # 3:2
        assert [item["weight"] for item in prediction.input["redux_images"]] == [0.7, 0.3]
        assert len(api.services.uploads.uploaded(_stored(api))) == 2  # both files, as uploads

    async def go() -> None:
        async with AsyncFluxRedux(api.url, api.key) as client:
            again = await client.run(inputs)
            assert again.status == "success"

    asyncio.run(go())


def _stored(api: Harness) -> list[str]:
    return [path.name for path in api.services.settings.files_dir.iterdir()]


def test_async_client(api: Harness) -> None:
    async def go() -> None:
        async with AsyncFluxRedux(api.url, api.key) as client:
            prediction = await client.run({"redux_image": SAMPLE_IMAGE, "output_format": "png"})
            assert prediction.status == "success" and isinstance(prediction.output, str)
            assert (await client.download(prediction.output))[:8] == b"\x89PNG\r\n\x1a\n"
            got = await client.get(prediction.id)
            assert got.seed == prediction.seed

    asyncio.run(go())


# --- Retry-After: a create over the in-flight limit (one per key) is answered 429 with
# Retry-After: 2; nothing was created, so the client may send it again.


@pytest.fixture
def one_in_flight(tmp_path: Path) -> Iterator[Harness]:
    """No worker, one prediction in flight per key: a second create is refused (429)."""
    with running_server(tmp_path, run_worker=False, max_in_flight_per_key=1) as harness:
        yield harness


def statuses_of(responses: list[int]) -> dict[str, list[object]]:
    """httpx options that record each answer's status."""
    return {"event_hooks": {"response": [lambda r: responses.append(r.status_code)]}}


def test_a_refused_create_is_retried_after_retry_after(one_in_flight: Harness) -> None:
    first = one_in_flight.create_id()
    responses: list[int] = []

    def free_the_place(response: httpx.Response) -> None:
        # Refused once: the first prediction is cancelled while the client waits.
        if response.status_code == 429 and responses.count(429) == 1:
            one_in_flight.http.post(f"/v1/prediction/{first}/cancel").raise_for_status()

    hooks = {"event_hooks": {"response": [lambda r: responses.append(r.status_code), free_the_place]}}
    with FluxRedux(one_in_flight.url, one_in_flight.key, **hooks) as client:
        started = time.monotonic()
        second = client.create({"redux_image": png_data_uri()})
        waited = time.monotonic() - started
    assert responses == [429, 200]
    assert 2.0 <= waited < 5.0  # what Retry-After said, then at once
    assert one_in_flight.get(second)["status"] == "starting"
    assert one_in_flight.get(first)["status"] == "cancelled"


def test_with_retries_off_a_refusal_raises_at_once(one_in_flight: Harness) -> None:
    one_in_flight.create_id()
    responses: list[int] = []
    with FluxRedux(one_in_flight.url, one_in_flight.key, retries=0, **statuses_of(responses)) as client:
        started = time.monotonic()
        with pytest.raises(ApiError) as info:
            client.create({"redux_image": png_data_uri()})
        assert time.monotonic() - started < 1.5
    assert (info.value.status, info.value.code, info.value.detail["retry_after"]) == (429, "rate_limited", 2)
    assert responses == [429]


def test_retries_are_bounded_in_number_and_in_time_waited(
    one_in_flight: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_in_flight.create_id()
    waits: list[float] = []
    monkeypatch.setattr(fluxredux.client.sync, "_sleep", waits.append)  # count the waits, spend none
    responses: list[int] = []
    with (
        FluxRedux(one_in_flight.url, one_in_flight.key, retries=2, **statuses_of(responses)) as client,
        pytest.raises(ApiError) as info,
    ):
        client.create({"redux_image": png_data_uri()})
    assert info.value.status == 429
    assert (responses, waits) == ([429, 429, 429], [2.0, 2.0])  # the first try and two retries

    waits.clear()
    responses.clear()
    # 3 s of waiting allowed: one 2 s wait fits, a second would not, so it is not started.
    with (
        FluxRedux(
            one_in_flight.url, one_in_flight.key, retries=5, max_retry_wait=3, **statuses_of(responses)
        ) as client,
        pytest.raises(ApiError),
    ):
        client.create({"redux_image": png_data_uri()})
    assert (responses, waits) == ([429, 429], [2.0])


def test_async_client_retries_too(one_in_flight: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    first = one_in_flight.create_id()
    waits: list[float] = []

    async def cancel_the_first_instead_of_waiting(seconds: float) -> None:
        waits.append(seconds)
        one_in_flight.http.post(f"/v1/prediction/{first}/cancel").raise_for_status()

    monkeypatch.setattr(fluxredux.client.aio, "_sleep", cancel_the_first_instead_of_waiting)

    async def go() -> str:
        async with AsyncFluxRedux(one_in_flight.url, one_in_flight.key) as client:
            return await client.create({"redux_image": png_data_uri()})

    second = asyncio.run(go())
    assert waits == [2.0]
    assert one_in_flight.get(second)["status"] == "starting"

    async def refused() -> None:
        async with AsyncFluxRedux(one_in_flight.url, one_in_flight.key, retries=0) as client:
            await client.create({"redux_image": png_data_uri()})

    with pytest.raises(ApiError) as info:  # the second is in flight now: refused, not retried
        asyncio.run(refused())
    assert info.value.status == 429 and waits == [2.0]


# --- issue 22: a prompt alone, a custom size, and finals made from drafts


def test_a_prompt_alone_at_a_custom_size(api: Harness) -> None:
    """No reference at all: the prompt makes the image (text to image), at width x height."""
    with FluxRedux(api.url, api.key) as client:
        prediction = client.run({"prompt": "a lighthouse at dusk", "width": 512, "height": 256})
        assert prediction.status == "success" and isinstance(prediction.output, str), prediction
        assert Image.open(io.BytesIO(client.download(prediction.output))).size == (512, 256)
        assert (
            prediction.input["redux_image"] is None and prediction.input["prompt"] == "a lighthouse at dusk"
        )
    assert api.services.uploads.uploaded(_stored(api)) == set()  # nothing to upload


def test_upscale_makes_a_final_of_one_output_of_a_draft(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        draft = client.run({"redux_image": SAMPLE_IMAGE, "megapixels": "0.25", "num_outputs": 2})
        assert draft.status == "success"
        final = client.wait(client.upscale(draft.id, index=1, scale=2, upscale_strength=0.5, seed=None))
        assert final.status == "success" and isinstance(final.output, str), final
        assert Image.open(io.BytesIO(client.download(final.output))).size == (1024, 1024)  # 2x its sides
        assert final.upscaled_from is not None
        assert (final.upscaled_from.prediction, final.upscaled_from.index) == (draft.id, 1)
        assert final.seed == draft.seed  # seed=None is not sent: the draft's is kept
        assert (final.input["scale"], final.input["upscale_strength"]) == (2, 0.5)
        assert client.get(draft.id).upscaled_from is None  # a draft is no final


def test_a_keyed_upscale_asked_twice_makes_one_final(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        draft = client.run({"redux_image": png_data_uri(), "megapixels": "0.25"})
        first = client.upscale(draft.id, idempotency_key="final-of-the-draft")
        assert client.upscale(draft.id, idempotency_key="final-of-the-draft") == first
        assert client.upscale(draft.id) != first  # without the key, another final


def test_upscale_errors_name_the_draft(api: Harness) -> None:
    with FluxRedux(api.url, api.key) as client:
        draft = client.run({"redux_image": png_data_uri(), "megapixels": "0.25"})
        with pytest.raises(ApiError) as info:
            client.upscale("no-such-draft")
        assert info.value.status == 404 and "upscale_from" in info.value.message
        with pytest.raises(ApiError) as info:
            client.upscale(draft.id, index=3)  # it has one output
        assert (info.value.status, info.value.code) == (400, "invalid_input")
        assert "upscale_from" in info.value.message
        with pytest.raises(TypeError, match="unexpected keyword argument 'strength'"):
            client.upscale(draft.id, strength=0.5)  # type: ignore[call-arg]  # misspelt: nothing sent
    with FluxRedux(api.url, "fr_000000000000_wrong") as client, pytest.raises(ApiError) as info:
        client.upscale(draft.id)
    assert info.value.status == 401


def test_async_client_upscales_too(api: Harness) -> None:
    async def go() -> None:
        async with AsyncFluxRedux(api.url, api.key) as client:
            draft = await client.run({"prompt": "a red kite", "megapixels": "0.25", "aspect_ratio": "16:9"})
            final = await client.wait(await client.upscale(draft.id, scale=4, output_format="png"))
            assert final.status == "success" and isinstance(final.output, str), final
            data = await client.download(final.output)
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert Image.open(io.BytesIO(data)).size == (672 * 4, 384 * 4)
            assert final.upscaled_from is not None and final.upscaled_from.prediction == draft.id

    asyncio.run(go())

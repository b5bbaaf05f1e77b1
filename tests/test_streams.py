"""Event streams (Server-Sent Events) of a prediction, on both surfaces: the order of a
run's events, resuming with Last-Event-ID, keep-alives, the bounds, and the official
replicate client's ``stream()`` against the Replicate surface."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.api import streams
from fluxredux.pipeline.fake import FakeModel
from tests.harness import Harness, running_server

REPLICATE_MODEL = "black-forest-labs/flux-redux-schnell"


@dataclass(frozen=True)
class Event:
    name: str
    id: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def read_events(response: httpx.Response, comments: list[str] | None = None) -> Iterator[Event]:
    """The events of a text/event-stream response, as an EventSource parses them."""
    name, event_id, data = "message", "", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield Event(name, event_id, "\n".join(data))
            name, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "":
            if comments is not None:
                comments.append(value)
        elif field == "event":
            name = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


ENDS = {"done", "failed", "canceled"}


def stream_of(api: Harness, path: str, last_event_id: str | None = None) -> list[Event]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with api.http.stream("GET", path, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for event in read_events(response):
            events.append(event)
            if event.name in ENDS:
                break
        return events


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.1)) as harness:
        yield harness


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[Harness]:
    """Each prediction takes 2 s: long enough for the next one to wait."""
    with running_server(tmp_path, model=FakeModel(step_seconds=0.5)) as harness:
        yield harness


def test_a_stream_tells_the_queue_the_start_each_step_and_the_end_with_the_prediction(api: Harness) -> None:
    busy = api.create_id(num_inference_steps=4)  # the worker's job while ours waits
    ours = api.create_id(num_inference_steps=4, seed=5)
    events = stream_of(api, f"/v1/prediction/{ours}/stream")
    names = [event.name for event in events]
    assert names[0] == "queued" and events[0].json() == {"status": "starting", "queue_position": 0}
    started = names.index("started")
    assert set(names[:started]) == {"queued"}
    steps = [event.json() for event in events if event.name == "step"]
    assert steps == [{"step": i, "total": 4} for i in (1, 2, 3, 4)]
    assert names.index("step") > started and names[-1] == "done"
    phases = [event.json()["phase"] for event in events if event.name == "phase"]
    assert all(phase in streams.PHASE_ORDER for phase in phases)
    final = events[-1].json()
    assert final == api.get(ours)  # the end's body is the prediction as GET shows it
    assert final["status"] == "success" and final["output"].startswith(api.url + "/files/")
    ids = [tuple(int(part) for part in event.id.split(".")) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # ordered, each its own
    assert api.get(busy, wait=30)["status"] == "success"


def test_last_event_id_resumes_after_it_without_losing_a_step(api: Harness) -> None:
    prediction = api.create_id(num_inference_steps=4)
    everything = stream_of(api, f"/v1/prediction/{prediction}/stream")
    [second] = [event for event in everything if event.name == "step" and event.json()["step"] == 2]
    resumed = stream_of(api, f"/v1/prediction/{prediction}/stream", last_event_id=second.id)
    assert [(e.name, e.data) for e in resumed if e.name == "step"] == [
        ("step", json.dumps({"step": 3, "total": 4}, separators=(",", ":"))),
        ("step", json.dumps({"step": 4, "total": 4}, separators=(",", ":"))),
    ]
    assert resumed[-1].name == "done"
    # An ended prediction's stream, fresh: its end at once, and nothing after it.
    assert [event.name for event in stream_of(api, f"/v1/prediction/{prediction}/stream")] == ["done"]
    # Resumed after its end: nothing left to tell, and the stream closes.
    with api.http.stream(
        "GET", f"/v1/prediction/{prediction}/stream", headers={"Last-Event-ID": everything[-1].id}
    ) as response:
        assert list(read_events(response)) == []


def test_a_canceled_prediction_s_stream_ends_with_canceled(slow_api: Harness) -> None:
    api = slow_api
    api.create_id(num_inference_steps=4)  # keeps the worker busy
    waiting = api.create_id()
    seen: list[Event] = []

    def follow() -> None:
        with api.http.stream("GET", f"/v1/prediction/{waiting}/stream", timeout=60) as response:
            for event in read_events(response):
                seen.append(event)
                if event.name in ENDS:
                    return

    reader = threading.Thread(target=follow)
    reader.start()
    deadline = time.monotonic() + 10
    while not seen and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # until the stream is open: its first event (queued) came
    assert api.http.post(f"/v1/prediction/{waiting}/cancel").status_code == 200
    reader.join(30)
    assert [event.name for event in seen][-1] == "canceled"
    assert seen[-1].json()["status"] == "cancelled"


def test_streams_are_bounded_per_key_with_a_429_naming_the_limit(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.5), max_streams_per_key=1) as api:
        prediction = api.create_id(num_inference_steps=4)
        path = f"/v1/prediction/{prediction}/stream"
        with api.http.stream("GET", path, timeout=30) as first:
            assert first.status_code == 200
            refused = api.http.get(path)
            assert refused.status_code == 429, refused.text
            body = refused.json()
            assert (body["code"], body["limit"]) == ("too_many_streams", 1)
            assert int(refused.headers["Retry-After"]) >= 1
        # The first one closed: its slot is free again (once the server has seen it go).
        deadline = time.monotonic() + 10
        while api.services.streams.open and time.monotonic() < deadline:
            time.sleep(0.05)
        again = api.http.get(path, timeout=30)  # the job ends meanwhile: the stream ends with it
        assert again.status_code == 200


def test_another_key_s_prediction_has_no_stream(api: Harness) -> None:
    prediction = api.create_id()
    _key, other = api.services.keys.create("someone else")
    response = api.http.get(f"/v1/prediction/{prediction}/stream", headers={"X-API-Key": other})
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert api.http.get("/v1/prediction/nope/stream").status_code == 404


def test_a_quiet_stream_sends_keep_alive_comments(slow_api: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    api = slow_api
    monkeypatch.setattr(streams, "KEEP_ALIVE_SECONDS", 0.2)
    api.create_id(num_inference_steps=4)  # 2 s of work ahead of ours
    waiting = api.create_id()
    comments: list[str] = []
    with api.http.stream("GET", f"/v1/prediction/{waiting}/stream", timeout=60) as response:
        for event in read_events(response, comments):
            if event.name in ENDS:
                break
    assert comments, "no keep-alive comment while the prediction waited"


def test_the_replicate_surface_streams_replicate_s_events(api: Harness) -> None:
    created = api.http.post(
        "/v1/predictions",
        json={
            "version": "black-forest-labs/flux-redux-schnell",
            "input": api.body()["input"],
            "stream": True,
        },
    )
    assert created.status_code == 201, created.text
    prediction = created.json()
    assert prediction["urls"]["stream"] == f"{api.url}/v1/predictions/{prediction['id']}/stream"
    events = stream_of(api, prediction["urls"]["stream"])
    assert {event.name for event in events} <= {"logs", "output", "done"}
    logs = [event.data for event in events if event.name == "logs"]
    assert logs[-1] != "" and any(line.endswith("4/4") for line in logs), logs
    outputs = [event.data for event in events if event.name == "output"]
    done = api.http.get(f"/v1/predictions/{prediction['id']}").json()
    assert outputs == done["output"] and events[-1].name == "done" and events[-1].json() == {}


# --- the Python client ----------------------------------------------------------------------


class CutMidStream(httpx.SyncByteStream):
    """A stream's body that breaks right after the first chunk telling a step."""

    def __init__(self, inner: httpx.SyncByteStream) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            yield chunk
            if b"event: step" in chunk:
                raise httpx.ReadError("the link broke")

    def close(self) -> None:
        self.inner.close()


class CutsTheFirstStream(httpx.BaseTransport):
    """httpx's own transport, but the first stream's connection is lost mid-way."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.resumed_after: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/stream"):
            self.resumed_after.append(request.headers.get("Last-Event-ID"))
            if len(self.resumed_after) == 1:
                assert isinstance(response.stream, httpx.SyncByteStream)
                response.stream = CutMidStream(response.stream)
        return response

    def close(self) -> None:
        self.inner.close()


def test_the_client_streams_typed_events_and_resumes_a_lost_stream_without_a_gap(api: Harness) -> None:
    from fluxredux.client import FluxRedux

    transport = CutsTheFirstStream()
    with FluxRedux(api.url, api.key, transport=transport) as client:
        prediction = client.create(
            {"redux_image": api.body()["input"]["redux_image"], "num_inference_steps": 4}
        )
        events = list(client.stream(prediction))
    assert [event.step for event in events if event.event == "step"] == [1, 2, 3, 4]
    assert len(transport.resumed_after) == 2 and transport.resumed_after[1] is not None  # one reconnect
    end = events[-1]
    assert end.event == "done" and end.ended and end.prediction is not None
    assert end.prediction.status == "success" and end.prediction.id == prediction


def test_the_async_client_streams_the_same_events(api: Harness) -> None:
    import asyncio

    from fluxredux.client import AsyncFluxRedux

    async def follow() -> list[Any]:
        async with AsyncFluxRedux(api.url, api.key) as client:
            prediction = await client.create({"redux_image": api.body()["input"]["redux_image"]})
            return [event async for event in client.stream(prediction)]

    events = asyncio.run(follow())
    assert events[-1].event == "done" and events[-1].prediction.status == "success"
    assert [event.step for event in events if event.event == "step"][-1] == 4


def test_streams_are_bounded_per_node_in_all(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.5), max_streams=1) as api:
        prediction = api.create_id(num_inference_steps=4)
        _key, other = api.services.keys.create("another caller")
        theirs = api.http.post("/v1/prediction/", json=api.body(), headers={"X-API-Key": other}).json()[
            "predictionID"
        ]
        with api.http.stream("GET", f"/v1/prediction/{prediction}/stream", timeout=30) as first:
            assert first.status_code == 200
            refused = api.http.get(f"/v1/prediction/{theirs}/stream", headers={"X-API-Key": other})
            assert refused.status_code == 429 and refused.json()["code"] == "too_many_streams"

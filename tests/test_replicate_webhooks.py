"""Webhooks of the Replicate-compatible surface: Replicate's body, only the events the
receiver asked for (start, output, logs, completed), non-final ones throttled, signed the
Standard Webhooks way, verified here with the ``standardwebhooks`` package as a receiver
would (the secret read from GET /v1/webhooks/default/secret)."""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from fluxredux.pipeline.fake import FakeModel
from tests.cluster import wait_for
from tests.harness import Harness, png_data_uri, running_server
from tests.helpers import webhooks_idle

MODEL = "black-forest-labs/flux-redux-schnell"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def prediction(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)

    def statuses(self) -> list[str]:
        return [d.prediction["status"] for d in self.deliveries]

    def events(self) -> list[str]:
        """Which event each delivery was: its webhook-id is ``<id>`` for the end,
        ``<id>.start`` and ``<id>.logs.<step>`` for the others."""
        return [[*d.headers["webhook-id"].split("."), "completed"][1] for d in self.deliveries]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            record.deliveries.append(Delivery(dict(self.headers.items()), body, time.monotonic()))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield record
    httpd.shutdown()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    """Each step takes 0.2 s; the receiver is on loopback, so private targets are allowed."""
    with running_server(tmp_path, model=FakeModel(step_seconds=0.2), allow_private_urls=True) as harness:
        yield harness


def secret_of(api: Harness) -> str:
    answer = httpx.get(
        f"{api.url}/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {api.key}"}
    )
    return str(answer.json()["key"])


def create(api: Harness, receiver: Receiver, events: list[str] | None, **inputs: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"input": {"redux_image": png_data_uri(), **inputs}, "webhook": receiver.url}
    if events is not None:
        body["webhook_events_filter"] = events
    response = httpx.post(
        f"{api.url}/v1/models/{MODEL}/predictions",
        json=body,
        headers={"Authorization": f"Bearer {api.key}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def finished(api: Harness, prediction_id: str, receiver: Receiver, deliveries: int) -> None:
    """The prediction ended, its end was delivered, and nothing more can arrive: every
    delivery enqueued by then (its events came before its end) is final, none in flight."""
    assert api.wait_status(prediction_id, {"success", "error", "cancelled"})["status"] != "processing"
    wait_for(lambda: len(receiver.deliveries) >= deliveries, 10, lambda: f"got {receiver.statuses()}")

    def end_recorded() -> bool:
        job = api.services.store.get(prediction_id)
        return job is not None and job.webhook_state in {"delivered", "failed"}

    wait_for(end_recorded, 10, lambda: f"its end was never delivered; got {receiver.statuses()}")
    wait_for(lambda: webhooks_idle(api.services.webhooks), 10, "the webhook sender never went idle")


def test_the_official_client_with_completed_only_gets_one_verified_delivery(
    api: Harness, receiver: Receiver
) -> None:
    replicate = pytest.importorskip("replicate")
    client = replicate.Client(api_token=api.key, base_url=api.url)
    prediction = client.predictions.create(
        model=MODEL,
        input={"redux_image": png_data_uri(), "num_outputs": 2},
        webhook=receiver.url,
        webhook_events_filter=["completed"],
    )
    finished(api, prediction.id, receiver, 1)

    [delivery] = receiver.deliveries
    verified = Webhook(secret_of(api)).verify(delivery.body, delivery.headers)
    assert verified["id"] == prediction.id and verified["status"] == "succeeded"
    assert len(verified["output"]) == 2 and verified["model"] == MODEL
    assert delivery.headers["webhook-id"] == prediction.id
    assert delivery.headers["webhook-signature"].startswith("v1,")
    assert "X-FluxRedux-Signature" not in delivery.headers  # that is the Eachlabs surface's
    # What a forged or altered delivery gets from the same check.
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_of(api)).verify(delivery.body.replace(b"succeeded", b"failed"), delivery.headers)
    # The prediction shows its webhook as delivered on the other surface too.
    assert api.services.store.get(prediction.id).webhook_state == "delivered"  # type: ignore[union-attr]


def test_start_and_completed_only(api: Harness, receiver: Receiver) -> None:
    prediction = create(api, receiver, ["start", "completed"])
    finished(api, prediction["id"], receiver, 2)
    assert sorted(receiver.events()) == ["completed", "start"]  # no logs events
    # Each body is the prediction as it was when the delivery went out.
    assert receiver.statuses()[receiver.events().index("completed")] == "succeeded"
    assert receiver.statuses()[receiver.events().index("start")] in {"starting", "processing"}
    secret = secret_of(api)
    ids = {Webhook(secret).verify(d.body, d.headers)["id"] for d in receiver.deliveries}
    assert ids == {prediction["id"]}
    assert {d.headers["webhook-id"] for d in receiver.deliveries} == {
        prediction["id"],
        f"{prediction['id']}.start",
    }


def test_every_event_by_default_the_logs_ones_throttled(api: Harness, receiver: Receiver) -> None:
    """Four steps 0.2 s apart: unthrottled, four logs events; at most one non-final event
    per 0.5 s leaves one (two if this machine is slow)."""
    prediction = create(api, receiver, None, num_inference_steps=4)
    finished(api, prediction["id"], receiver, 3)
    secret = secret_of(api)
    bodies = [Webhook(secret).verify(d.body, d.headers) for d in receiver.deliveries]
    names = receiver.events()
    assert sorted(set(names)) == ["completed", "logs", "start"] and names.count("start") == 1
    assert names.count("completed") == 1 and bodies[names.index("completed")]["status"] == "succeeded"
    logs = [body for body, name in zip(bodies, names, strict=True) if name == "logs"]
    assert 1 <= len(logs) <= 2, [e["logs"] for e in logs]
    running = [event for event in logs if event["status"] == "processing"]  # as it was when sent
    assert running, logs
    for event in running:  # the progress, as Replicate's models log it (the client parses it)
        assert "%|" in event["logs"] and event["logs"].rstrip().endswith("/4")
    non_final = sorted(
        d.at for d, name in zip(receiver.deliveries, names, strict=True) if name != "completed"
    )
    assert all(b - a > 0.25 for a, b in itertools.pairwise(non_final)), non_final


def test_output_only_is_sent_when_it_succeeds_and_not_when_cancelled(
    api: Harness, receiver: Receiver
) -> None:
    succeeded = create(api, receiver, ["output"])
    finished(api, succeeded["id"], receiver, 1)
    assert receiver.statuses() == ["succeeded"]
    assert receiver.deliveries[0].prediction["output"]

    cancelled = create(api, receiver, ["output"])
    httpx.post(
        f"{api.url}/v1/predictions/{cancelled['id']}/cancel", headers={"Authorization": f"Bearer {api.key}"}
    )
    assert api.wait_status(cancelled["id"], {"cancelled"})["status"] == "cancelled"
    # Anything wrongly sent for the cancelled one was enqueued before a later prediction's
    # end: it has arrived once that end is delivered and nothing is pending or in flight.
    later = create(api, receiver, ["output"])
    finished(api, later["id"], receiver, 2)
    assert receiver.statuses() == ["succeeded", "succeeded"]  # nothing for the cancelled one
    assert [d.prediction["id"] for d in receiver.deliveries] == [succeeded["id"], later["id"]]
    assert api.services.store.get(cancelled["id"]).webhook_state is None  # type: ignore[union-attr]


def test_a_bad_events_filter_is_a_422_naming_it(api: Harness, receiver: Receiver) -> None:
    response = httpx.post(
        f"{api.url}/v1/predictions",
        json={
            "input": {"redux_image": png_data_uri()},
            "webhook": receiver.url,
            "webhook_events_filter": ["end"],
        },
        headers={"Authorization": f"Bearer {api.key}"},
    )
    assert response.status_code == 422
    assert response.json()["fields"][0]["field"].startswith("webhook_events_filter")


def test_the_eachlabs_surface_keeps_its_body_and_signature(api: Harness, receiver: Receiver) -> None:
    from fluxredux.webhooks.signing import verify

    body = api.body() | {"webhook_url": receiver.url, "webhook_secret": "s3cret"}
    prediction_id = api.http.post("/v1/prediction/", json=body).json()["predictionID"]
    finished(api, prediction_id, receiver, 1)
    [delivery] = receiver.deliveries  # the end only, as before
    headers = delivery.headers
    assert delivery.prediction["status"] == "success" and "webhook-signature" not in headers
    assert verify("s3cret", headers["X-FluxRedux-Timestamp"], delivery.body, headers["X-FluxRedux-Signature"])

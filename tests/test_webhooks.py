"""Webhooks: delivered on terminal states, signed, retried, never in the prediction's way."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fluxredux.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from tests.harness import Harness, running_server


@dataclass
class Receiver:
    url: str
    answers: list[int]  # status per delivery, in order; then 200
    delay: float = 0.0
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver(url="", answers=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            record.deliveries.append(({k: v for k, v in self.headers.items()}, body))
            time.sleep(record.delay)
            status = record.answers.pop(0) if record.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            if status == 200:
                record.arrived.set()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield record
    httpd.shutdown()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    # The receiver lives on loopback, so this server allows private webhook targets.
    with running_server(tmp_path, allow_private_urls=True, webhook_first_delay_seconds=0.05) as harness:
        yield harness


def create_with_hook(api: Harness, url: str, secret: str | None = "s3cret", **inputs: object) -> str:
    body = api.body(**inputs) | {"webhook_url": url}
    if secret:
        body["webhook_secret"] = secret
    response = api.http.post("/v1/prediction/", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["predictionID"])


def test_webhook_is_received_and_its_signature_verifies(api: Harness, receiver: Receiver) -> None:
    prediction_id = create_with_hook(api, receiver.url)
    assert receiver.arrived.wait(10)
    headers, body = receiver.deliveries[-1]
    payload = json.loads(body)
    assert (payload["id"], payload["status"]) == (prediction_id, "success")
    assert payload["output"].startswith("http://127.0.0.1:")
    assert headers[DELIVERY_HEADER] == prediction_id
    assert verify("s3cret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("wrong", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("s3cret", headers[TIMESTAMP_HEADER], body + b" ", headers[SIGNATURE_HEADER])
    deadline = time.monotonic() + 5
    while api.services.store.get(prediction_id).webhook_state != "delivered":  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_webhook_is_retried_after_a_receiver_error(api: Harness, receiver: Receiver) -> None:
    receiver.answers = [500, 503]
    create_with_hook(api, receiver.url)
    assert receiver.arrived.wait(10)
    assert len(receiver.deliveries) == 3
    bodies = {body for _headers, body in receiver.deliveries}
    assert len(bodies) == 1  # the same prediction each time


def test_a_failing_receiver_never_delays_the_prediction(api: Harness, receiver: Receiver) -> None:
    receiver.delay = 2.0
    receiver.answers = [500] * 10
    prediction_id = create_with_hook(api, receiver.url)
    started = time.monotonic()
    assert api.get(prediction_id, wait=10)["status"] == "success"
    assert time.monotonic() - started < 1.5
    # and the API stays responsive while deliveries hang
    assert api.http.get("/health").status_code == 200


def test_cancelled_predictions_are_delivered_too(tmp_path: Path, receiver: Receiver) -> None:
    with running_server(tmp_path, run_worker=False, allow_private_urls=True) as api:
        prediction_id = create_with_hook(api, receiver.url, secret=None)
        api.http.post(f"/v1/prediction/{prediction_id}/cancel")
        assert receiver.arrived.wait(10)
    headers, body = receiver.deliveries[-1]
    assert json.loads(body)["status"] == "cancelled"
    assert SIGNATURE_HEADER not in headers  # no secret anywhere: sent unsigned


def test_a_loopback_webhook_is_refused_at_create(tmp_path: Path, receiver: Receiver) -> None:
    """Refused when the prediction is created, naming the field, not silently dropped later."""
    with running_server(tmp_path, webhook_first_delay_seconds=0.05) as api:
        body = api.body() | {"webhook_url": receiver.url}
        response = api.http.post("/v1/prediction/", json=body)
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["field"] == "webhook_url" and error["code"] == "url_not_public"
        assert "loopback" in error["error"]
        assert api.services.lifecycle.queue_depth() == 0 and api.services.store.find() == []
        for url in ("http://10.0.0.1/hook", "http://[::1]:9/hook", "ftp://example.com/hook"):
            refused = api.http.post("/v1/prediction/", json=api.body() | {"webhook_url": url})
            assert refused.status_code == 400 and refused.json()["field"] == "webhook_url", refused.text
    assert receiver.deliveries == []


def test_sign_is_hmac_sha256_over_timestamp_and_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"123.{}", hashlib.sha256).hexdigest()
    assert sign("k", "123", b"{}") == f"v1={expected}"


def test_pending_deliveries_resume_after_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    """A webhook that was due when the server stopped is sent when it starts again."""
    from fluxredux.jobs import Job, SQLiteJobStore, Status, new_id

    (tmp_path / "data").mkdir()
    store = SQLiteJobStore(tmp_path / "data" / "fluxredux.db")
    job = Job(
        id=new_id(), owner="k", input={"num_outputs": 1}, created_at=time.time() - 5, status=Status.CANCELED,
        completed_at=time.time() - 4, webhook_url=receiver.url, webhook_state="pending",
    )  # fmt: skip
    store.insert(job)
    store.close()
    with running_server(tmp_path, run_worker=False, allow_private_urls=True):
        assert receiver.arrived.wait(10)
    assert json.loads(receiver.deliveries[-1][1])["id"] == job.id

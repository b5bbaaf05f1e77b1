"""Webhooks: delivered on terminal states, signed, retried, never in the prediction's way;
delivered once by whichever API process claims them, resumed where they were after a restart."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.backends.sqlite.outbox import SQLiteWebhookOutbox
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, new_id
from fluxredux.net import FetchPolicy, SafeFetcher
from fluxredux.webhooks.sender import WebhookPolicy, WebhookSender
from fluxredux.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from tests.harness import Harness, running_server
from tests.helpers import wait_until_async, webhooks_idle
from tests.test_jobs import FakeClock


@dataclass
class Receiver:
    url: str
    answers: list[int]  # status per delivery, in order; then 200
    delay: float = 0.0
    delays: list[float] = field(default_factory=list)  # per delivery, in order; then ``delay``
    # Per delivery, in order: its answer waits until the test sets the event (30 s at most).
    holds: list[threading.Event] = field(default_factory=list)
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each delivery arrived (time.time())
    answered: list[tuple[str, int]] = field(default_factory=list)  # (delivery id, status), as answered
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver(url="", answers=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            record.times.append(time.time())
            record.deliveries.append(({k: v for k, v in self.headers.items()}, body))
            # Both chosen on arrival: a slow answer must not take a later delivery's status.
            delay = record.delays.pop(0) if record.delays else record.delay
            status = record.answers.pop(0) if record.answers else 200
            hold = record.holds.pop(0) if record.holds else None
            time.sleep(delay)
            if hold is not None:
                hold.wait(30)
            record.answered.append((self.headers[DELIVERY_HEADER], status))
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
    from fluxredux.jobs.job import Status

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


# -- the outbox: one delivery per prediction, claimed by one sweeper at a time -----------


def ended_job(db: Path, url: str) -> Job:
    """A prediction with a webhook that has just ended (cancelled while queued), as any
    process (a worker, another API node) would end it: through the lifecycle."""
    store = SQLiteJobStore(db)
    lifecycle = Lifecycle(store)
    job = lifecycle.create(
        Job(id=new_id(), owner="k", input={"num_outputs": 1}, created_at=time.time(), webhook_url=url)
    )
    ended = lifecycle.cancel(job.id)
    store.close()
    assert ended is not None and ended.webhook_state == "pending"
    return ended


class CountingSender(WebhookSender):
    """A sweeper of its own (own store connections, as another API process) that counts its tries."""

    def __init__(self, db: Path, **policy: float) -> None:
        super().__init__(
            SQLiteJobStore(db),
            SQLiteWebhookOutbox(db),
            WebhookPolicy(**{"first_delay": 0.05, **policy}),  # type: ignore[arg-type]
            SafeFetcher(FetchPolicy(allow_private=True)),  # the receiver is on loopback
            lambda job: {"id": job.id, "status": job.status.value},
        )
        self.tries = 0
        self.looks: list[float] = []  # each sweep's answer: how long until its next look

    async def sweep(self) -> float:
        wait = await super().sweep()
        self.looks.append(wait)
        return wait

    async def _post(self, *args: object, **kwargs: object) -> bool:
        self.tries += 1
        return await super()._post(*args, **kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.aclose()
        await self.fetcher.aclose()
        self.store.close()
        self.outbox.close()


async def wait_for_state(db: Path, job_ids: list[str], state: str, timeout: float = 15) -> None:
    store = SQLiteJobStore(db)
    try:
        deadline = time.monotonic() + timeout
        while any(store.get(i).webhook_state != state for i in job_ids):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, [store.get(i).webhook_state for i in job_ids]  # type: ignore[union-attr]
            await asyncio.sleep(0.02)
    finally:
        store.close()


def test_two_sweepers_deliver_each_webhook_exactly_once(tmp_path: Path, receiver: Receiver) -> None:
    """Two API processes on one database both see every job end and both sweep: each
    prediction is received once with success (after its failed tries), never again."""
    db = tmp_path / "jobs.db"
    receiver.delay = 0.03
    receiver.answers = [500, 200, 503] * 6  # some tries fail and are retried, interleaved
    jobs = [ended_job(db, receiver.url) for _ in range(30)]

    async def main() -> tuple[int, int]:
        one, two = CountingSender(db, concurrency=4), CountingSender(db, concurrency=4)
        try:
            one.start()
            two.start()
            for job in jobs:  # every process sees every terminal event
                await one.enqueue(job)
                await two.enqueue(job)
            await wait_for_state(db, [job.id for job in jobs], "delivered")
            # Every record final and no try in flight: nothing more can arrive from either.
            await wait_until_async(lambda: webhooks_idle(one, two), 15, "the sweepers never went idle")
            return one.tries, two.tries
        finally:
            await one.close()
            await two.close()

    tries = asyncio.run(main())
    assert all(tries), tries  # both swept
    assert sum(tries) == len(receiver.deliveries)
    for job in jobs:
        mine = [status for delivery, status in receiver.answered if delivery == job.id]
        assert mine.count(200) == 1 and mine[-1] == 200, mine  # delivered once, then never again


def test_a_sweeper_whose_claim_ran_out_cannot_record_over_the_new_owner(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A try slower than its claim's lease: another sweeper takes the delivery over and
    delivers it; the slow try's late failure is not recorded over that."""
    db = tmp_path / "jobs.db"
    slow_answer = threading.Event()
    receiver.holds = [slow_answer]  # the first try hangs past the lease (until the other delivered)...
    receiver.answers = [500]  # ...then fails
    job = ended_job(db, receiver.url)

    async def main() -> None:
        slow = CountingSender(db, claim_seconds=0.3)
        other = CountingSender(db, claim_seconds=0.3, poll_seconds=0.05)
        try:
            await slow.enqueue(job)
            await slow.sweep()  # one claim, its try under way; this sweeper never sweeps again
            await wait_until_async(lambda: receiver.deliveries, 15, "the slow try never reached the receiver")
            assert len(receiver.deliveries) == 1
            other.start()
            await wait_for_state(db, [job.id], "delivered")
            slow_answer.set()  # the slow try's 500 comes back; its retry is refused
            await wait_until_async(lambda: not slow._sending, 15, "the slow try never ended")
            # Its record final, no try in flight: nothing more can arrive.
            await wait_until_async(lambda: webhooks_idle(slow, other), 15, "the sweepers never went idle")
            record = other.outbox.get(job.id)
            assert record is not None and (record.state, record.attempts) == ("delivered", 2)
        finally:
            slow_answer.set()
            await slow.close()
            await other.close()

    asyncio.run(main())
    assert receiver.answered == [(job.id, 200), (job.id, 500)]  # in the order answered
    assert len(receiver.deliveries) == 2


def test_the_first_try_goes_out_as_soon_as_the_job_ends(tmp_path: Path, receiver: Receiver) -> None:
    """A terminal event in this process wakes the sweeper: no waiting for its next look."""
    db = tmp_path / "jobs.db"

    async def main() -> float:
        sender = CountingSender(db, poll_seconds=30)
        try:
            sender.start()
            # Its first look found nothing due: asleep until its next look, 30 s away.
            await wait_until_async(lambda: sender.looks, 15, "the sweeper never looked at the outbox")
            assert sender.looks == [30]
            job = ended_job(db, receiver.url)
            ended = time.monotonic()
            await sender.enqueue(job)
            while not receiver.arrived.is_set():
                assert time.monotonic() - ended < 5
                await asyncio.sleep(0.01)
            return time.monotonic() - ended
        finally:
            await sender.close()

    assert asyncio.run(main()) < 1.0


def test_a_job_that_ended_while_no_api_process_ran_is_delivered_when_one_starts(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Nothing enqueued it (no API process saw it end): its pending mark is enough."""
    (tmp_path / "data").mkdir()
    job = ended_job(tmp_path / "data" / "fluxredux.db", receiver.url)
    with running_server(tmp_path, run_worker=False, allow_private_urls=True) as api:
        assert receiver.arrived.wait(10)
        asyncio.run(wait_for_state(api.services.settings.database_path, [job.id], "delivered"))
    assert [json.loads(body)["id"] for _headers, body in receiver.deliveries] == [job.id]


def test_a_restart_resumes_a_delivery_mid_backoff_at_its_stored_time(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Four tries made and the fifth due soon when the server stopped: after a restart the
    fifth goes out at its time, not at once, and only the sixth follows."""
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "fluxredux.db"
    job = ended_job(db, receiver.url)
    clock = FakeClock(time.time())
    outbox = SQLiteWebhookOutbox(db, clock=clock)
    outbox.enqueue(job.id, receiver.url)
    for _ in range(3):
        [claimed] = outbox.claim_due("the-server-before", 60, 1)
        assert outbox.retry(claimed, 0.0) is not None
    due = time.time() + 1.5
    [claimed] = outbox.claim_due("the-server-before", 60, 1)
    assert claimed.attempts == 4
    outbox.retry(claimed, due - clock.now)
    outbox.close()
    receiver.answers = [500] * 10
    with running_server(
        tmp_path, run_worker=False, allow_private_urls=True, webhook_first_delay_seconds=0.05
    ) as api:
        asyncio.run(wait_for_state(api.services.settings.database_path, [job.id], "failed"))
    assert len(receiver.deliveries) == 2  # tries 5 and 6 of 6
    assert receiver.times[0] >= due - 0.05  # (receiver stamps whole requests; clocks are the same)


def test_an_outcome_recorded_before_a_crash_is_not_sent_again(tmp_path: Path, receiver: Receiver) -> None:
    """The process died after recording the delivery, before marking the job: the next
    one marks the job from the record, and sends nothing."""
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "fluxredux.db"
    job = ended_job(db, receiver.url)
    outbox = SQLiteWebhookOutbox(db)
    outbox.enqueue(job.id, receiver.url)
    [claimed] = outbox.claim_due("the-server-before", 60, 1)
    assert outbox.succeeded(claimed) is not None
    outbox.close()
    with running_server(tmp_path, run_worker=False, allow_private_urls=True) as api:
        asyncio.run(wait_for_state(api.services.settings.database_path, [job.id], "delivered"))
    assert receiver.deliveries == []

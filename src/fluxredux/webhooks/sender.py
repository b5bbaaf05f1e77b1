"""Webhook delivery: on a terminal state, POST the prediction to its webhook_url.

Eachlabs surface: the Eachlabs body, signed ``X-FluxRedux-Signature: v1=<hex
HMAC-SHA256(secret, "<timestamp>.<body>")>`` with ``X-FluxRedux-Timestamp: <unix
seconds>`` and ``X-FluxRedux-Delivery: <prediction id>``. The secret is the request's
``webhook_secret``, else the server's ``FLUXREDUX_WEBHOOK_SECRET``; with neither, the
request is sent unsigned.

Replicate surface (``job.surface == "replicate"``): Replicate's body, signed the Standard
Webhooks way (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; see
fluxredux.webhooks.signing) with the job's secret, always set for these jobs. Its
``webhook_events`` choose what is sent: ``completed`` (the end, as above), ``output``
(this model's output appears at the end: the end is sent when it succeeded), and two
non-final events, each its own outbox record with its own id
(``<prediction id>.<event>[.<step>]``) and tried once only (a later event or the end
carries newer news anyway): ``start`` when the prediction is created, ``logs`` when its
run progresses (a step done), at most one non-final event per ``EVENT_INTERVAL_SECONDS``
per prediction (throttled by each API process; the record ids keep two nodes from sending
the same step twice).

Tried up to ``attempts`` times, the second try ``first_delay`` after the first, each wait
twice the one before, on any non-2xx answer, network error or timeout. Delivery runs
beside the predictions, never in their way: the job is finished before its webhook is
sent, and a receiver is only ever waited for by the sweeper's own tasks.

Why no delivery is lost: a job's terminal transition marks it ``webhook_state =
"pending"`` in the very write that ends it (``transitions.transition``), whoever ends it
(a worker on any machine, a cancel, recovery). From then on the pending mark stays until
the outcome is recorded, and every API process turns pending jobs into outbox records
(``enqueue_pending``: when its sweeper starts and every maintenance round; and at once
for the terminal events it sees). So a process dying right after a job ends, or no API
process running at all then, only delays the delivery until the next sweeper runs.

Why none is doubled (within what HTTP allows): each prediction has one outbox record
(``enqueue`` is idempotent), and a try is made only by the holder of an atomic, leased
claim on it; outcomes are recorded fenced by that claim, and the record is final before
the job's ``webhook_state`` mirrors it (a crash in between is repaired by the next
``enqueue_pending``, which finds the final record instead of enqueueing again).

At least once, still: a try whose outcome is never recorded (the process died or the
store failed after the receiver got it, or a receiver slower than the claim's lease) is
made again after the lease. Receivers should treat ``X-FluxRedux-Delivery`` (the
prediction id) as an idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from fluxredux.errors import FetchRefused, StoreUnavailable
from fluxredux.jobs.job import REPLICATE, Job, Status
from fluxredux.jobs.outbox import Delivery, WebhookOutbox
from fluxredux.jobs.store import JobStore
from fluxredux.net import SafeFetcher, check_url_shape
from fluxredux.webhooks.signing import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    signed_headers,
)

log = logging.getLogger(__name__)

# Final records are deleted after ``keep_seconds``; looked for this often.
FORGET_INTERVAL_SECONDS = 600.0
# At most one non-final event (start, logs) per prediction this often.
EVENT_INTERVAL_SECONDS = 0.5
# Beyond this many predictions remembered for throttling, the memory starts afresh.
_MAX_THROTTLED = 10_000

Outcome = Literal["delivered", "retry", "failed"]


def event_delivery_id(job_id: str, event: str, step: int | None = None) -> str:
    """The outbox id of a non-final event: never a prediction id (ids have no dots)."""
    return f"{job_id}.{event}" if step is None else f"{job_id}.{event}.{step}"


def job_id_of(delivery_id: str) -> str:
    return delivery_id.split(".", 1)[0]


def is_final(delivery_id: str) -> bool:
    """The end of a prediction (its id alone), not one of its non-final events."""
    return "." not in delivery_id


@dataclass(frozen=True)
class WebhookPolicy:
    attempts: int = 6
    first_delay: float = 1.0  # then 2, 4, 8, 16 s
    timeout: float = 10.0  # per phase of a try (connect, send, answer); a try is cut at 3 times that
    server_secret: str | None = None
    concurrency: int = 16  # deliveries one process sends at once
    # A claim's lease: longer than the longest try (3 timeouts), or a slow try would be
    # taken over and made twice.
    claim_seconds: float = 60.0
    # How often the outbox is looked at besides the wake-ups: what other processes
    # enqueued, or left when they died, is due within this much of its time.
    poll_seconds: float = 1.0
    keep_seconds: float = 7 * 24 * 3600.0  # final records (as long as the predictions)

    def delay_after(self, attempts: int) -> float:
        """The wait after the ``attempts``-th try failed."""
        return float(self.first_delay * 2 ** (attempts - 1))


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class WebhookSender:
    """One process's sweeper of the shared outbox, and the sender of what it claims."""

    def __init__(
        self,
        store: JobStore,
        outbox: WebhookOutbox,
        policy: WebhookPolicy,
        fetcher: SafeFetcher,
        render: Callable[[Job], dict[str, Any]],
        *,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.policy = policy
        self.fetcher = fetcher  # its address rules apply to webhook targets too
        self.render = render
        self.owner = owner or _owner_id()  # names this sweeper's claims
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout)
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False  # set by aclose: the sweeper's loop ends even if a cancel is lost
        self._sending: set[asyncio.Task[None]] = set()
        self._last_forget = float("-inf")
        self._last_event: dict[str, float] = {}  # job id -> when its last non-final event went out
        self._no_logs: set[str] = set()  # running jobs read once and found to want no logs events
        # Running jobs being read now for their logs event -> whether a change came meanwhile.
        self._reading: dict[str, bool] = {}

    # -- enqueueing -------------------------------------------------------------------

    async def enqueue(self, job: Job) -> None:
        """A job that just ended, seen by this process: its delivery, due now, sent promptly.
        Idempotent (every process seeing the event may call it)."""
        self._last_event.pop(job.id, None)  # no more non-final events
        self._no_logs.discard(job.id)
        if job.webhook_state != "pending" or not job.webhook_url:
            return
        try:
            [delivery] = await asyncio.to_thread(self._enqueue_all, [job])
        except StoreUnavailable as exc:  # still marked pending on the job: the next round enqueues it
            log.warning("webhook for %s not enqueued now: %s", job.id, exc.message)
            return
        await self._after_enqueue([delivery])

    async def queued(self, job: Job) -> None:
        """A job this process just queued: its ``start`` event, if its receiver asked for
        it. One that wants no ``logs`` events is noted as such, so that its claim and steps
        are not even read for one (another process reads it once, at its first step)."""
        if not job.webhook_url or "logs" not in job.webhook_events:
            self._no_logs.add(job.id)
        await self.enqueue_event(job, "start")

    async def enqueue_event(self, job: Job, event: str, step: int | None = None) -> None:
        """A non-final event of ``job`` (``start``, ``logs``) if its receiver asked for it and
        none went out in the last ``EVENT_INTERVAL_SECONDS``; idempotent per (event, step)."""
        if not job.webhook_url or event not in job.webhook_events or self._throttled(job.id):
            return
        self._last_event[job.id] = time.monotonic()
        try:
            delivery = await asyncio.to_thread(
                self.outbox.enqueue, event_delivery_id(job.id, event, step), job.webhook_url
            )
        except StoreUnavailable as exc:  # best effort: the next event, or the end, says more
            log.info("webhook %s event for %s not enqueued: %s", event, job.id, exc.message)
            return
        if delivery.state == "pending":
            self.wake()

    def _throttled(self, job_id: str) -> bool:
        last = self._last_event.get(job_id)
        return last is not None and time.monotonic() - last < EVENT_INTERVAL_SECONDS

    def ignores_progress(self, job_id: str) -> bool:
        """Whether a change of running ``job_id`` can be let go without a look: it wants no
        ``logs`` events (known), or one went out too recently. On the event loop, no I/O: the
        caller spares a task per step of every job without a progress webhook."""
        return job_id in self._no_logs or self._throttled(job_id)

    async def progressed(self, job_id: str) -> None:
        """A running job changed (a worker claimed it, or finished a step): a ``logs`` event
        for receivers that want one. Throttled before the job is even read: this is called
        for every step of every job. One read at a time per job: the changes that arrive
        during a read are coalesced into one more read after it (a fast model's steps come
        faster than a read, and each read is a thread hop on this busy process)."""
        if self.ignores_progress(job_id):
            return
        if job_id in self._reading:  # one read at a time per job; it reads once more after
            self._reading[job_id] = True
            return
        if len(self._last_event) + len(self._no_logs) > _MAX_THROTTLED:  # jobs whose end was never seen
            self._last_event.clear()
            self._no_logs.clear()
        self._reading[job_id] = False
        try:
            while not self.ignores_progress(job_id):
                self._reading[job_id] = False
                await self._logs_event(job_id)
                if not self._reading[job_id]:  # no change arrived during that read
                    return
        finally:
            del self._reading[job_id]

    async def _logs_event(self, job_id: str) -> None:
        try:
            job = await asyncio.to_thread(self.store.get, job_id)
        except StoreUnavailable:
            return
        if job is None:
            return
        if not job.webhook_url or "logs" not in job.webhook_events:
            self._no_logs.add(job_id)  # its other steps are not even read
        elif job.status == Status.PROCESSING and job.progress_step > 0:
            await self.enqueue_event(job, "logs", job.progress_step)

    async def enqueue_pending(self) -> None:
        """Every job marked pending gets its delivery: what ended while no API process ran,
        or whose enqueue failed. Also mirrors outcomes onto jobs whose mirroring failed,
        and forgets old final records."""
        try:
            jobs = await asyncio.to_thread(self.store.find, webhook_state="pending")
            deliveries = await asyncio.to_thread(self._enqueue_all, [j for j in jobs if j.webhook_url])
            if time.monotonic() - self._last_forget > FORGET_INTERVAL_SECONDS:
                await asyncio.to_thread(self._forget)
                self._last_forget = time.monotonic()
        except StoreUnavailable as exc:
            log.warning("pending webhooks not enqueued now: %s", exc.message)
            return
        await self._after_enqueue(deliveries)

    def _enqueue_all(self, jobs: list[Job]) -> list[Delivery]:
        # Read before writing: most pending jobs already have their record (being sent).
        return [self.outbox.get(job.id) or self.outbox.enqueue(job.id, job.webhook_url or "") for job in jobs]

    def _forget(self) -> None:
        self.outbox.forget(self.outbox.now() - self.policy.keep_seconds)

    async def _after_enqueue(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.state != "pending" and is_final(delivery.prediction_id):  # sent, its job not told
                await self._mirror(delivery)
        if any(d.state == "pending" for d in deliveries):
            self.wake()

    # -- sweeping ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the sweeper on the running event loop until ``aclose``."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def wake(self) -> None:
        """Look at the outbox now (something may be due)."""
        self._wake.set()

    async def _sweep_forever(self) -> None:
        try:
            await self.enqueue_pending()  # what ended while no API process ran
        except Exception:  # maintenance enqueues them again every round
            log.exception("enqueueing pending webhooks failed")
        while not self._closing:
            self._wake.clear()  # before looking: a wake-up during the sweep is kept
            try:
                wait = await self.sweep()
            except Exception:
                log.exception("webhook sweep failed")
                wait = self.policy.poll_seconds
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns normally when a cancel
            # lands in the turn the wake-up does (CPython gh-86296), and aclose never returned.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def sweep(self) -> float:
        """Claim what is due, as many as there are free sending slots, and start sending
        it; how long until the next look (the next due time, at most ``poll_seconds``)."""
        free = self.policy.concurrency - len(self._sending)
        if free <= 0:
            return self.policy.poll_seconds  # a finishing send wakes the sweeper
        try:
            claimed, due_in = await asyncio.to_thread(self._claim, free)
        except StoreUnavailable as exc:
            log.warning("webhooks not swept now: %s", exc.message)
            return self.policy.poll_seconds
        for delivery in claimed:
            task = asyncio.get_running_loop().create_task(self._send(delivery))
            self._sending.add(task)
            task.add_done_callback(self._sent)
        if due_in is None:
            return self.policy.poll_seconds
        return min(self.policy.poll_seconds, max(due_in, 0.01))

    def _claim(self, limit: int) -> tuple[list[Delivery], float | None]:
        claimed = self.outbox.claim_due(self.owner, self.policy.claim_seconds, limit)
        next_due = self.outbox.next_due()
        return claimed, None if next_due is None else next_due - self.outbox.now()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self.wake()  # a slot is free, and a retry may be due sooner than the next poll

    # -- sending one claimed delivery -------------------------------------------------

    async def _send(self, claimed: Delivery) -> None:
        try:
            outcome = await self._try(claimed)
        except Exception:  # a bug must not leave the claim to run out: record a failed try
            log.exception("webhook for %s failed unexpectedly", claimed.prediction_id)
            outcome = "retry" if claimed.attempts < self.policy.attempts else "failed"
        try:
            recorded = await asyncio.to_thread(self._record, claimed, outcome)
        except StoreUnavailable as exc:  # the claim runs out and the delivery is tried again
            log.warning("webhook for %s: outcome not recorded: %s", claimed.prediction_id, exc.message)
            return
        if recorded is None:
            log.warning(
                "webhook for %s: its claim was taken over (slower than %g s); outcome not recorded",
                claimed.prediction_id,
                self.policy.claim_seconds,
            )
        elif recorded.state != "pending":
            log.info("webhook for %s %s", claimed.prediction_id, recorded.state)
            if is_final(recorded.prediction_id):  # an event's outcome is not the job's to show
                await self._mirror(recorded)

    def _record(self, claimed: Delivery, outcome: Outcome) -> Delivery | None:
        if outcome == "delivered":
            return self.outbox.succeeded(claimed)
        if outcome == "retry":
            return self.outbox.retry(claimed, self.policy.delay_after(claimed.attempts))
        return self.outbox.failed(claimed)

    async def _try(self, claimed: Delivery) -> Outcome:
        attempts = self.policy.attempts if is_final(claimed.prediction_id) else 1  # events: one try
        retry: Outcome = "retry" if claimed.attempts < attempts else "failed"
        if claimed.attempts > attempts:
            return "failed"  # the last try's claim ran out unrecorded (its process died mid-send)
        try:
            job = await asyncio.to_thread(self.store.get, job_id_of(claimed.prediction_id))
        except StoreUnavailable as exc:
            log.warning(
                "webhook for %s: the prediction cannot be read: %s", claimed.prediction_id, exc.message
            )
            return retry
        if job is None:
            return "failed"  # deleted (past retention): nothing left to send
        body = json.dumps(self.render(job), separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(3 * self.policy.timeout):
                sent = await self._post(claimed, body, self._signature(job, claimed, body))
        except FetchRefused as exc:
            log.warning("webhook for %s refused: %s", job.id, exc.message)
            return "failed"  # the target itself is not allowed: retrying cannot help
        except TimeoutError:
            log.info("webhook for %s: no answer within %g s", job.id, 3 * self.policy.timeout)
            return retry
        return "delivered" if sent else retry

    def _signature(self, job: Job, delivery: Delivery, body: bytes) -> dict[str, str]:
        """The headers that identify and sign this try, in the job's surface's way."""
        now = time.time()
        if job.surface == REPLICATE:
            # webhook-id: the delivery's id, the same on every try of it (receivers dedupe by it).
            return (
                signed_headers(job.webhook_secret, delivery.prediction_id, body, now)
                if job.webhook_secret
                else {}
            )
        timestamp = str(int(now))
        headers = {TIMESTAMP_HEADER: timestamp, DELIVERY_HEADER: delivery.prediction_id}
        secret = job.webhook_secret or self.policy.server_secret
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        return headers

    async def _post(self, delivery: Delivery, body: bytes, signature: dict[str, str]) -> bool:
        url = check_url_shape(delivery.url)
        ip = await self.fetcher.checked_address(url)
        headers = {"Content-Type": "application/json", "Host": url.netloc.decode("ascii"), **signature}
        try:
            response = await self._client.post(
                url.copy_with(host=str(ip)),
                content=body,
                headers=headers,
                extensions={"sni_hostname": url.host},
            )
        except httpx.HTTPError as exc:
            log.info("webhook for %s: %s", delivery.prediction_id, type(exc).__name__)
            return False
        return response.is_success

    async def _mirror(self, delivery: Delivery) -> None:
        """The final state onto the job (what the API shows). If this fails, the job stays
        pending and the next ``enqueue_pending`` finds the final record and tries again."""
        state = delivery.state

        def settle(job: Job) -> Job | None:
            if job.webhook_state != "pending":
                return None
            job.webhook_state = state
            return job

        try:
            await asyncio.to_thread(self.store.update, delivery.prediction_id, settle)
        except StoreUnavailable as exc:
            log.warning(
                "webhook for %s %s, not yet recorded on it: %s", delivery.prediction_id, state, exc.message
            )

    async def aclose(self) -> None:
        """Stop sweeping and sending. A send cut off here keeps its claim until the lease
        ends; then any sweeper tries it again (at least once)."""
        self._closing = True
        tasks = [t for t in (self._sweeper, *self._sending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        await self._client.aclose()

"""Webhook delivery: on a terminal state, POST the prediction to its webhook_url.

Signed: ``X-FluxRedux-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``
with ``X-FluxRedux-Timestamp: <unix seconds>`` and ``X-FluxRedux-Delivery: <prediction id>``.
The secret is the request's ``webhook_secret``, else the server's
``FLUXREDUX_WEBHOOK_SECRET``; with neither, the request is sent unsigned.

Retried with exponential backoff on any non-2xx answer or network error. Delivery runs
beside the predictions, never in their way: the job is finished before its webhook is
sent, and the state of each delivery is stored, so deliveries pending at a restart are
resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from fluxredux.errors import FetchRefused, StoreUnavailable
from fluxredux.jobs.model import Job
from fluxredux.jobs.store import JobStore
from fluxredux.net import SafeFetcher, check_url_shape

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-FluxRedux-Signature"
TIMESTAMP_HEADER = "X-FluxRedux-Timestamp"
DELIVERY_HEADER = "X-FluxRedux-Delivery"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps (replays)."""
    if abs(time.time() - float(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass(frozen=True)
class WebhookPolicy:
    attempts: int = 6
    first_delay: float = 1.0  # then 2, 4, 8, 16 s
    timeout: float = 10.0
    server_secret: str | None = None


class WebhookSender:
    def __init__(
        self,
        store: JobStore,
        policy: WebhookPolicy,
        fetcher: SafeFetcher,
        render: Callable[[Job], dict[str, Any]],
    ) -> None:
        self.store = store
        self.policy = policy
        self.fetcher = fetcher  # its address rules apply to webhook targets too
        self.render = render
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def schedule(self, job: Job) -> None:
        """Start delivering ``job``'s webhook in the background (once per job)."""
        if job.webhook_state != "pending" or not job.webhook_url or job.id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(job))
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job.id, None))

    async def resume_pending(self) -> None:
        try:
            jobs = await asyncio.to_thread(self.store.find, webhook_state="pending")
        except StoreUnavailable as exc:
            log.warning("pending webhooks not resumed now: %s", exc.message)
            return
        for job in jobs:
            self.schedule(job)

    async def _deliver(self, job: Job) -> None:
        assert job.webhook_url
        body = json.dumps(self.render(job), separators=(",", ":")).encode()
        secret = job.webhook_secret or self.policy.server_secret
        delay = self.policy.first_delay
        outcome = "failed"
        for attempt in range(1, self.policy.attempts + 1):
            try:
                if await self._post(job, body, secret):
                    outcome = "delivered"
                    break
            except FetchRefused as exc:
                log.warning("webhook for %s refused: %s", job.id, exc.message)
                break  # the target itself is not allowed: retrying cannot help
            if attempt < self.policy.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        try:
            await asyncio.to_thread(
                self.store.update, job.id, lambda current: _with_webhook_state(current, outcome)
            )
        except StoreUnavailable as exc:  # still "pending": sent again after a restart (at least once)
            log.warning("webhook for %s %s, but not recorded: %s", job.id, outcome, exc.message)
            return
        log.info("webhook for %s %s", job.id, outcome)

    async def _post(self, job: Job, body: bytes, secret: str | None) -> bool:
        assert job.webhook_url
        url = check_url_shape(job.webhook_url)
        ip = await self.fetcher.checked_address(url)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Host": url.netloc.decode("ascii"),
            TIMESTAMP_HEADER: timestamp,
            DELIVERY_HEADER: job.id,
        }
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        try:
            response = await self._client.post(
                url.copy_with(host=str(ip)),
                content=body,
                headers=headers,
                extensions={"sni_hostname": url.host},
            )
        except httpx.HTTPError as exc:
            log.info("webhook for %s: %s", job.id, type(exc).__name__)
            return False
        return response.is_success

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await self._client.aclose()


def _with_webhook_state(job: Job, state: str) -> Job:
    job.webhook_state = state
    return job

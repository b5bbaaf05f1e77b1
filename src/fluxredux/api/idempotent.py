"""``Idempotency-Key`` on creates, on both surfaces: the same key and request within 24 h
answer with the prediction the first create made; the same key with another request is
a 409 (see fluxredux.access.idempotency for the store and its rules)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header

from fluxredux.access.idempotency import CLAIM_SECONDS, IdempotencyRecord
from fluxredux.access.keys import ApiKey
from fluxredux.api.services import Services
from fluxredux.config import Settings
from fluxredux.errors import IdempotencyConflict, InvalidInput, NotFound, StoreUnavailable, Unavailable
from fluxredux.jobs.job import Job, new_id
from fluxredux.schema import MAX_REFERENCES

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
# How long a duplicate that arrives while the first create is still running waits for it.
WAIT_FOR_FIRST_SECONDS = 10.0
_POLL_SECONDS = 0.05

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        max_length=MAX_KEY_CHARS,
        description="Makes the create safe to retry: for 24 h, the same key with the same request "
        "answers with the same prediction; with another request, 409.",
    ),
]


def fingerprint(route: str, body: Any) -> str:
    """The request a key was first used with: its route and its parsed body (so that
    ``"num_outputs": "1"`` and ``1`` are the same request)."""
    canonical = json.dumps([route, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _checked(idempotency_key: str) -> str:
    key = idempotency_key.strip()
    if not key or not key.isprintable():
        raise InvalidInput(
            f"{HEADER}: must be 1-{MAX_KEY_CHARS} printable characters",
            fields=[{"field": HEADER, "message": "must be printable and not empty", "type": "value_error"}],
            header=HEADER,
        )
    return key


def claim_seconds(settings: Settings) -> float:
    """How long a claim holds its key before a retry may make a prediction of its own:
    longer than the slowest create can take, which fetches the webhook's address and up to
    MAX_REFERENCES reference URLs, each bounded by fetch_timeout_seconds (a claim that ran
    out while its create went on would let a retry make a second prediction)."""
    return max(CLAIM_SECONDS, (MAX_REFERENCES + 1) * settings.fetch_timeout_seconds + CLAIM_SECONDS)


async def create_once(
    services: Services,
    key: ApiKey,
    idempotency_key: str | None,
    request_fingerprint: Callable[[], str],
    create: Callable[[str], Awaitable[Job]],
) -> Job:
    """``create(prediction_id)``, unless this caller's ``idempotency_key`` already made a
    prediction for the same request: then that prediction (as stored now).
    ``request_fingerprint`` is called only with a key: it hashes the whole request (a
    reference image's data: URI included), work a create without one does not need.

    The prediction's id is chosen here, before the key is claimed, and the claim names it:
    a create whose store answer was lost (the job stored, the reply not) fails, and a retry
    must find that job rather than make another."""
    prediction_id = new_id()
    if idempotency_key is None:
        return await create(prediction_id)
    store = services.idempotency
    scope, idem = key.id, _checked(idempotency_key)
    fingerprinted = request_fingerprint()
    deadline = time.monotonic() + WAIT_FOR_FIRST_SECONDS
    while True:
        claim = await asyncio.to_thread(
            store.claim,
            scope,
            idem,
            fingerprinted,
            prediction_id,
            claim_seconds=claim_seconds(services.settings),
        )
        record = claim.record
        if claim.won:
            break
        if record.fingerprint != fingerprinted:
            raise _conflict()
        if record.completed:
            job = await asyncio.to_thread(services.store.get, record.prediction_id or "")
            if job is None or job.owner != key.id:
                raise NotFound(
                    f"the prediction this {HEADER} made ('{record.prediction_id}') has been deleted",
                    id=record.prediction_id,
                )
            return job
        # The first create with this key is still running; its prediction may be stored
        # already (then it is the answer), else wait for it.
        if (job := await _made(services, key, record)) is not None:
            return job
        if time.monotonic() > deadline:
            raise Unavailable(f"a create with this {HEADER} is still in progress; retry shortly")
        await asyncio.sleep(_POLL_SECONDS)
    try:
        if claim.abandoned is not None and (job := await _made(services, key, claim.abandoned)) is not None:
            # An earlier create with this key failed, but only its answer was lost: its
            # prediction is the key's, for the request that made it. (Not recorded as
            # such if the store fails now: the claim names it, the next one finds it.)
            with contextlib.suppress(StoreUnavailable):
                await asyncio.to_thread(store.complete, record, claim.abandoned)
            if claim.abandoned.fingerprint != fingerprinted:
                raise _conflict()
            return job
        # The claim's id: this create's, or the one an abandoned claim of the same request
        # named (its create may yet turn out to have made it: then the id is taken, and
        # the create answers with that prediction).
        job = await create(record.prediction_id or prediction_id)
    except BaseException:
        # Nothing that is known of was made: the key is free for the retry (a refusal is
        # not remembered). The claim stays behind, ended, naming its prediction, in case
        # the store made it and only its answer was lost.
        with contextlib.suppress(StoreUnavailable):
            await asyncio.to_thread(store.release, record)
        raise
    try:
        if not await asyncio.to_thread(store.complete, record):
            log.warning("%s %r: the claim ran out before prediction %s was made", HEADER, idem, job.id)
    except StoreUnavailable as exc:
        # The prediction exists, and the claim names it: a retry finds it either way.
        log.warning("%s %r: prediction %s not recorded as made: %s", HEADER, idem, job.id, exc.message)
    return job


async def _made(services: Services, key: ApiKey, claimed: IdempotencyRecord) -> Job | None:
    """The prediction ``claimed`` names, when it is stored (and this caller's)."""
    if claimed.prediction_id is None:
        return None
    job = await asyncio.to_thread(services.store.get, claimed.prediction_id)
    return job if job is not None and job.owner == key.id else None


def _conflict() -> IdempotencyConflict:
    return IdempotencyConflict(
        f"this {HEADER} was used with a different request in the last 24 h; use a new key for a new request",
        header=HEADER,
    )

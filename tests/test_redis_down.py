"""A Redis that is down costs a caller of any Redis seam a quick StoreUnavailable (a 503
with Retry-After, a worker backing off), never a hang and never a raw redis error (a 500):
one test, every seam built as tests/backends.py builds it, on a port where nothing listens,
and every kind of call each seam has. (The event bus is the exception by design: a lost
wake-up is harmless, so its publisher never raises; see tests/test_events.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fluxredux.jobs.job import Job, Status, new_id
from tests.backends import Engine
from tests.services import assert_each_unavailable_quickly, unreachable_redis_url
from tests.test_registry import worker

JOB = Job(id=new_id(), owner="k1", input={"num_outputs": 1}, created_at=1_000_000.0)
URL = "https://hooks.example/x"
BLOB_KEY = f"{0:022d}.png"

# Each Redis seam: the calls a caller makes of it (writes, reads, scripts, the clock).
CALLS: dict[str, Callable[[Any], list[Callable[[], object]]]] = {
    "jobs": lambda store: [
        lambda: store.insert(JOB),
        lambda: store.create_if_under_capacity(JOB, 1, 1),
        lambda: store.get(JOB.id),
        lambda: store.update(JOB.id, lambda j: j),
        lambda: store.claim("w1", 30),
        store.now,
        lambda: store.find([Status.PROCESSING]),
        lambda: store.count([Status.STARTING]),
        store.counts_by_status,
        lambda: store.delete([JOB.id]),
        store.check_writable,
    ],
    "keys": lambda keys: [
        lambda: keys.create("alice"),
        keys.list,
        lambda: keys.revoke("abc"),
        lambda: keys.verify("fr_abc_def"),
    ],
    "shares": lambda shares: [
        lambda: shares.create("p1", "key-a"),
        lambda: shares.get("token"),
        lambda: shares.list_for_prediction("p1"),
        lambda: shares.revoke("token", "key-a"),
        lambda: shares.delete_for_predictions(["p1"]),
    ],
    "uploads": lambda uploads: [
        lambda: uploads.add(BLOB_KEY, "key-a"),
        lambda: uploads.add(BLOB_KEY, "key-a", now=100.0),
        lambda: uploads.get("id"),
        lambda: uploads.use("id"),
        lambda: uploads.use("id", now=100.0),
        lambda: uploads.uploaded([BLOB_KEY]),
        lambda: uploads.expire(unused_since=100.0),
        lambda: uploads.forget(["id"]),
    ],
    "idempotency": lambda store: [lambda: store.claim("a", "k", "fp", "p1"), lambda: store.get("a", "k")],
    "registry": lambda registry: [lambda: registry.register(worker("w1")), registry.workers, registry.now],
    "limiter": lambda limiter: [lambda: limiter.hit("k", "hits")],
    "outbox": lambda outbox: [
        lambda: outbox.enqueue("p1", URL),
        lambda: outbox.claim_due("w1", 30.0, 5),
        outbox.next_due,
    ],
}
OPTIONS: dict[str, dict[str, Any]] = {"limiter": {"limit": 5, "window": 60}}


@pytest.mark.parametrize("seam", sorted(CALLS))
def test_a_redis_that_is_down_is_reported_unavailable_quickly(
    seam: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    engine = Engine("redis", seam, request, tmp_path, None, redis_url=unreachable_redis_url(), prefix="down:")
    try:
        assert_each_unavailable_quickly(CALLS[seam](engine.open(**OPTIONS.get(seam, {}))))
    finally:
        engine.close()

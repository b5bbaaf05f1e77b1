"""What only the Redis job store has to show beyond the shared contract (tests/test_jobs.py):
atomicity across separate clients (API nodes, GPU workers), indexes that stay exactly in
step with the documents, queries that page past one round trip, and Redis refusing writes
as an outage (a Redis that is down: tests/test_redis_down.py, with every Redis seam)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from fluxredux.backends.memory.jobs import MemoryJobStore
from fluxredux.backends.redis.jobs import RedisJobStore
from fluxredux.errors import StoreUnavailable
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.transitions import start_attempt, transition
from tests.backends import Engine
from tests.helpers import FakeClock, run_threads
from tests.test_jobs import make_job

SEAM = "jobs"
pytestmark = pytest.mark.engines("redis")


@pytest.fixture
def open_store(engine: Engine) -> Callable[[], RedisJobStore]:
    """Opens stores on one prefix, each with a client of its own (one per node or worker)."""
    return engine.open


def test_two_api_nodes_racing_for_an_owners_places_accept_exactly_the_limit(
    open_store: Callable[[], RedisJobStore], clock: FakeClock
) -> None:
    nodes = [open_store(), open_store()]
    jobs = [make_job(clock, owner="a") for _ in range(20)]
    outcomes: list[bool] = []
    run_threads(
        [
            lambda i=i, job=job: outcomes.append(nodes[i % 2].create_if_under_capacity(job, 10, 100).accepted)
            for i, job in enumerate(jobs)
        ]
    )
    assert sorted(outcomes) == [False] * 10 + [True] * 10
    assert nodes[0].count([Status.STARTING], owner="a") == 10
    assert nodes[1].count([Status.STARTING, Status.PROCESSING], owner="a") == 10


def test_four_workers_with_their_own_clients_claim_each_job_exactly_once(
    open_store: Callable[[], RedisJobStore], clock: FakeClock
) -> None:
    api = open_store()
    jobs = [make_job(clock) for _ in range(40)]
    for job in jobs:
        api.insert(job)
    claimed: dict[str, list[Job]] = {f"w{i}": [] for i in range(4)}

    def work(worker: str) -> None:
        store = open_store()
        while (job := store.claim(worker, 30)) is not None:
            claimed[worker].append(job)

    run_threads([lambda w=w: work(w) for w in claimed])
    ids = [job.id for mine in claimed.values() for job in mine]
    assert sorted(ids) == sorted(job.id for job in jobs)  # every job, none twice
    assert all(
        job.attempt == 1 and job.status == Status.PROCESSING for mine in claimed.values() for job in mine
    )
    assert api.counts_by_status()[Status.PROCESSING] == 40 and api.count([Status.STARTING]) == 0


def test_the_indexes_follow_every_write_and_retention_leaves_no_key_behind(
    open_store: Callable[[], RedisJobStore], engine: Engine, clock: FakeClock
) -> None:
    store = open_store()
    jobs = [make_job(clock, owner=f"o:{i % 2}", webhook_url="https://hooks.example/x") for i in range(6)]
    for job in jobs:
        store.insert(job)
    store.claim("w1", 30)
    store.update(jobs[1].id, lambda j: transition(j, Status.CANCELED, clock.now))
    store.update(jobs[0].id, lambda j: transition(j, Status.SUCCEEDED, clock.now))
    assert store.count([Status.STARTING], owner="o:0") == 2  # an owner with a colon is its own
    assert [j.id for j in store.find(webhook_state="pending")] == [jobs[0].id, jobs[1].id]
    assert store.find([Status.PROCESSING], lease_expired_at=clock.now + 60) == []
    store.delete([job.id for job in jobs] + ["missing"])
    assert engine.redis_keys() == []
    store.check_writable()
    assert engine.redis_keys() == [f"{engine.prefix()}jobs:write-probe"]


def test_an_id_that_exists_is_refused_and_changes_nothing(
    open_store: Callable[[], RedisJobStore], clock: FakeClock
) -> None:
    store = open_store()
    job = make_job(clock)
    store.insert(job)
    twin = make_job(clock, owner="other")
    twin.id = job.id
    with pytest.raises(KeyError):
        store.insert(twin)
    with pytest.raises(KeyError):
        store.create_if_under_capacity(twin, 10, 10)
    assert store.get(job.id) == job
    assert store.count([Status.STARTING]) == 1 and store.list_by_owner("other", 10) == []


def test_queries_agree_with_the_reference_store_past_one_page(
    open_store: Callable[[], RedisJobStore], clock: FakeClock
) -> None:
    """Several hundred jobs (more than one round trip's page), mixed states: every query
    answers exactly what the in-memory reference store answers."""
    store, reference = open_store(), MemoryJobStore(clock=clock)
    jobs = [
        make_job(clock, owner=f"k{i % 3}", webhook_url="https://h.example" if i % 4 else None)
        for i in range(450)
    ]
    for job in jobs:
        clock.now = job.created_at
        store.insert(job)
        reference.insert(job)
    clock.now += 1
    for i, job in enumerate(jobs):
        if i % 5 == 0:
            change: Callable[[Job], Job | None] = lambda j, i=i: start_attempt(j, "w1", clock.now + i, 30)  # noqa: E731
        elif i % 5 == 1:
            change = lambda j, i=i: transition(j, Status.CANCELED, clock.now + i)  # noqa: E731
        else:
            continue
        store.update(job.id, change)
        reference.update(job.id, change)

    def same(query: Callable[[MemoryJobStore | RedisJobStore], list[Job]]) -> None:
        assert [j.id for j in query(store)] == [j.id for j in query(reference)]

    same(lambda s: s.find())
    same(lambda s: s.find(limit=250))
    same(lambda s: s.find([Status.STARTING, Status.CANCELED], limit=300))
    same(lambda s: s.find([Status.PROCESSING], lease_expired_at=clock.now + 200))
    same(lambda s: s.find(webhook_state="pending", limit=50))
    same(lambda s: s.find([Status.CANCELED], webhook_state="pending", limit=40))
    same(lambda s: s.find(completed_before=clock.now + 300, limit=60))
    same(lambda s: s.find([Status.SUCCEEDED]))
    same(lambda s: s.list_by_owner("k1", 70))
    same(lambda s: s.list_by_owner("k1", 70, before=jobs[300].created_at))
    assert store.counts_by_status() == reference.counts_by_status()
    assert store.count([Status.STARTING, Status.PROCESSING], owner="k2") == reference.count(
        [Status.STARTING, Status.PROCESSING], owner="k2"
    )
    waiting = [j for j in jobs if store.queue_position(j.id) is not None]
    assert [store.queue_position(j.id) for j in waiting] == [reference.queue_position(j.id) for j in waiting]
    assert [store.queue_position(j.id) for j in waiting] == list(range(len(waiting)))


def test_without_a_clock_the_store_uses_redis_time(engine: Engine) -> None:
    store = engine.open(clock=None)
    store.insert(Job(id=new_id(), owner="k", input={}, created_at=time.time()))
    claimed = store.claim("w1", 30)
    assert claimed is not None and claimed.lease_expires_at is not None
    assert abs(claimed.lease_expires_at - 30 - time.time()) < 5  # the same host: close clocks


def test_a_redis_out_of_memory_or_refusing_writes_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    """Redis answers "OOM" over its memory limit and "MISCONF" after a failed save: both are
    outages a caller should retry (503), not bugs (500), in a transaction or not."""
    from tests.services import redis_server

    with redis_server(tmp_path / "own-redis") as url:
        store = RedisJobStore(url, prefix="oom:")
        store.insert(Job(id=new_id(), owner="k", input={}, created_at=1.0))
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        with pytest.raises(StoreUnavailable, match="maxmemory"):
            store.insert(Job(id=new_id(), owner="k", input={}, created_at=2.0))
        with pytest.raises(StoreUnavailable):
            store.check_writable()
        admin.config_set("maxmemory", "0")
        store.check_writable()  # and it recovers by itself
        store.close()

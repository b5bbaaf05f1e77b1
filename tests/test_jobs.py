"""The job store contract and the state machine, run against every engine (tests/backends.py:
add an implementation to SEAMS["jobs"] and the whole suite runs against it too, huey-style).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.errors import StoreUnavailable
from fluxredux.jobs import JobStore, Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.lifecycle import WORKER_LOST, InvalidTransition, transition
from tests.backends import Engine
from tests.helpers import FakeClock, run_threads

SEAM = "jobs"


@pytest.fixture
def store(engine: Engine) -> JobStore:
    return engine.open()


@pytest.fixture
def events() -> list[Job]:
    return []


@pytest.fixture
def lifecycle(store: JobStore, events: list[Job]) -> Lifecycle:
    return Lifecycle(store, publish=events.append)  # on the store's clock, as in production


def make_job(clock: FakeClock, owner: str = "k1", **fields: object) -> Job:
    clock.now += 1
    return Job(id=new_id(), owner=owner, input={"num_outputs": 1}, created_at=clock.now, **fields)  # type: ignore[arg-type]


# --- the storage contract ---------------------------------------------------------


def test_insert_get_round_trip(store: JobStore, clock: FakeClock) -> None:
    job = make_job(clock, metrics={"predict_time": 1.5}, extra={"safety": [{"unsafe": False}]})
    store.insert(job)
    assert store.get(job.id) == job
    assert store.get("missing") is None


def bump(current: Job) -> Job:
    current.progress_step += 1
    return current


def test_update_is_atomic_under_concurrency(store: JobStore, clock: FakeClock) -> None:
    job = make_job(clock)
    store.insert(job)
    run_threads([lambda: [store.update(job.id, bump) for _ in range(50)]] * 4)
    stored = store.get(job.id)
    assert stored is not None and stored.progress_step == 200


def test_update_returning_none_changes_nothing(store: JobStore, clock: FakeClock) -> None:
    job = make_job(clock)
    store.insert(job)
    assert store.update(job.id, lambda current: None) is None
    assert store.get(job.id) == job
    assert store.update("missing", lambda current: current) is None


def test_claim_takes_the_oldest_starting_job_once(store: JobStore, clock: FakeClock) -> None:
    first, second = make_job(clock), make_job(clock)
    store.insert(second)
    store.insert(first)

    claimed = [store.claim("w1", 30), store.claim("w2", 30)]
    assert [job.id for job in claimed if job] == [first.id, second.id]
    assert [(job.status, job.lease_owner, job.attempt) for job in claimed if job] == [
        (Status.PROCESSING, "w1", 1),
        (Status.PROCESSING, "w2", 1),
    ]
    assert claimed[0] is not None and claimed[0].lease_expires_at == store.now() + 30
    assert store.claim("w3", 30) is None


def test_list_by_owner_is_newest_first_and_pages(store: JobStore, clock: FakeClock) -> None:
    mine = [make_job(clock) for _ in range(5)]
    for job in [*mine, make_job(clock, owner="someone-else")]:
        store.insert(job)
    page = store.list_by_owner("k1", 3)
    assert [j.id for j in page] == [j.id for j in reversed(mine)][:3]
    rest = store.list_by_owner("k1", 3, before=page[-1].created_at)
    assert [j.id for j in rest] == [mine[1].id, mine[0].id]


def test_find_count_and_delete(store: JobStore, clock: FakeClock) -> None:
    jobs = [make_job(clock) for _ in range(3)]
    for job in jobs:
        store.insert(job)
    store.update(jobs[0].id, lambda j: transition(j, Status.CANCELED, clock.now))
    assert store.count([Status.STARTING]) == 2
    assert store.count([Status.STARTING, Status.CANCELED], owner="k1") == 3
    assert [j.id for j in store.find([Status.CANCELED])] == [jobs[0].id]
    assert [j.id for j in store.find(completed_before=clock.now + 1)] == [jobs[0].id]
    assert store.counts_by_status()[Status.STARTING] == 2
    store.delete([jobs[0].id])
    assert store.get(jobs[0].id) is None


def test_create_if_under_capacity_enforces_both_limits(store: JobStore, clock: FakeClock) -> None:
    for _ in range(2):
        assert store.create_if_under_capacity(make_job(clock, owner="a"), 2, 3).accepted
    full = make_job(clock, owner="a")
    refused = store.create_if_under_capacity(full, 2, 3)
    assert not refused.accepted and refused.in_flight == 2 and store.get(full.id) is None
    assert store.create_if_under_capacity(make_job(clock, owner="b"), 2, 3).accepted
    queue_full = store.create_if_under_capacity(make_job(clock, owner="c"), 2, 3)
    assert not queue_full.accepted and queue_full.queued == 3
    assert store.count([Status.STARTING]) == 3


def test_a_create_resent_after_its_answer_was_lost_is_accepted_once(
    store: JobStore, clock: FakeClock
) -> None:
    """The store made the job but its answer never came back, and the create is sent
    again: the job it finds is its own. It is accepted, not counted against its own limit
    and refused, and stored once."""
    job = make_job(clock, owner="a")
    assert store.create_if_under_capacity(job, 1, 1).accepted
    again = store.create_if_under_capacity(job, 1, 1)  # at both limits now: with itself
    assert again.accepted
    assert store.count([Status.STARTING]) == 1 and store.get(job.id) == job
    other = make_job(clock, owner="b")
    other.id = job.id  # another job with a stored id is an error, not a resend
    with pytest.raises(KeyError):
        store.create_if_under_capacity(other, 10, 10)


def test_create_if_under_capacity_is_atomic_under_concurrency(store: JobStore, clock: FakeClock) -> None:
    """Twenty threads race for ten places: exactly ten win, whatever the interleaving."""
    jobs = [make_job(clock, owner="a") for _ in range(20)]
    outcomes: list[bool] = []
    run_threads(
        [
            lambda job=job: outcomes.append(store.create_if_under_capacity(job, 10, 100).accepted)
            for job in jobs
        ]
    )
    assert sorted(outcomes) == [False] * 10 + [True] * 10
    assert store.count([Status.STARTING], owner="a") == 10


def test_queue_position_counts_the_waiting_jobs_ahead(store: JobStore, clock: FakeClock) -> None:
    jobs = [make_job(clock) for _ in range(3)]
    for job in reversed(jobs):  # insertion order does not matter, creation order does
        store.insert(job)
    assert [store.queue_position(job.id) for job in jobs] == [0, 1, 2]
    store.claim("w1", 30)
    assert [store.queue_position(job.id) for job in jobs] == [None, 0, 1]  # running: not waiting
    assert store.queue_position("missing") is None


def test_check_writable_passes_on_a_healthy_store(store: JobStore, clock: FakeClock) -> None:
    store.check_writable()
    assert store.find() == []  # it made no job
    job = make_job(clock)
    store.insert(job)  # and the store takes writes as before
    store.check_writable()
    assert store.get(job.id) == job


@pytest.mark.engines("sqlite", "redis")  # memory cannot fail
def test_check_writable_reports_a_store_that_cannot_write(engine: Engine, clock: FakeClock) -> None:
    """The pair of the test above: under a real fault (SQLite's write lock held by another
    process, Redis refusing writes) it raises StoreUnavailable, quickly, and passes again
    once the fault is gone. A check that never fails would fail here."""
    import time

    store: JobStore = engine.open(**({"busy_timeout": 0.3} if engine.name == "sqlite" else {}))
    job = make_job(clock)
    store.insert(job)
    with engine.writes_refused():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.check_writable()
        assert time.monotonic() - started < 3
        assert store.get(job.id) == job  # reads go on
    store.check_writable()


def test_sqlite_reports_a_write_lock_held_elsewhere_within_its_busy_timeout(
    tmp_path: Path, clock: FakeClock
) -> None:
    import sqlite3
    import time

    store = SQLiteJobStore(tmp_path / "locked.db", busy_timeout=0.3)
    job = make_job(clock)
    store.insert(job)
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.update(job.id, bump)
        with pytest.raises(StoreUnavailable):
            store.check_writable()
        assert time.monotonic() - started < 2
        assert store.get(job.id) == job  # reads go on (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.update(job.id, bump) is not None  # and writes again once the lock is gone
    store.close()


def test_a_read_that_must_not_wait_says_so_at_once_and_a_thread_read_waits(tmp_path: Path) -> None:
    """The HTTP process reads SQLite on its event loop (``SQLiteBackends.read_without_waiting``),
    where waiting for a lock would stall every request: a lock in the way of a read (another
    process holding the file exclusively) gives WouldWait at once, so the read moves to a
    thread; the same read in a thread waits out its busy timeout as before."""
    import subprocess
    import sys
    import threading
    import time

    from fluxredux.backends.sqlite.database import Database, without_waiting
    from fluxredux.errors import WouldWait

    path = tmp_path / "held.db"
    db = Database(path, "CREATE TABLE IF NOT EXISTS t (x INTEGER);", busy_timeout=1.0)
    db.write("INSERT INTO t VALUES (1)")
    with without_waiting():
        assert db.rows("SELECT count(*) FROM t") == [(1,)]  # nothing in the way: answered
    db.close()  # so that the holder can take the file for itself
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "db.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
         "db.execute('BEGIN EXCLUSIVE')\n"
         "db.execute('INSERT INTO t VALUES (2)')\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n",
         str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    outcomes: dict[str, tuple[str, float]] = {}

    def read(name: str, inline: bool) -> None:
        started = time.monotonic()
        try:
            if inline:
                with without_waiting():
                    db.rows("SELECT count(*) FROM t")
            else:
                db.rows("SELECT count(*) FROM t")
            outcomes[name] = ("read", time.monotonic() - started)
        except StoreUnavailable as exc:
            outcomes[name] = (type(exc).__name__, time.monotonic() - started)

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for name, inline in (("inline", True), ("thread", False)):
            reader = threading.Thread(target=read, args=(name, inline))  # a thread of its own:
            reader.start()  # new connections (this thread's were closed above)
            reader.join(10)
    finally:
        holder.kill()
        holder.wait()
    assert outcomes["inline"][0] == WouldWait.__name__ and outcomes["inline"][1] < 0.5, outcomes
    assert outcomes["thread"][0] == StoreUnavailable.__name__ and outcomes["thread"][1] >= 0.9, outcomes
    assert issubclass(WouldWait, StoreUnavailable)  # one that escaped would still be a 503


# --- the state machine ---------------------------------------------------------------


def test_terminal_states_never_change(clock: FakeClock) -> None:
    job = transition(make_job(clock), Status.CANCELED, clock.now)
    for target in Status:
        with pytest.raises(InvalidTransition):
            transition(job, target, clock.now)


def test_claim_leases_and_publishes(lifecycle: Lifecycle, clock: FakeClock, events: list[Job]) -> None:
    job = lifecycle.create(make_job(clock))
    claimed = lifecycle.claim("w1", lease_seconds=30)
    assert claimed is not None and claimed.id == job.id
    assert (claimed.status, claimed.attempt, claimed.lease_owner) == (Status.PROCESSING, 1, "w1")
    assert claimed.lease_expires_at == clock.now + 30
    assert [e.status for e in events] == [Status.STARTING, Status.PROCESSING]


def test_cancel_in_each_state(lifecycle: Lifecycle, clock: FakeClock) -> None:
    queued = lifecycle.create(make_job(clock))
    canceled = lifecycle.cancel(queued.id)
    assert canceled is not None and canceled.status == Status.CANCELED  # queued: at once, never runs
    assert lifecycle.claim("w1", 30) is None

    running = lifecycle.create(make_job(clock))
    claimed = lifecycle.claim("w1", 30)
    assert claimed is not None
    flagged = lifecycle.cancel(running.id)
    assert flagged is not None and (flagged.status, flagged.cancel_requested) == (Status.PROCESSING, True)
    assert lifecycle.should_stop(claimed, "w1")
    done = lifecycle.finish(claimed, "w1", Status.CANCELED)
    assert done is not None and done.status == Status.CANCELED

    finished = lifecycle.create(make_job(clock))
    claimed = lifecycle.claim("w1", 30)
    assert claimed is not None
    lifecycle.finish(claimed, "w1", Status.SUCCEEDED, output=["a.webp"])
    after = lifecycle.cancel(finished.id)
    assert after is not None and after.status == Status.SUCCEEDED and not after.cancel_requested
    again = lifecycle.cancel(finished.id)  # repeated calls are harmless
    assert again == after
    assert lifecycle.cancel("missing") is None


def test_a_stale_worker_cannot_overwrite_a_newer_attempt(lifecycle: Lifecycle, clock: FakeClock) -> None:
    job = lifecycle.create(make_job(clock))
    first = lifecycle.claim("w1", lease_seconds=30)
    assert first is not None
    clock.now += 31  # w1's lease runs out
    assert [j.status for j in lifecycle.reap(max_attempts=2)] == [Status.STARTING]
    second = lifecycle.claim("w2", lease_seconds=30)
    assert second is not None and second.attempt == 2
    assert lifecycle.heartbeat(first, "w1", 30) is None
    assert lifecycle.finish(first, "w1", Status.SUCCEEDED, output=["stale.webp"]) is None
    done = lifecycle.finish(second, "w2", Status.SUCCEEDED, output=["fresh.webp"])
    assert done is not None and done.output == ["fresh.webp"]
    stored = lifecycle.store.get(job.id)
    assert stored is not None and stored.output == ["fresh.webp"]


def test_lost_worker_reruns_once_then_fails(lifecycle: Lifecycle, clock: FakeClock) -> None:
    job = lifecycle.create(make_job(clock))
    lifecycle.claim("w1", 30)
    assert [j.status for j in lifecycle.reap(max_attempts=2, dead_owners={"w1"})] == [Status.STARTING]
    lifecycle.claim("w2", 30)
    (failed,) = lifecycle.reap(max_attempts=2, dead_owners={"w2"})
    assert (failed.status, failed.error, failed.error_code) == (Status.FAILED, WORKER_LOST, "worker_lost")
    assert lifecycle.store.get(job.id) == failed


def test_a_heartbeat_between_reap_lookup_and_update_keeps_the_job(
    lifecycle: Lifecycle, clock: FakeClock
) -> None:
    """The reaper looks up expired leases, then updates each job: a heartbeat landing in
    between must win, or a live worker's job would be run a second time."""
    lifecycle.create(make_job(clock))
    running = lifecycle.claim("w1", 30)
    assert running is not None
    clock.now += 31  # the lease ran out (a long GC pause, a slow disk)...
    candidates = lifecycle.reap_candidates()
    assert [c.id for c in candidates] == [running.id]
    assert lifecycle.heartbeat(running, "w1", 30) is not None  # ...and the worker renews it now
    assert lifecycle.recover(candidates[0], max_attempts=2) is None
    current = lifecycle.store.get(running.id)
    assert current is not None and current.status == Status.PROCESSING and current.lease_owner == "w1"
    assert not lifecycle.should_stop(running, "w1")
    assert lifecycle.finish(running, "w1", Status.SUCCEEDED) is not None


def test_reap_spares_a_job_whose_heartbeat_lands_during_the_reap(store: JobStore, clock: FakeClock) -> None:
    """The same race through ``reap`` itself: the worker renews its lease after the reaper
    looked the job up, just before the reaper's update (another process, any moment)."""
    lifecycle = Lifecycle(store)
    lifecycle.create(make_job(clock))
    running = lifecycle.claim("w1", 30)
    assert running is not None
    clock.now += 31

    class HeartbeatFirst:
        """The store, but the worker's heartbeat lands right before the reaper's update."""

        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
            Lifecycle(store).heartbeat(running, "w1", 30)
            return store.update(job_id, change)

    assert Lifecycle(HeartbeatFirst()).reap(max_attempts=2) == []  # type: ignore[arg-type]
    current = store.get(running.id)
    assert current is not None and (current.status, current.lease_owner) == (Status.PROCESSING, "w1")


def test_a_worker_whose_job_was_taken_back_stops_running_it(lifecycle: Lifecycle, clock: FakeClock) -> None:
    """A worker that lost its lease (a long pause) must stop at its next step, not run the
    whole job on a GPU while another worker runs it again."""
    lifecycle.create(make_job(clock))
    first = lifecycle.claim("w1", 30)
    assert first is not None and not lifecycle.should_stop(first, "w1")
    clock.now += 31
    lifecycle.reap(max_attempts=2)  # back in the queue...
    assert lifecycle.should_stop(first, "w1")
    second = lifecycle.claim("w2", 30)  # ...and claimed again
    assert (
        second is not None and lifecycle.should_stop(first, "w1") and not lifecycle.should_stop(second, "w2")
    )


def test_heartbeat_keeps_a_lease_alive(lifecycle: Lifecycle, clock: FakeClock) -> None:
    lifecycle.create(make_job(clock))
    claimed = lifecycle.claim("w1", 30)
    assert claimed is not None
    for _ in range(5):
        clock.now += 20
        assert lifecycle.heartbeat(claimed, "w1", 30, step=1, total=4) is not None
    assert lifecycle.reap(max_attempts=2) == []


def test_a_cancel_requested_job_of_a_lost_worker_ends_cancelled(
    lifecycle: Lifecycle, clock: FakeClock
) -> None:
    job = lifecycle.create(make_job(clock))
    lifecycle.claim("w1", 30)
    lifecycle.cancel(job.id)
    (reaped,) = lifecycle.reap(max_attempts=2, dead_owners={"w1"})
    assert reaped.status == Status.CANCELED


def test_webhook_is_queued_on_every_terminal_state(lifecycle: Lifecycle, clock: FakeClock) -> None:
    job = lifecycle.create(make_job(clock, webhook_url="https://hooks.example/x"))
    assert job.webhook_state is None
    canceled = lifecycle.cancel(job.id)
    assert canceled is not None and canceled.webhook_state == "pending"
    assert [j.id for j in lifecycle.store.find(webhook_state="pending")] == [job.id]


def test_sqlite_updates_from_two_connections_serialise(tmp_path: Path, clock: FakeClock) -> None:
    """Two connections stand for two processes (the server and its worker)."""
    first, second = SQLiteJobStore(tmp_path / "shared.db"), SQLiteJobStore(tmp_path / "shared.db")
    job = make_job(clock)
    first.insert(job)
    run_threads([lambda s=s: [s.update(job.id, bump) for _ in range(100)] for s in (first, second)])
    stored = second.get(job.id)
    assert stored is not None and stored.progress_step == 200


def test_only_the_local_store_is_read_on_the_event_loop(tmp_path: Path) -> None:
    """``Services.read``: SQLite on the loop (no hop), Redis always in a thread (a network
    call on the loop would hold up every request while Redis is slow or stopped)."""
    import asyncio
    import threading

    from fluxredux.api.services import build_services
    from fluxredux.config import Settings
    from tests.harness import ThreadWorkers

    def where() -> threading.Thread:
        return threading.current_thread()

    async def read_from_the_loop(settings: Settings) -> bool:
        services = build_services(settings, lambda *_: ThreadWorkers())
        try:
            return await services.read(where) is threading.current_thread()
        finally:
            services.close()

    local = Settings(data_dir=tmp_path / "one")
    remote = Settings(data_dir=tmp_path / "many", redis_url="redis://127.0.0.1:1/0")  # never reached
    assert asyncio.run(read_from_the_loop(local)) is True
    assert asyncio.run(read_from_the_loop(remote)) is False

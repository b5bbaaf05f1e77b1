"""A Hypothesis state machine over the job lifecycle: random interleavings of creates,
claims by several workers, heartbeats, finishes (also by stale workers), cancels, clock
jumps and reaps. After every step the invariants a user relies on must hold."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from tempfile import mkdtemp

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fluxredux.backends.memory.jobs import MemoryJobStore
from fluxredux.backends.redis.jobs import RedisJobStore
from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.store import JobStore

WORKERS = ("w1", "w2", "w3")
LEASE = 30.0
MAX_ATTEMPTS = 2

# The session's Redis server, for the machine's redis examples (set by the fixture below:
# Hypothesis builds the machine itself, so it cannot ask for fixtures).
REDIS: dict[str, redis.Redis] = {}


@pytest.fixture(autouse=True)
def redis_for_the_machine(redis_url: str) -> Iterator[None]:
    REDIS["client"] = redis.Redis.from_url(redis_url, decode_responses=True)
    yield
    REDIS.pop("client").close()


class LifecycleMachine(RuleBasedStateMachine):
    store: JobStore

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self.ids: list[str] = []
        self.claimed: dict[str, Job] = {}  # what each worker believes it runs
        self.terminal: dict[str, Job] = {}  # first terminal state seen per job
        self.pending_reap: tuple[list[Job], set[str]] = ([], set())

    @initialize(backend=st.sampled_from(["memory", "sqlite", "redis"]))
    def open_store(self, backend: str) -> None:
        clock = lambda: self.now  # noqa: E731
        if backend == "memory":
            self.store = MemoryJobStore(clock=clock)
        elif backend == "sqlite":
            self.store = SQLiteJobStore(Path(mkdtemp()) / "jobs.db", clock=clock)
        else:  # a prefix of its own per example, on the session's server and client
            self.prefix = f"machine-{secrets.token_hex(4)}:"
            self.store = RedisJobStore(REDIS["client"], prefix=self.prefix, clock=clock)
        self.lifecycle = Lifecycle(self.store)

    @rule()
    def create(self) -> None:
        self.now += 1
        job = Job(id=new_id(), owner="k", input={"num_outputs": 1}, created_at=self.now)
        self.ids.append(self.lifecycle.create(job).id)

    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        if worker in self.claimed:
            return
        job = self.lifecycle.claim(worker, LEASE)
        if job is not None:
            self.claimed[worker] = job

    def still_owns(self, worker: str) -> bool:
        """The model's answer: is this worker's claim the job's current attempt?"""
        mine = self.claimed[worker]
        current = self.store.get(mine.id)
        assert current is not None
        return (current.status, current.lease_owner, current.attempt) == (
            Status.PROCESSING,
            worker,
            mine.attempt,
        )

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        if worker in self.claimed:
            owns = self.still_owns(worker)
            result = self.lifecycle.heartbeat(self.claimed[worker], worker, LEASE, step=1, total=4)
            assert (result is not None) == owns  # a stale worker cannot extend a lease

    @rule(
        worker=st.sampled_from(WORKERS),
        outcome=st.sampled_from([Status.SUCCEEDED, Status.FAILED, Status.CANCELED]),
    )
    def finish(self, worker: str, outcome: Status) -> None:
        if worker not in self.claimed:
            return
        owns = self.still_owns(worker)
        job = self.claimed.pop(worker)
        output = [f"{worker}-{job.attempt}.webp"] if outcome == Status.SUCCEEDED else []
        result = self.lifecycle.finish(job, worker, outcome, output=output)
        assert (result is not None) == owns  # only the current attempt's worker may finish it

    @rule(index=st.integers(min_value=0, max_value=20))
    def cancel(self, index: int) -> None:
        if self.ids:
            self.lifecycle.cancel(self.ids[index % len(self.ids)])

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(dead=st.sets(st.sampled_from(WORKERS), max_size=2))
    def reap(self, dead: set[str]) -> None:
        self.lifecycle.reap(max_attempts=MAX_ATTEMPTS, dead_owners=dead)

    # Reaping is a lookup, then one atomic update per job. Another process acts in between
    # (a heartbeat extends the lease, the job finishes and is re-claimed...): these two
    # rules let any other rule run between the lookup and the update.
    @rule(dead=st.sets(st.sampled_from(WORKERS), max_size=2))
    def reap_lookup(self, dead: set[str]) -> None:
        self.pending_reap = (self.lifecycle.reap_candidates(dead_owners=dead), dead)

    @rule()
    def reap_apply(self) -> None:
        candidates, dead = self.pending_reap
        self.pending_reap = ([], set())
        for candidate in candidates:
            before = self.store.get(candidate.id)
            assert before is not None
            recovered = self.lifecycle.recover(candidate, max_attempts=MAX_ATTEMPTS, dead_owners=dead)
            if recovered is not None:
                # Only a job whose worker is gone may be taken: its lease ran out, or its
                # owner is known dead, at the moment of the update, not of the lookup.
                assert before.status == Status.PROCESSING and before.attempt == candidate.attempt
                assert before.lease_owner in dead or (
                    before.lease_expires_at is not None and before.lease_expires_at <= self.now
                ), (candidate, before)

    @invariant()
    def terminal_states_never_change(self) -> None:
        for job_id in self.ids:
            job = self.store.get(job_id)
            assert job is not None
            if job.is_terminal:
                first = self.terminal.setdefault(job_id, job)
                assert (job.status, job.output, job.completed_at) == (
                    first.status,
                    first.output,
                    first.completed_at,
                )

    @invariant()
    def running_jobs_have_one_owner_and_a_lease(self) -> None:
        for job_id in self.ids:
            job = self.store.get(job_id)
            assert job is not None
            if job.status == Status.PROCESSING:
                assert job.lease_owner in WORKERS and job.lease_expires_at is not None
                assert 1 <= job.attempt <= MAX_ATTEMPTS
            else:
                assert job.lease_owner is None

    @invariant()
    def a_job_is_never_run_more_than_allowed(self) -> None:
        for job_id in self.ids:
            job = self.store.get(job_id)
            assert job is not None and job.attempt <= MAX_ATTEMPTS

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
        if hasattr(self, "prefix"):  # leave the shared server as the example found it
            client = REDIS["client"]
            keys = list(client.scan_iter(f"{self.prefix}*", count=1000))
            if keys:
                client.delete(*keys)


LifecycleMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_lifecycle_state_machine = LifecycleMachine.TestCase

"""Test double: a job store in memory, the plainest implementation of the contract, for
fast tests of the code above the store. Nothing survives the process."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable

from fluxredux.jobs.job import IN_FLIGHT, Job, Status
from fluxredux.jobs.store import Capacity, Change, same_create
from fluxredux.jobs.transitions import start_attempt


class MemoryJobStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def insert(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                raise KeyError(f"job {job.id} exists")
            self._jobs[job.id] = copy.deepcopy(job)

    def create_if_under_capacity(self, job: Job, per_owner_limit: int, queue_limit: int) -> Capacity:
        with self._lock:
            jobs = self._jobs.values()
            in_flight = sum(1 for j in jobs if j.owner == job.owner and j.status in IN_FLIGHT)
            queued = sum(1 for j in jobs if j.status == Status.STARTING)
            if (stored := self._jobs.get(job.id)) is not None:
                if not same_create(stored, job):
                    raise KeyError(f"job {job.id} exists")
                return Capacity(in_flight=in_flight, queued=queued, accepted=True)
            accepted = in_flight < per_owner_limit and queued < queue_limit
            if accepted:
                self._jobs[job.id] = copy.deepcopy(job)
            return Capacity(in_flight=in_flight, queued=queued, accepted=accepted)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return copy.deepcopy(job) if job else None

    def _apply(self, current: Job, change: Change) -> Job | None:
        updated = change(copy.deepcopy(current))
        if updated is not None:
            self._jobs[current.id] = copy.deepcopy(updated)
        return updated

    def update(self, job_id: str, change: Change) -> Job | None:
        with self._lock:
            current = self._jobs.get(job_id)
            return self._apply(current, change) if current else None

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        now = self.now()
        with self._lock:
            waiting = self._sorted(j for j in self._jobs.values() if j.status == Status.STARTING)
            if not waiting:
                return None
            return self._apply(waiting[0], lambda job: start_attempt(job, worker_id, now, lease_seconds))

    def now(self) -> float:
        return self._clock()

    def queue_position(self, job_id: str) -> int | None:
        with self._lock:
            me = self._jobs.get(job_id)
            if me is None or me.status != Status.STARTING:
                return None
            return sum(
                1
                for j in self._jobs.values()
                if j.status == Status.STARTING and (j.created_at, j.id) < (me.created_at, me.id)
            )

    def _sorted(self, jobs: Iterable[Job], newest_first: bool = False) -> list[Job]:
        return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=newest_first)

    def list_by_owner(self, owner: str, limit: int, before: float | None = None) -> list[Job]:
        with self._lock:
            mine = [
                j
                for j in self._jobs.values()
                if j.owner == owner and (before is None or j.created_at < before)
            ]
            return copy.deepcopy(self._sorted(mine, newest_first=True)[:limit])

    def find(
        self,
        statuses: Iterable[Status] | None = None,
        *,
        lease_expired_at: float | None = None,
        webhook_state: str | None = None,
        completed_before: float | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        wanted = set(statuses) if statuses is not None else None

        def matches(job: Job) -> bool:
            return (
                (wanted is None or job.status in wanted)
                and (
                    lease_expired_at is None
                    or (job.lease_expires_at is not None and job.lease_expires_at <= lease_expired_at)
                )
                and (webhook_state is None or job.webhook_state == webhook_state)
                and (
                    completed_before is None
                    or (job.completed_at is not None and job.completed_at < completed_before)
                )
            )

        with self._lock:
            return copy.deepcopy(self._sorted(j for j in self._jobs.values() if matches(j))[:limit])

    def count(self, statuses: Iterable[Status], owner: str | None = None) -> int:
        wanted = set(statuses)
        with self._lock:
            return sum(
                1 for j in self._jobs.values() if j.status in wanted and (owner is None or j.owner == owner)
            )

    def counts_by_status(self) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        with self._lock:
            for job in self._jobs.values():
                counts[job.status] += 1
        return counts

    def delete(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._jobs.pop(job_id, None)

    def check_writable(self) -> None:
        pass  # memory is always writable

    def close(self) -> None:
        pass

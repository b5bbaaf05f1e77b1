"""The prediction state machine: every status change goes through ``Lifecycle``.

Each method is one transition, applied atomically through the store with a guard
(compare-and-set on status, lease owner and attempt), so a stale worker can never
overwrite a newer state and terminal states never change. Every change that happens
is published (long-poll wake-ups, webhooks, metrics).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fluxredux.jobs.job import IN_FLIGHT, Job, Status
from fluxredux.jobs.store import CLAIM_WINDOW, Capacity, JobStore
from fluxredux.jobs.transitions import InvalidTransition, start_attempt, transition

__all__ = ["WORKER_LOST", "InvalidTransition", "Lifecycle", "transition"]

log = logging.getLogger(__name__)

Publish = Callable[[Job], None]
Clock = Callable[[], float]
# A claim's choice among the waiting jobs (oldest first): the one to take, or None.
Choose = Callable[[Sequence[Job]], Job | None]

# How many rounds a choosing claim tries when other workers keep taking its choice first
# (each lost round means some job was claimed).
CLAIM_ROUNDS = 8

WORKER_LOST = "the worker running this prediction stopped unexpectedly (worker lost); please retry"


def _start_if_waiting(worker_id: str, now: float, lease_seconds: float, job: Job) -> Job | None:
    """A claim of ``job`` as a store change: none if another worker took it meanwhile."""
    if job.status != Status.STARTING:
        return None
    return start_attempt(job, worker_id, now, lease_seconds)


class Lifecycle:
    def __init__(
        self, store: JobStore, *, clock: Clock | None = None, publish: Publish | None = None
    ) -> None:
        self.store = store
        # The store's clock by default: leases are compared across machines, so they are
        # stamped by one clock (the store's), never by each worker's own.
        self.clock = clock or store.now
        self._publish = publish or (lambda job: None)

    def _emit(self, job: Job | None) -> Job | None:
        if job is not None:
            try:
                self._publish(job)
            except Exception:  # a broken listener must never undo or block a transition
                log.exception("publishing a change of %s failed", job.id)
        return job

    def create(self, job: Job) -> Job:
        self.store.insert(job)
        self._emit(job)
        return job

    def create_if_under_capacity(self, job: Job, per_owner_limit: int, queue_limit: int) -> Capacity:
        """Queue ``job`` unless its owner or the queue is at its limit, atomically."""
        capacity = self.store.create_if_under_capacity(job, per_owner_limit, queue_limit)
        if capacity.accepted:
            self._emit(job)
        return capacity

    def claim(self, worker_id: str, lease_seconds: float, choose: Choose | None = None) -> Job | None:
        """Take the oldest waiting job, leased to ``worker_id`` (one atomic store operation).

        With ``choose``, the job it picks among the oldest ``CLAIM_WINDOW`` waiting ones
        (None: take none now), claimed by a compare-and-set on its status: when another
        worker took it meanwhile, ``choose`` picks again from the queue as it is then."""
        if choose is None:
            return self._emit(self.store.claim(worker_id, lease_seconds))
        for _ in range(CLAIM_ROUNDS):
            window = self.store.find([Status.STARTING], limit=CLAIM_WINDOW)
            chosen = choose(window)
            if chosen is None:
                return None
            start = functools.partial(_start_if_waiting, worker_id, self.clock(), lease_seconds)
            if (claimed := self.store.update(chosen.id, start)) is not None:
                return self._emit(claimed)
        return None  # every round lost to other workers: the next poll tries again

    def heartbeat(
        self,
        job: Job,
        worker_id: str,
        lease_seconds: float,
        *,
        step: int | None = None,
        total: int | None = None,
        preview: str | None = None,
    ) -> Job | None:
        """Extend the lease (and record progress, with the step's preview). None: the job
        is no longer ours."""
        now = self.clock()

        def extend(current: Job) -> Job | None:
            if not _owned(current, worker_id, job.attempt):
                return None
            current.lease_expires_at = now + lease_seconds
            if step is not None:
                current.progress_step, current.progress_total = step, total or current.progress_total
            if preview is not None:
                current.progress_preview = preview
            return current

        updated = self.store.update(job.id, extend)
        if step is not None:
            self._emit(updated)
        return updated

    def record_phase(self, job: Job, worker_id: str, lease_seconds: float, phase: str) -> Job | None:
        """What ``worker_id``'s run of ``job`` does now that its steps are done ("decoding",
        "safety check", ...), fenced as a heartbeat is (a job no longer this attempt's is not
        written), the lease extended by the same write. None: the job is no longer ours.

        One write per phase, a few per job: the caller reports phases, never images."""
        now = self.clock()

        def enter(current: Job) -> Job | None:
            if not _owned(current, worker_id, job.attempt):
                return None
            current.lease_expires_at = now + lease_seconds
            current.progress_phase = phase
            return current

        return self._emit(self.store.update(job.id, enter))

    def finish(self, job: Job, worker_id: str, to: Status, **fields: Any) -> Job | None:
        """The worker's end of a run: succeeded, failed or canceled. None if not ours anymore."""
        now = self.clock()

        def end(current: Job) -> Job | None:
            if not _owned(current, worker_id, job.attempt):
                return None
            current.progress_phase = None  # an ended job is doing nothing
            return transition(current, to, now, **fields)

        return self._emit(self.store.update(job.id, end))

    def cancel(self, job_id: str) -> Job | None:
        """Queued: canceled at once. Running: flagged, the worker stops within a step.
        Finished: unchanged. Idempotent. None: no such job."""
        now = self.clock()

        def request(current: Job) -> Job | None:
            if current.status == Status.STARTING:
                return transition(current, Status.CANCELED, now)
            if current.status == Status.PROCESSING and not current.cancel_requested:
                current.cancel_requested = True
                return current
            return None

        changed = self._emit(self.store.update(job_id, request))
        return changed or self.store.get(job_id)

    def should_stop(self, job: Job, worker_id: str) -> bool:
        """Whether ``worker_id``'s run of ``job`` must stop now: cancel was asked, or the job
        is no longer this attempt's (it ended, or was taken back after a lost lease and
        maybe claimed again): running on would only compute what can never be recorded."""
        current = self.store.get(job.id)
        return current is None or current.cancel_requested or not _owned(current, worker_id, job.attempt)

    def reap(self, *, max_attempts: int, dead_owners: Iterable[str] = ()) -> list[Job]:
        """Jobs whose worker is gone (lease expired, or its owner known dead): re-run
        once, then fail as "worker lost". Nothing stays processing forever."""
        dead = set(dead_owners)
        reaped = []
        for candidate in self.reap_candidates(dead_owners=dead):
            job = self.recover(candidate, max_attempts=max_attempts, dead_owners=dead)
            if job is not None:
                log.warning("prediction %s: worker lost -> %s", job.id, job.status.value)
                reaped.append(job)
        return reaped

    def reap_candidates(self, *, dead_owners: Iterable[str] = ()) -> list[Job]:
        """What looks reapable now; ``recover`` decides again, atomically, per job."""
        dead = set(dead_owners)
        candidates = self.store.find([Status.PROCESSING], lease_expired_at=self.clock())
        if dead:
            candidates += [j for j in self.store.find([Status.PROCESSING]) if j.lease_owner in dead]
        return list({j.id: j for j in candidates}.values())

    def recover(self, candidate: Job, *, max_attempts: int, dead_owners: Iterable[str] = ()) -> Job | None:
        """Take ``candidate`` back from its lost worker, if it is still lost *now*.

        Between the lookup and this update its worker may have renewed the lease, or the
        job may have ended and been claimed again: everything that made it a candidate is
        checked again inside the atomic update (same attempt, same owner, and the lease
        expired or the owner dead), so a live worker never loses its job to a second run."""
        now = self.clock()
        dead = set(dead_owners)

        def take_back(current: Job) -> Job | None:
            if not _owned(current, candidate.lease_owner or "", candidate.attempt):
                return None
            expired = current.lease_expires_at is not None and current.lease_expires_at <= now
            if not expired and current.lease_owner not in dead:
                return None
            current.progress_phase = None  # whatever its lost run was doing, nothing is now
            if current.cancel_requested:
                return transition(current, Status.CANCELED, now)
            if current.attempt < max_attempts:
                return transition(current, Status.STARTING, now)
            return transition(current, Status.FAILED, now, error=WORKER_LOST, error_code="worker_lost")

        return self._emit(self.store.update(candidate.id, take_back))

    def in_flight(self, owner: str) -> int:
        return self.store.count(IN_FLIGHT, owner=owner)

    def queue_depth(self) -> int:
        return self.store.count([Status.STARTING])

    def queue_position(self, job_id: str) -> int | None:
        return self.store.queue_position(job_id)


def _owned(job: Job, worker_id: str, attempt: int) -> bool:
    return job.status == Status.PROCESSING and job.lease_owner == worker_id and job.attempt == attempt

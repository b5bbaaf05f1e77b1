"""The job store contract: a small protocol every backend implements.

Backends only store and atomically update jobs; what a valid change is (the state
machine) lives in ``transitions.py`` and is applied through ``update`` (a compare-and-set:
the change sees the current job and may refuse it, e.g. when the owner or attempt no
longer match) and the fixed operation ``claim``, so every backend enforces the same
rules. One contract test suite runs against each backend. Operational failures
(unreachable, locked, full) are raised as ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from fluxredux.jobs.job import Job, Status

Change = Callable[[Job], Job | None]  # returns the new job, or None for "no change"

# How many jobs at the head of the queue one claim looks at (a backend skips entries it
# cannot take; a worker with adapter affinity chooses among them).
CLAIM_WINDOW = 16


@dataclass(frozen=True)
class Capacity:
    """What ``create_if_under_capacity`` saw: the counts before the insert, and its outcome."""

    in_flight: int  # the owner's jobs waiting or running
    queued: int  # all jobs waiting
    accepted: bool  # inserted: both counts were under their limits


def same_create(stored: Job, job: Job) -> bool:
    """``stored`` is ``job`` put there by an earlier attempt of the same insert (see
    ``create_if_under_capacity``): ids are random, and owner and creation time tell an
    accident from a resend. (The Redis script compares the same two fields.)"""
    return stored.owner == job.owner and stored.created_at == job.created_at


class JobStore(Protocol):
    def insert(self, job: Job) -> None:
        """Add a new job (its id must be new)."""

    def create_if_under_capacity(self, job: Job, per_owner_limit: int, queue_limit: int) -> Capacity:
        """Insert ``job`` only if its owner has fewer than ``per_owner_limit`` jobs in flight
        and fewer than ``queue_limit`` jobs wait in all; one atomic operation.

        The same job again (its id, owner and creation time already stored) is accepted
        and written nothing: it is an earlier attempt of this insert whose answer was lost
        on its way back, sent again, and it must neither count against its own limits nor
        be refused after it was queued. Another job with a stored id raises KeyError."""

    def get(self, job_id: str) -> Job | None: ...

    def update(self, job_id: str, change: Change) -> Job | None:
        """Atomically apply ``change`` to the stored job; return the stored result.

        Returns None when the job does not exist or ``change`` returned None.
        """

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        """Atomically take the oldest STARTING job: its next attempt, leased to ``worker_id``
        for ``lease_seconds`` of this store's clock (``transitions.start_attempt``)."""

    def now(self) -> float:
        """This store's clock (unix seconds). Leases are stamped and compared with it only,
        so workers on machines whose clocks disagree still agree on who holds a lease."""

    def queue_position(self, job_id: str) -> int | None:
        """How many STARTING jobs would be claimed before this one; None unless it waits."""

    def list_by_owner(self, owner: str, limit: int, before: float | None = None) -> list[Job]:
        """The owner's jobs, newest first, created strictly before ``before``."""

    def find(
        self,
        statuses: Iterable[Status] | None = None,
        *,
        lease_expired_at: float | None = None,
        webhook_state: str | None = None,
        completed_before: float | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        """Jobs matching every given filter, oldest first."""

    def count(self, statuses: Iterable[Status], owner: str | None = None) -> int: ...

    def counts_by_status(self) -> dict[Status, int]: ...

    def delete(self, job_ids: Iterable[str]) -> None: ...

    def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write can be committed now (readiness probe)."""

    def close(self) -> None: ...

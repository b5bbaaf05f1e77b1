"""The job store contract: a small protocol every backend implements.

Backends only store and atomically update jobs; what a valid change is (the state
machine) lives in ``lifecycle.py`` and is applied through ``update``/``claim``, so every
backend enforces the same rules. One contract test suite runs against each backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from fluxredux.jobs.model import Job, Status

Change = Callable[[Job], Job | None]  # returns the new job, or None for "no change"


class JobStore(Protocol):
    def insert(self, job: Job) -> None:
        """Add a new job (its id must be new)."""

    def get(self, job_id: str) -> Job | None: ...

    def update(self, job_id: str, change: Change) -> Job | None:
        """Atomically apply ``change`` to the stored job; return the stored result.

        Returns None when the job does not exist or ``change`` returned None.
        """

    def claim(self, change: Change) -> Job | None:
        """Atomically apply ``change`` to the oldest STARTING job, if any."""

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

    def close(self) -> None: ...

"""The one function through which a job's status changes, and the moves it allows.

Used by the lifecycle and by the stores' fixed operations (claim), so that every
backend applies exactly the same state machine.
"""

from __future__ import annotations

from typing import Any

from fluxredux.jobs.job import Job, Status

_ALLOWED = {
    Status.STARTING: {Status.PROCESSING, Status.CANCELED},
    Status.PROCESSING: {Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.STARTING},
}


class InvalidTransition(RuntimeError):
    pass


def transition(job: Job, to: Status, now: float, **fields: Any) -> Job:
    """The one place a job's status changes: checks the move, stamps times, queues webhooks."""
    if to not in _ALLOWED.get(job.status, set()):
        raise InvalidTransition(f"{job.id}: {job.status.value} -> {to.value} is not allowed")
    job.status = to
    for name, value in fields.items():
        setattr(job, name, value)
    if to == Status.PROCESSING and job.started_at is None:
        job.started_at = now
    if to.is_terminal or to == Status.STARTING:
        job.progress_preview = None  # a preview is of a run in progress, never kept after it
    if to.is_terminal:
        job.completed_at = now
        job.lease_owner = job.lease_expires_at = None
        if job.wants_final_webhook:
            job.webhook_state = "pending"
    if to == Status.STARTING:  # back in the queue after a lost worker
        job.lease_owner = job.lease_expires_at = None
        job.progress_step = 0
    return job


def start_attempt(job: Job, worker_id: str, now: float, lease_seconds: float) -> Job:
    """A claim: the next attempt of ``job``, leased to ``worker_id`` until now + lease."""
    job.attempt += 1
    return transition(
        job, Status.PROCESSING, now, lease_owner=worker_id, lease_expires_at=now + lease_seconds
    )

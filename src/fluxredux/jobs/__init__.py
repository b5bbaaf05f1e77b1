"""Prediction jobs: the state machine, the store protocol and its backends."""

from fluxredux.jobs.lifecycle import Lifecycle
from fluxredux.jobs.memory import MemoryJobStore
from fluxredux.jobs.model import IN_FLIGHT, TERMINAL, Job, Status, new_id
from fluxredux.jobs.sqlite import SQLiteJobStore
from fluxredux.jobs.store import JobStore
from fluxredux.jobs.transitions import transition

__all__ = [
    "IN_FLIGHT",
    "TERMINAL",
    "Job",
    "JobStore",
    "Lifecycle",
    "MemoryJobStore",
    "SQLiteJobStore",
    "Status",
    "new_id",
    "transition",
]

"""Prediction jobs: the state machine (job, transitions, lifecycle) and the job-side seams
as protocols (JobStore, EventBus, RateLimiter, WorkerRegistry, WebhookOutbox).

The engines that implement the seams live in ``fluxredux.backends``; nothing here imports them.
"""

from fluxredux.jobs.job import IN_FLIGHT, TERMINAL, Job, Status, new_id
from fluxredux.jobs.lifecycle import Lifecycle
from fluxredux.jobs.store import JobStore
from fluxredux.jobs.transitions import transition

__all__ = ["IN_FLIGHT", "TERMINAL", "Job", "JobStore", "Lifecycle", "Status", "new_id", "transition"]

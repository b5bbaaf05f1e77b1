"""Adapter affinity: with several workers, a job that wants style adapters (LoRA) goes to
an idle worker that has them loaded already, and never waits for one while another
worker is free.

Workers pull jobs, so affinity is a choice each worker makes as it claims: among the
waiting jobs at the head of the queue, it leaves a job to an idle peer that fits it
better (has more of its adapters loaded), one job per such peer, and takes the first job
nobody fits better. Every idle worker is woken when a job is queued, and each reads the
same registry and queue, so the peer that was left the job claims it a moment later.

"Idle" is read where it is certain: a worker is busy while it holds a lease on a running
job (the claim itself writes that, atomically), ready and heard from recently in the
registry otherwise. A peer that looks idle but is not (it died a moment ago and the
registry has not noticed yet) could leave a job waiting, so no job is left to anyone once
it has waited ``patience`` seconds: then whoever comes first takes it. Jobs without
adapters are claimed exactly as before (the oldest first, no extra reads), unless a job
with adapters waits beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fluxredux.jobs.job import Job, Status
from fluxredux.jobs.registry import WorkerRegistry, is_gone
from fluxredux.jobs.store import JobStore
from fluxredux.worker.monitor import loaded_adapters

# How long a job may be left to a peer that fits it better before anyone takes it: a few
# wake-ups' worth. An idle worker polls every second (its safety net), so a job left to a
# peer that never came is taken within about patience + 1 s.
PATIENCE_SECONDS = 2.0


def wanted_adapters(job: Job) -> frozenset[str]:
    """The adapter names a job runs with (as its input recorded them)."""
    uses = job.input.get("loras") or []
    return frozenset(use["name"] for use in uses if isinstance(use, dict) and "name" in use)


def pick(
    window: Sequence[Job],
    mine: frozenset[str],
    idle_peers: Sequence[frozenset[str]],
    now: float,
    patience: float = PATIENCE_SECONDS,
) -> Job | None:
    """The job this worker takes from ``window`` (waiting jobs, oldest first), given the
    adapters it has loaded and those of each idle peer; None leaves them all to peers.

    A job is left to the idle peer that fits it best when that peer fits it better than
    this worker: more of its adapters loaded, or as many and fewer loaded in all (a job
    without adapters goes where it displaces the least). Each peer is left one job at
    most: the rest are this worker's to take, oldest first."""
    free = list(idle_peers)
    for job in window:
        wanted = wanted_adapters(job)
        if now - job.created_at >= patience or not free:
            return job

        def fit(loaded: frozenset[str], wanted: frozenset[str] = wanted) -> tuple[int, int]:
            return len(wanted & loaded), -len(loaded)

        best = max(free, key=fit)
        if fit(best) > fit(mine):
            free.remove(best)
            continue
        return job
    return None


class Affinity:
    """One worker's side of adapter affinity: ``choose`` is its claims' choice."""

    def __init__(
        self,
        worker_id: str,
        store: JobStore,
        registry: WorkerRegistry,
        *,
        loaded: Callable[[], Sequence[str]],
        announce: Callable[[], None],
        ttl: float,
        patience: float = PATIENCE_SECONDS,
    ) -> None:
        self.worker_id = worker_id
        self.store = store
        self.registry = registry
        self.loaded = loaded  # the adapters this worker's model has loaded now
        # Writes this worker's registry entry (its loaded adapters with it) at once.
        self.announce = announce
        self.ttl = ttl  # a registry entry not heard from for this long is not a live worker
        self.patience = patience
        self._announced: frozenset[str] = frozenset()

    def choose(self, window: Sequence[Job]) -> Job | None:
        """The job to claim from ``window`` (oldest first); None leaves them to peers.

        First, when this worker's loaded adapters changed since it last said so (it loaded
        one for its last job), the registry hears it now rather than at the next heartbeat:
        peers choose by it as soon as their next claim."""
        mine = frozenset(self.loaded())
        if mine != self._announced:
            self.announce()
            self._announced = mine
        if not any(wanted_adapters(job) for job in window):
            return window[0] if window else None  # the oldest, as without affinity
        return pick(window, mine, self.idle_peers(), self.store.now(), self.patience)

    def idle_peers(self) -> list[frozenset[str]]:
        """The adapters loaded in each other worker that is ready and holds no job now."""
        busy = {job.lease_owner for job in self.store.find([Status.PROCESSING])}
        now = self.registry.now()
        return [
            frozenset(loaded_adapters(worker.details))
            for worker in self.registry.workers()
            if worker.id != self.worker_id
            and worker.id not in busy
            and worker.state == "ready"
            and not is_gone(worker, now, self.ttl)
        ]

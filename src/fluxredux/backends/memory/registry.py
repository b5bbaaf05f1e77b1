"""Test double: a worker registry in memory (same contract as the real ones)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from fluxredux.jobs.registry import WorkerInfo, WorkerState


class MemoryWorkerRegistry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()

    def register(self, worker: WorkerInfo) -> None:
        with self._lock:
            self._workers[worker.id] = replace(worker, last_seen=self.now())

    def heartbeat(
        self, worker_id: str, *, state: WorkerState | None = None, model: str | None = None
    ) -> bool:
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None:
                return False
            self._workers[worker_id] = replace(
                worker, last_seen=self.now(), state=state or worker.state, model=model or worker.model
            )
            return True

    def unregister(self, worker_id: str, *, seen_before: float | None = None) -> None:
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is not None and (seen_before is None or worker.last_seen <= seen_before):
                del self._workers[worker_id]

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: (w.started_at, w.id))

    def now(self) -> float:
        return self._clock()

    def close(self) -> None:
        pass

"""A worker's entry in the registry of live workers, kept fresh by a heartbeat thread.

Whatever runs a worker (the child of ``fluxredux serve`` today, a worker on another
machine later) registers it here, so that recovery can tell a worker that is gone from
one that is only busy, and ``/ready`` and ``fluxredux workers`` can show who is there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace

from fluxredux.errors import StoreUnavailable
from fluxredux.jobs.registry import WorkerInfo, WorkerRegistry, WorkerState, this_host

log = logging.getLogger(__name__)


class Registration:
    def __init__(
        self, registry: WorkerRegistry, worker_id: str, *, model: str, device: str, every: float
    ) -> None:
        self.registry = registry
        self.every = every
        self._info = WorkerInfo(
            id=worker_id,
            host=this_host(),
            pid=os.getpid(),
            model=model,
            device=device,
            state="loading",
            started_at=time.time(),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self._refresh()
        self._thread.start()

    def update(self, state: WorkerState, model: str | None = None) -> None:
        self._info = replace(self._info, state=state, model=model or self._info.model)
        self._refresh()

    def stop(self) -> None:
        """Leave the registry (a clean exit: nobody has to wait for our silence)."""
        self._stop.set()
        try:
            self.registry.unregister(self._info.id)
        except StoreUnavailable as exc:
            log.warning("could not leave the worker registry: %s", exc.message)

    def _refresh(self) -> None:
        info = self._info
        try:
            if not self.registry.heartbeat(info.id, state=info.state, model=info.model):
                self.registry.register(info)  # first time, or forgotten while we were silent
        except StoreUnavailable as exc:  # the next beat tries again; the lease logic copes
            log.warning("worker registry heartbeat failed: %s", exc.message)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._refresh()

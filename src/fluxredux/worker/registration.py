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
from fluxredux.jobs.registry import WorkerInfo, WorkerRegistry, WorkerState, process_space, this_host

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
            details={"process_space": process_space()},
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self._register()
        self._thread.start()

    def update(self, state: WorkerState | None = None, model: str | None = None, **details: object) -> None:
        """Change what the registry says of this worker (now, not at the next beat)."""
        self._info = replace(
            self._info,
            state=state or self._info.state,
            model=model or self._info.model,
            details={**self._info.details, **details},
        )
        self._register()

    def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeating and, with ``leave``, leave the registry (a clean exit: nobody
        has to wait for our silence)."""
        self._stop.set()
        if self._thread.is_alive():
            # A beat in flight would register us again right after we leave.
            self._thread.join(self.every + 5)
        if not leave:
            return
        try:
            self.registry.unregister(self._info.id)
        except StoreUnavailable as exc:
            log.warning("could not leave the worker registry: %s", exc.message)

    def _register(self) -> None:
        try:
            self.registry.register(self._info)
        except StoreUnavailable as exc:  # the next beat writes it again
            log.warning("worker registry update failed: %s", exc.message)

    def _refresh(self) -> None:
        try:
            if not self.registry.heartbeat(self._info.id):
                self.registry.register(self._info)  # forgotten while we were silent: back again
        except StoreUnavailable as exc:  # the next beat tries again; leases cope meanwhile
            log.warning("worker registry heartbeat failed: %s", exc.message)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._refresh()

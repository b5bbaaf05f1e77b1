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
from collections.abc import Callable
from dataclasses import replace

from fluxredux.errors import StoreUnavailable
from fluxredux.jobs.registry import WorkerInfo, WorkerRegistry, WorkerState, process_space, this_host

log = logging.getLogger(__name__)

# Details a worker has to report as they change (e.g. its cache counters), asked at each beat.
DetailsReport = Callable[[], dict[str, object]]


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
        self._report: DetailsReport | None = None
        self._unwritten = False  # the last write of the entry failed: the next beat writes it
        # update() runs on the worker's threads and on the heartbeat's (reports): one at a time,
        # or one could write back the entry another has just changed without its change.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self._register()
        self._thread.start()

    def update(self, state: WorkerState | None = None, model: str | None = None, **details: object) -> None:
        """Change what the registry says of this worker (now, not at the next beat)."""
        self._write(state, model, details)

    def report_on_beat(self, report: DetailsReport) -> None:
        """From now on, each beat asks ``report()`` for details and writes them when they
        changed since the last write. That write registers the whole entry, which stamps
        it seen as a heartbeat does: it takes the beat's place, never adds a write. So
        counters reach the registry (and, from there, every API node's /metrics) within one
        heartbeat, with no write of their own per prediction or denoising step."""
        self._report = report

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

    def _write(self, state: WorkerState | None, model: str | None, details: dict[str, object]) -> None:
        with self._lock:
            self._info = replace(
                self._info,
                state=state or self._info.state,
                model=model or self._info.model,
                details={**self._info.details, **details},
            )
            self._register()

    def _register(self) -> None:
        try:
            self.registry.register(self._info)
            self._unwritten = False
        except StoreUnavailable as exc:  # the next beat writes it again
            self._unwritten = True
            log.warning("worker registry update failed: %s", exc.message)

    def _refresh(self) -> None:
        details = self._reported()
        changed = any(self._info.details.get(name) != value for name, value in details.items())
        if changed or self._unwritten:
            # Writing the whole entry stamps it seen too: it takes the heartbeat's place.
            self._write(None, None, details)
            return
        try:
            if not self.registry.heartbeat(self._info.id):
                self.registry.register(self._info)  # forgotten while we were silent: back again
        except StoreUnavailable as exc:  # the next beat tries again; leases cope meanwhile
            log.warning("worker registry heartbeat failed: %s", exc.message)

    def _reported(self) -> dict[str, object]:
        if self._report is None:
            return {}
        try:
            return self._report()
        except Exception:  # never let a report stop the heartbeat: the worker would be "gone"
            log.exception("worker details report failed")
            return {}

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._refresh()

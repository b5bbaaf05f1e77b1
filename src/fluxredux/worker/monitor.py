"""What the HTTP process knows about the workers that run its predictions.

One small protocol, so that the API does not care who runs the model: the supervisor
of the one local worker process (``fluxredux serve``, embedded), or ``WorkerFleet``: the
registry of workers anywhere (Redis), with any local ones.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from fluxredux.errors import FluxReduxError, ModelUnavailable, StoreUnavailable
from fluxredux.jobs.registry import WorkerInfo, WorkerRegistry, is_gone

log = logging.getLogger(__name__)


class WorkerMonitor(Protocol):
    def status(self) -> dict[str, Any]:
        """The model and worker as ``/health`` shows them (``ready``, ``demo``, ``pid``, ...)."""

    def problems(self) -> list[str]:
        """Why accepted predictions would not run now; empty when they would (``/ready``)."""

    def refusal(self) -> FluxReduxError | None:
        """The error to answer a create with while no worker can take it, else None."""

    def wake(self) -> None:
        """A job was queued: wake an idle worker (a lost wake-up only delays the job)."""


class LocalWorker(WorkerMonitor, Protocol):
    """A worker process this server runs (the supervisor of one child)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 10) -> None: ...


class WorkerFleet:
    """The monitor of a server whose predictions any registered worker may run: workers
    on other machines (Redis), or several local ones (``--workers N``).

    What it knows comes from the worker registry, which every worker keeps fresh. The
    registry is read by a thread, once a second, never on the event loop (``refusal`` is
    asked on every create). Creates are refused only when no live worker could run them:
    every live one failed to load its model, or none is live and this server's own
    workers cannot start. With no worker at all (a deployment whose workers are still
    coming up), jobs are accepted and wait in the queue; ``/ready`` says not ready."""

    REFRESH_SECONDS = 1.0

    def __init__(
        self,
        registry: WorkerRegistry,
        ttl: float,
        local: Sequence[LocalWorker] = (),
    ) -> None:
        self.registry = registry
        self.ttl = ttl
        self.local = list(local)
        self._live: list[WorkerInfo] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-fleet", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()
        for worker in self.local:
            worker.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        # All at once: each local worker drains its job in the same few seconds.
        stoppers = [threading.Thread(target=worker.stop, args=(timeout,)) for worker in self.local]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def refresh(self) -> None:
        try:
            now = self.registry.now()
            self._live = [w for w in self.registry.workers() if not is_gone(w, now, self.ttl)]
        except StoreUnavailable:
            pass  # what we knew stays; /ready reports the store itself
        except Exception:  # this thread is the node's only view of the workers: it lives on
            log.exception("reading the worker registry failed")

    def _watch(self) -> None:
        while not self._stop.wait(self.REFRESH_SECONDS):
            self.refresh()

    # --- WorkerMonitor --------------------------------------------------------------

    def _ready(self) -> list[WorkerInfo]:
        """Live workers that can run a prediction end to end: model loaded, outputs storable."""
        return [w for w in self._live if w.state == "ready" and not w.details.get("storage_error")]

    def status(self) -> dict[str, Any]:
        ready = self._ready()
        first = ready[0] if ready else None
        status: dict[str, Any] = {
            "ready": bool(ready),
            "workers": len(self._live),
            "workers_ready": len(ready),
            "description": first.model if first else None,
            "demo": bool(first.details.get("demo", False)) if first else False,
            "notice": first.details.get("notice") if first else None,
            # The style adapters loaded on some ready worker (a request naming one runs at once there).
            "loras": sorted({name for worker in ready for name in loaded_adapters(worker.details)}),
            # Whether some ready worker makes step previews (input preview).
            "previews": any(worker.details.get("previews") is True for worker in ready),
        }
        if self.local:
            status["local"] = [worker.status() for worker in self.local]
        return status

    def problems(self) -> list[str]:
        if self._ready():
            return []  # predictions run; a local worker's trouble shows in /health
        found = [problem for worker in self.local for problem in worker.problems()]
        found += [
            f"worker {w.id} cannot store outputs: {w.details['storage_error']}"
            for w in self._live
            if w.details.get("storage_error")
        ]
        if self._live:
            loading = sum(1 for w in self._live if w.state == "loading")
            failed = [w for w in self._live if w.state == "failed"]
            if loading:
                found.append(f"{loading} worker(s) still loading the model")
            for worker in failed:
                error = worker.details.get("error") or {}
                found.append(f"worker {worker.id}: the model could not be loaded: {error.get('error', '?')}")
        return found

    def refusal(self) -> FluxReduxError | None:
        if self._live and all(w.state == "failed" for w in self._live):
            # Queueing work that no live worker can run would only hide the problem.
            error = self._live[0].details.get("error") or {}
            return ModelUnavailable(
                f"the model is not available: {error.get('error', 'it failed to load')}", retry_after=30
            )
        if self._live:
            return None
        refusals = [worker.refusal() for worker in self.local]
        if self.local and all(refusals):
            return refusals[0]
        return None

    def wake(self) -> None:
        # Remote workers hear the queued job on the event bus; local ones get a nudge too.
        for worker in self.local:
            worker.wake()


def loaded_adapters(details: dict[str, Any]) -> list[str]:
    """The adapters a worker's registry entry says it has loaded (another machine wrote
    it: anything malformed counts as none)."""
    loras = details.get("loras")
    loaded = loras.get("loaded") if isinstance(loras, dict) else None
    return [name for name in loaded if isinstance(name, str)] if isinstance(loaded, list) else []

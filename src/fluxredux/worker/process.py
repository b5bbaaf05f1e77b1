"""One worker process, wherever it runs: register, load the model once, then claim and
run one job at a time until told to stop.

Two entry points share it: the child that ``fluxredux serve`` starts (worker/child.py)
and ``fluxredux worker`` on any machine (cli/worker.py). Both talk to the job store, the
worker registry, the blob store and the event bus themselves (``Backends``); they differ
only in how they hear of new jobs and where their events go:

- embedded child: events on a pipe to its server, wake-ups on stdin;
- scale-out (Redis): events published on Redis, and "a job was queued" heard there too,
  so an idle worker on another machine starts within milliseconds, not at its next poll.

Stopping drains: the running job is finished and recorded (and, with overlap, the one
before it in its post stage: ``Worker.run_forever`` returns only after it), then the
worker leaves the registry and exits; a job it never got to stays queued for the others.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol, runtime_checkable

from fluxredux.backends import backends_for
from fluxredux.config import LogFormat, Settings
from fluxredux.errors import FluxReduxError
from fluxredux.images import DecodeLimits
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.events import EventPublisher, listening, publish_changes
from fluxredux.jobs.job import Status
from fluxredux.jobs.registry import new_worker_id
from fluxredux.loras.catalog import LoraCatalog
from fluxredux.loras.fetch import AdapterFiles
from fluxredux.pipeline.protocol import HasPreviews, ImageModel
from fluxredux.pipeline.requirements import import_problem, import_torch
from fluxredux.storage import blob_store, unshared_storage
from fluxredux.worker.affinity import Affinity
from fluxredux.worker.factories import build_checker, build_model
from fluxredux.worker.logs import configure_logging as configure_process_logging
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor
from fluxredux.worker.registration import Registration

log = logging.getLogger("fluxredux.worker")

# Exit codes: 3, the worker cannot start: its model (or a package it needs) cannot be
# imported or loaded. That is permanent until someone acts (installs a package, downloads
# the weights, fixes a setting): ``serve``'s supervisor does not start it again, and
# systemd units wait before they do. Anything else is a normal end, or a crash.
EXIT_MODEL_FAILED = 3

ModelFactory = Callable[[Settings], ImageModel]


class CacheCounters(Protocol):
    def counters(self) -> dict[str, int]: ...


@runtime_checkable
class HasConditioningCache(Protocol):
    """A model that may keep a conditioning cache (the real and demo models; the fake has none)."""

    @property
    def conditioning_cache(self) -> CacheCounters | None: ...


class AdapterCounters(Protocol):
    def counters(self) -> dict[str, object]: ...


@runtime_checkable
class HasAdapters(Protocol):
    """A model that loads style adapters (LoRA): the real and demo models."""

    @property
    def adapters(self) -> AdapterCounters: ...


@runtime_checkable
class HasTextEncoders(Protocol):
    """A model that loads text encoders when a prompt first needs them (real and demo)."""

    @property
    def text_encoders_loaded(self) -> bool: ...


def model_details(model: ImageModel) -> dict[str, object]:
    """What the model has to say in the registry as it works: its conditioning cache's
    cumulative hits and misses, which every API node's /metrics reads from there (so they
    count for workers on any machine), and whether its text encoders are loaded now.
    Nothing for a model without either (the fake one)."""
    details: dict[str, object] = {}
    if isinstance(model, HasConditioningCache) and model.conditioning_cache is not None:
        details["conditioning_cache"] = model.conditioning_cache.counters()
    if isinstance(model, HasTextEncoders):
        details["text_encoders_loaded"] = model.text_encoders_loaded
    if isinstance(model, HasAdapters):
        details["loras"] = model.adapters.counters()
    if isinstance(model, HasPreviews):
        details["previews"] = model.previews_available
    return details


class WorkerProcess:
    """The parts of one worker process, built from settings; ``run`` until ``stop``."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str | None = None,
        events: EventPublisher | None = None,
        model_factory: ModelFactory = build_model,
        freeze_gc: bool = False,
        announce_model: bool = True,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self.backends = backends_for(settings)
        self.stop = threading.Event()
        self._model_factory = model_factory
        # A process of its own (not a test's): once the model is loaded, everything so far
        # lives as long as the process, and is kept out of the garbage collector's full passes.
        self._freeze_gc = freeze_gc
        # Which model is ready, and its notice ("demo model: ... noise"), in this process's
        # log. Not in ``serve``'s children: their server says it once per start, where a
        # child would say it again at each restart.
        self._announce_model = announce_model
        # Embedded: the pipe to the server. Scale-out: the Redis bus, which also brings
        # wake-ups (see ``run``).
        self._events: EventPublisher = events if events is not None else self.backends.bus
        self._worker: Worker | None = None
        self.registration = Registration(
            self.backends.registry,
            self.worker_id,
            model=settings.model,
            device=settings.device or "auto",
            every=settings.heartbeat_seconds,
        )

    def request_stop(self) -> None:
        """Finish the running job (if any), then leave; safe from a signal handler."""
        self.stop.set()
        if self._worker is None:
            # Still loading the model (minutes, for the real one): nothing to finish, so
            # leave now rather than load it only to exit.
            raise SystemExit(0)
        self._worker.wakeup.set()

    def wake(self) -> None:
        if self._worker is not None:
            self._worker.wakeup.set()

    def run(self) -> int:
        """Load the model, then work until ``stop``; the process's exit code."""
        settings = self.settings
        if (problem := unshared_storage(settings)) is not None:
            log.warning(problem)
        for warning in self.backends.start():  # a Redis that keeps nothing; the deployment's marker
            log.warning("%s", warning)
        try:
            # Inside the try: a SIGTERM can land during the first registry write, and the
            # entry it made must still be taken back (it stayed "loading" once in CI).
            self.registration.start()
            try:
                import_torch(settings.model)
                model = self._model_factory(settings)
                checker = build_checker(settings)
            except ImportError as exc:  # a package missing or broken: no restart will find it
                raise import_problem(exc) from exc
        except FluxReduxError as exc:
            log.error("the worker cannot start: %s", exc.message)
            # Its last word stays in the registry (no unregister): the supervisor, /ready
            # and `fluxredux workers` show why, until the entry expires.
            self.registration.update("failed", error=exc.to_dict())
            self.registration.stop(leave=False)
            self.backends.close()
            return EXIT_MODEL_FAILED
        except BaseException:  # stopped while loading (SIGTERM), or the load crashed
            self.registration.stop()
            self.backends.close()
            raise
        if self._freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            info = model.info
            self.registration.update(
                "ready", model=info.describe(), demo=info.is_demo, notice=info.notice, **model_details(model)
            )
            # Counters change with each prediction: each heartbeat carries them when they did.
            # Each beat also looks for the deployment's marker: a Redis that came back without
            # its data is logged (once, as an error) and said in the registry; the worker goes
            # on, for whatever is queued from now on.
            self.registration.report_on_beat(lambda: {**model_details(model), **self._store_details()})
            if self._announce_model:
                log.info("worker %s ready: %s", self.worker_id, info.describe())
                if info.notice:
                    log.warning("%s", info.notice)
            else:
                log.info("worker %s ready", self.worker_id)
            events = self._events
            affinity = self._affinity(model)
            self._worker = worker = Worker(
                Lifecycle(self.backends.jobs, publish=publish_changes(events)),
                Predictor(model, checker, adapters=AdapterFiles(LoraCatalog.from_settings(settings))),
                blob_store(settings),
                WorkerConfig(
                    worker_id=self.worker_id,
                    lease_seconds=settings.lease_seconds,
                    heartbeat_seconds=settings.heartbeat_seconds,
                    reap_seconds=min(10.0, settings.lease_seconds / 3),
                    max_attempts=settings.max_attempts,
                    storage_outage_seconds=settings.storage_outage_seconds,
                    decode_limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
                    overlap=settings.overlap,
                ),
                report_storage=lambda problem: self.registration.update(storage_error=problem),
                choose=affinity.choose if affinity is not None else None,
            )
            if self.backends.scale_out:
                # A job queued (or put back after a lost worker) anywhere wakes us at once,
                # for as long as this worker runs.
                queued = Status.STARTING.value
                with listening(
                    self.backends.bus, lambda event: worker.wakeup.set() if event.status == queued else None
                ):
                    worker.run_forever(self.stop)
            else:
                worker.run_forever(self.stop)
            log.info("worker %s stopped", self.worker_id)
            return 0
        finally:
            self.registration.stop()  # gone on purpose: nobody waits for our silence
            self.backends.close()

    def _affinity(self, model: ImageModel) -> Affinity | None:
        """Adapter affinity, for a model that loads adapters, where it may have peers: other
        workers of ``serve``, or workers anywhere (scale-out). A lone worker claims the
        oldest job through the store's own claim, as ever."""
        several = self.backends.scale_out or self.settings.local_workers > 1
        if not isinstance(model, HasAdapters) or not several:
            return None
        adapters = model.adapters

        def loaded() -> list[str]:
            names = adapters.counters().get("loaded")
            return [str(name) for name in names] if isinstance(names, list) else []

        return Affinity(
            self.worker_id,
            self.backends.jobs,
            self.backends.registry,
            loaded=loaded,
            announce=lambda: self.registration.update(None, None, **model_details(model)),
            ttl=self.settings.worker_ttl_seconds,
        )

    def _store_details(self) -> dict[str, object]:
        lost = self.backends.lost_data()
        return {"data_lost": lost} if lost is not None else {}

    def drain_on(self, *signals: signal.Signals) -> None:
        """On these signals, finish the job at hand, then exit (a drain, not an abort)."""

        def handle(signum: int, frame: FrameType | None) -> None:
            log.warning("%s: finishing the running job, then exiting", signal.Signals(signum).name)
            self.request_stop()

        for signum in signals:
            signal.signal(signum, handle)


def configure_logging(log_format: LogFormat = "text") -> None:
    """A worker process's log, in the style of its server's (worker/logs.py)."""
    configure_process_logging("worker", log_format, prefix="worker: ")


def worker_id_from_env() -> str | None:
    return os.environ.get("FLUXREDUX_WORKER_ID") or None

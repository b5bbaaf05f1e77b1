"""The worker process: loads the model, then claims and runs jobs until its parent goes.

Started by ``fluxredux serve`` (see supervisor.py), configured by FLUXREDUX_* variables.
Like a worker on any machine it talks to the job store, the worker registry (where it
says whether its model loaded, and whether its outputs can be stored) and the event bus
itself; the embedded bus is a pipe to the server (FLUXREDUX_EVENT_FD), one line per job
change. stdin brings wake-ups ("a job was queued"); when it closes the parent is gone,
and the worker exits at once: the parent's restart recovers its job.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading

from fluxredux.config import Settings
from fluxredux.errors import FluxReduxError
from fluxredux.images import DecodeLimits
from fluxredux.jobs import Lifecycle, SQLiteJobStore
from fluxredux.jobs.events import JobEvent, PipePublisher
from fluxredux.jobs.registry import SQLiteWorkerRegistry
from fluxredux.logs import quiet_libraries
from fluxredux.storage import blob_store
from fluxredux.worker.factories import build_checker, build_model
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor
from fluxredux.worker.registration import Registration

log = logging.getLogger("fluxredux.worker")


def main() -> None:
    # Ctrl+C in a terminal reaches the whole process group; the server decides when the
    # worker stops (it terminates it on shutdown), so the worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="worker: %(levelname)s %(message)s", stream=sys.stderr)
    quiet_libraries(verbose=False)
    settings = Settings()
    events = PipePublisher.from_fd(int(os.environ["FLUXREDUX_EVENT_FD"]))
    worker_id = os.environ.get("FLUXREDUX_WORKER_ID") or f"{socket.gethostname()}-{secrets.token_hex(4)}"
    registration = Registration(
        SQLiteWorkerRegistry(settings.database_path, busy_timeout=settings.store_busy_timeout_seconds),
        worker_id,
        model=settings.model,
        device=settings.device or "auto",
        every=settings.heartbeat_seconds,
    )
    registration.start()
    try:
        model = build_model(settings)
        checker = build_checker(settings)
    except FluxReduxError as exc:
        log.error("%s", exc.message)
        registration.update("failed", error=exc.to_dict())
        sys.exit(3)
    info = model.info
    registration.update("ready", model=info.describe(), demo=info.is_demo, notice=info.notice)

    store = SQLiteJobStore(settings.database_path, busy_timeout=settings.store_busy_timeout_seconds)
    worker = Worker(
        Lifecycle(store, publish=lambda job: events.publish(JobEvent(job.id, job.status.value))),
        Predictor(model, checker),
        blob_store(settings),
        WorkerConfig(
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            decode_limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
        ),
        report_storage=lambda problem: registration.update(storage_error=problem),
    )
    threading.Thread(target=_watch_parent, args=(worker,), daemon=True).start()
    worker.run_forever(threading.Event())


def _watch_parent(worker: Worker) -> None:
    for _line in sys.stdin:
        worker.wakeup.set()
    os._exit(0)  # stdin closed: the server is gone; it recovers our job when it restarts


if __name__ == "__main__":
    main()

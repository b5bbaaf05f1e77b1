"""The worker process that ``fluxredux serve`` starts (see supervisor.py).

Configured by FLUXREDUX_* variables, it is a worker like any other (worker/process.py).
What makes it a child: stdin brings wake-ups ("a job was queued") and, when it closes,
the news that the server is gone, upon which the worker exits at once (the server's
restart, or another node's maintenance, recovers its job). In the embedded mode its job
events go to the server over a pipe (FLUXREDUX_EVENT_FD); with Redis they go to Redis.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from fluxredux.backends.sqlite.events import PipePublisher
from fluxredux.config import Settings
from fluxredux.worker.process import WorkerProcess, configure_logging, worker_id_from_env


def main() -> None:
    # Ctrl+C in a terminal reaches the whole process group; the server decides when the
    # worker stops (it sends SIGTERM on shutdown: finish the job, then exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings()
    configure_logging(settings.log_format)  # the server's format: its log and ours are one
    event_fd = os.environ.get("FLUXREDUX_EVENT_FD")
    process = WorkerProcess(
        settings,
        worker_id=worker_id_from_env(),
        events=PipePublisher.from_fd(int(event_fd)) if event_fd else None,
        freeze_gc=True,
        announce_model=False,  # the server says which, once per start (supervisor.py)
    )
    process.drain_on(signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(process,), daemon=True).start()
    sys.exit(process.run())


def _watch_parent(process: WorkerProcess) -> None:
    for _line in sys.stdin:
        process.wake()
    os._exit(0)  # stdin closed: the server is gone; its restart recovers our job


if __name__ == "__main__":
    main()

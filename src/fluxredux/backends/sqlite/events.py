"""Job events on one machine: each worker child writes one line per event to a pipe
(``PipePublisher``); the server reads every attached pipe and dispatches in its own process
(``PipeEventBus``)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import IO

from fluxredux.jobs.events import JobEvent, LocalEventBus

log = logging.getLogger(__name__)


class PipeEventBus(LocalEventBus):
    """The server's side of the embedded mode: events of this process, plus those each
    attached worker pipe carries (one reader thread per pipe, ending with the pipe)."""

    def attach(self, read_fd: int) -> threading.Thread:
        reader = threading.Thread(target=self._read, args=(read_fd,), name="event-pipe", daemon=True)
        reader.start()
        return reader

    def _read(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r") as stream:
            for line in stream:
                try:
                    event = JobEvent.decode(line)
                except ValueError:
                    log.warning("malformed event from a worker: %r", line[:200])
                    continue
                self.publish(event)


class PipePublisher:
    """The worker's side: one line per event; safe from several threads."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> PipePublisher:
        return cls(os.fdopen(fd, "w"))

    def publish(self, event: JobEvent) -> None:
        try:
            with self._lock:
                self._stream.write(event.encode())
                self._stream.flush()
        except (OSError, ValueError):  # the server is gone: it recovers our jobs from the store
            log.debug("event not sent: %s", event)

    def close(self) -> None:
        # A broken pipe on the final flush: nothing is waiting for it anyway.
        with self._lock, contextlib.suppress(OSError):
            self._stream.close()

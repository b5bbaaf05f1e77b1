"""The event bus: "job X changed to status S", from whoever changed it to whoever waits.

The lifecycle publishes every change; long-polls, webhooks and metrics listen. A message
is only a wake-up: listeners read the job from the store, so a lost message costs latency
(long-polls also re-read on a slow timer), never correctness.

Implementations:
- ``LocalEventBus``: publisher and listeners in one process (tests, one-process runs).
- ``PipeEventBus``: the embedded mode. The worker child writes one line per event to a
  pipe (``PipePublisher``); the server reads every attached pipe and dispatches locally.
- Redis pub/sub for many machines (the scale-out issue), behind the same protocol.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    status: str

    def encode(self) -> str:
        return f"{self.job_id} {self.status}\n"

    @classmethod
    def decode(cls, line: str) -> JobEvent:
        job_id, status = line.strip().split(" ", 1)
        return cls(job_id, status)


Listener = Callable[[JobEvent], None]


class EventPublisher(Protocol):
    def publish(self, event: JobEvent) -> None:
        """Send ``event``; never raises (a lost wake-up only delays a listener)."""


class EventBus(EventPublisher, Protocol):
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` for every event published anywhere on this bus (from any
        thread: listeners must be quick and thread-safe, e.g. hand over to a loop)."""

    def close(self) -> None: ...


class LocalEventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def publish(self, event: JobEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("job event listener failed")

    def close(self) -> None:
        with self._lock:
            self._listeners.clear()

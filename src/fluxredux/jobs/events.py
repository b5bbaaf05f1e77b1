"""The event bus: "job X changed to status S", from whoever changed it to whoever waits.

The lifecycle publishes every change; long-polls, webhooks and metrics listen. A message
is a wake-up: a lost one costs latency (long-polls also re-read the store on a slow timer),
never correctness. An end (succeeded, failed, canceled) carries the job as that end
recorded it, so that what it wakes (every long-poll of the job, the webhook) answers
without reading the store again: an ended job's outcome no longer changes. Any other event
is a bare wake-up; its listeners read the job from the store.

Implementations:
- ``LocalEventBus`` (here): publisher and listeners in one process; the fan-out the
  other two use for their own listeners.
- ``PipeEventBus`` (backends/sqlite/events.py): the embedded mode. The worker child writes
  one line per event to a pipe; the server reads every attached pipe and dispatches locally.
- ``RedisEventBus`` (backends/redis/events.py): pub/sub for many machines.

Listeners are scoped: ``add_listener`` returns the function that removes it, and
``listening`` is the block form, so nothing that stops listening stays subscribed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from fluxredux.jobs.job import Job, job_from_json, job_to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    status: str
    # An end's event: the job as its end recorded it (read-only). Not part of the event's
    # identity: an event is the same with or without it.
    job: Job | None = field(default=None, compare=False, repr=False)

    def encode(self) -> str:
        """One line: ``id status``, then the job's stored form (JSON, one line) if it carries it."""
        tail = f" {job_to_json(self.job)}" if self.job is not None else ""
        return f"{self.job_id} {self.status}{tail}\n"

    @classmethod
    def decode(cls, line: str) -> JobEvent:
        """The event ``encode`` wrote; ValueError if ``line`` is not one."""
        job_id, status, *rest = line.strip().split(" ", 2)
        if not rest:
            return cls(job_id, status)
        try:
            job = job_from_json(rest[0])
        except (TypeError, KeyError, AttributeError) as exc:  # JSON, but not a job's
            raise ValueError(f"not a job: {exc}") from exc
        if job.id != job_id or job.status.value != status:
            raise ValueError("the job it carries is not the event's")
        return cls(job_id, status, job)

    @classmethod
    def of(cls, job: Job) -> JobEvent:
        return cls(job.id, job.status.value, job if job.is_terminal else None)


Listener = Callable[[JobEvent], None]
Unsubscribe = Callable[[], None]


class EventPublisher(Protocol):
    def publish(self, event: JobEvent) -> None:
        """Send ``event``; never raises (a lost wake-up only delays a listener)."""


def publish_changes(events: EventPublisher) -> Callable[[Job], None]:
    """What a ``Lifecycle`` publishes with: each job it changed, as a ``JobEvent`` on ``events``."""

    def publish(job: Job) -> None:
        events.publish(JobEvent.of(job))

    return publish


class EventBus(EventPublisher, Protocol):
    def add_listener(self, listener: Listener) -> Unsubscribe:
        """Call ``listener`` for every event published anywhere on this bus (from any
        thread: listeners must be quick and thread-safe, e.g. hand over to a loop), until
        the returned function is called (idempotent)."""

    def close(self) -> None: ...


@contextmanager
def listening(bus: EventBus, listener: Listener) -> Iterator[None]:
    """``listener`` hears the bus only inside the block: a listener that outlives what it
    wakes would keep that object alive and be called for nothing, once per event."""
    unsubscribe = bus.add_listener(listener)
    try:
        yield
    finally:
        unsubscribe()


class LocalEventBus:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def add_listener(self, listener: Listener) -> Unsubscribe:
        # Each subscription is its own entry (a wrapper), so one listener added twice is
        # heard twice and removed once per unsubscribe, never both at once.
        def entry(event: JobEvent) -> None:
            listener(event)

        with self._lock:
            self._listeners.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._listeners:
                    self._listeners.remove(entry)

        return unsubscribe

    @property
    def listener_count(self) -> int:
        with self._lock:
            return len(self._listeners)

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

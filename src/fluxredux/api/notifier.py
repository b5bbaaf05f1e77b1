"""Job change notifications inside the HTTP process, on its event loop.

It listens to the event bus (``jobs.events``) and hands each event over to the loop:
long-poll requests wait here for their job to change instead of sleeping and re-reading;
webhook delivery and metrics listen here too. ``publish`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fluxredux.jobs.events import JobEvent, Unsubscribe

log = logging.getLogger(__name__)


Listener = Callable[[JobEvent], None]


class Notifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listeners: list[Listener] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def listen(self, listener: Listener) -> Unsubscribe:
        """Call ``listener`` on the loop for every event until the returned function is
        called (an app started twice on one notifier must not count each event twice)."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def publish(self, event: JobEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._dispatch(event)
        else:
            loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: JobEvent) -> None:
        for waiter in self._waiters.get(event.job_id, ()):
            waiter.set()
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("job event listener failed")

    def subscribe(self, job_id: str) -> asyncio.Event:
        """Register interest before reading the job's state, so no change is missed."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[job_id]

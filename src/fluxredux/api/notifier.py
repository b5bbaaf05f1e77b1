"""Job change notifications inside the HTTP process, on its event loop.

It listens to the event bus (``jobs.events``) and hands each event over to the loop:
long-poll requests wait here for their job to end instead of sleeping and re-reading (a
waiter is woken by its job's terminal event only: a long-poll answers nothing before the
end, and each step's wake-up would cost it a read of the job); webhook delivery and metrics
listen here too, to every event. ``publish`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fluxredux.errors import WouldWait
from fluxredux.jobs.events import JobEvent, Unsubscribe
from fluxredux.jobs.job import TERMINAL, Job

log = logging.getLogger(__name__)


Listener = Callable[[JobEvent], None]

_ENDS = frozenset(status.value for status in TERMINAL)


class EndWaiter:
    """One long-poll's wait for its job's end: woken by the end's event, it holds the job
    as that event carried it (None: a bare wake-up; the poll reads the job instead)."""

    def __init__(self) -> None:
        self._woken = asyncio.Event()
        self._ended: Job | None = None

    def wake(self, ended: Job | None) -> None:
        self._ended = ended or self._ended
        self._woken.set()

    async def wait(self) -> None:
        await self._woken.wait()

    def take(self) -> Job | None:
        """The ended job a wake-up brought, if any; and the wake-up consumed (a poll calls
        this before it reads, so an end that lands after the read still wakes it)."""
        self._woken.clear()
        ended, self._ended = self._ended, None
        return ended


class Notifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[EndWaiter]] = {}
        self._watchers: dict[str, set[EndWaiter]] = {}  # woken by every event of their job
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

        if event.status in _ENDS:
            for waiter in self._waiters.get(event.job_id, ()):
                waiter.wake(event.job)
        for watcher in self._watchers.get(event.job_id, ()):
            watcher.wake(event.job)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("job event listener failed")

    def subscribe(self, job_id: str) -> EndWaiter:
        """Register interest before reading the job's state, so its end is not missed: the
        waiter is woken when the job ends (succeeded, failed, canceled)."""
        waiter = EndWaiter()
        self._waiters.setdefault(job_id, set()).add(waiter)
        return waiter

    def unsubscribe(self, job_id: str, waiter: EndWaiter) -> None:
        _discard(self._waiters, job_id, waiter)

    def watch(self, job_id: str) -> EndWaiter:
        """As ``subscribe``, but woken by every change of the job (an event stream's), not
        only by its end; the end's wake-up still carries the ended job."""
        waiter = EndWaiter()
        self._watchers.setdefault(job_id, set()).add(waiter)
        return waiter

    def unwatch(self, job_id: str, waiter: EndWaiter) -> None:
        _discard(self._watchers, job_id, waiter)


def _discard(waiters: dict[str, set[EndWaiter]], job_id: str, waiter: EndWaiter) -> None:
    of_job = waiters.get(job_id)
    if of_job is not None:
        of_job.discard(waiter)
        if not of_job:
            del waiters[job_id]


class SharedReads:
    """Reads of a job from the event loop, shared by the tasks that want it at once.

    A job's end wakes every long-poll waiting for it and the app's own listener (metrics,
    webhooks), and each would read the job in a thread of its own at the same moment: a
    thread hop each, on a busy loop. Here they share one read, provided it started after
    the moment each of them needs a state from (``after``: a read that began earlier may
    have missed the change that woke it)."""

    def __init__(
        self, read: Callable[[str], Job | None], now: Callable[[str], Job | None] | None = None
    ) -> None:
        self._read = read
        # The same read where the store answers it at once (else WouldWait): on the loop,
        # no hop, nothing to share.
        self._now = now
        self._pending: dict[str, tuple[float, asyncio.Future[Job | None]]] = {}

    async def get(self, job_id: str, after: float) -> Job | None:
        """The job as read in a thread that started at ``after`` (time.monotonic()) or later
        (or read now, on the loop, where the store answers without waiting)."""
        if self._now is not None:
            with contextlib.suppress(WouldWait):
                return self._now(job_id)
        pending = self._pending.get(job_id)
        if pending is None or pending[0] < after:
            started = time.monotonic()
            future = asyncio.ensure_future(asyncio.to_thread(self._read, job_id))
            self._pending[job_id] = pending = (started, future)
            future.add_done_callback(lambda done: self._forget(job_id, done))
        # Shielded: one reader's cancel (its request cut) must not cancel the others' read.
        return await asyncio.shield(pending[1])

    def _forget(self, job_id: str, done: asyncio.Future[Job | None]) -> None:
        pending = self._pending.get(job_id)
        if pending is not None and pending[1] is done:
            del self._pending[job_id]
        if not done.cancelled():
            done.exception()  # retrieved: a failed read nobody awaited any more is not logged as lost

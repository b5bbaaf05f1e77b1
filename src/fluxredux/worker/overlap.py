"""One background slot for the post stage of a job (safety check, encode, store, record),
so that the worker's loop can start the next job's model stage meanwhile.

One slot, not a pool: the post stage of job N runs while job N+1's model runs; if N+1's
model is done first, N+1 waits for N's post stage before starting its own. So at most two
jobs' decoded images are held at once (one being finished, one waiting), never a backlog
that grows while the CPU falls behind the GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class PostStageSlot:
    """The slot, run by one long-lived thread (a thread started per job would be a hand-over
    between threads on the path of every prediction); the thread ends by itself after
    ``idle_seconds`` without work, and starts again with the next."""

    def __init__(self, name: str = "post-stage", *, idle_seconds: float = 30.0) -> None:
        self._name = name
        self._idle_seconds = idle_seconds
        self._changed = threading.Condition()
        self._work: Callable[[], None] | None = None  # handed over, not yet taken
        self._busy = False  # work handed over and not yet ended
        self._thread: threading.Thread | None = None

    def start(self, work: Callable[[], None]) -> float:
        """Wait for the previous work to end, then run ``work`` on the slot's thread.
        Returns the seconds spent waiting. ``work`` must end its job whatever happens;
        anything it still raises is logged (its lease then runs out, as for a lost worker)."""
        waited = self.wait()
        with self._changed:
            self._work, self._busy = work, True
            # A daemon thread, as the lease keeper's is: the loop waits for the work on every
            # way out (drain included); only an abrupt exit skips that, and the lease covers it.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify_all()
        return waited

    def wait(self) -> float:
        """Block until the running work (if any) has ended; the seconds waited."""
        with self._changed:
            if not self._busy:
                return 0.0
            started = time.perf_counter()
            while self._busy:
                self._changed.wait()
            return time.perf_counter() - started

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._work is None:
                    self._changed.wait_for(lambda: self._work is not None, self._idle_seconds)
                if self._work is None:  # idle for long enough: end (the next start makes another)
                    self._thread = None
                    return
                work, self._work = self._work, None
            try:
                _logged(work)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()


def _logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("a post stage failed unexpectedly")

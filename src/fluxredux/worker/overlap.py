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
    def __init__(self, name: str = "post-stage") -> None:
        self._name = name
        self._thread: threading.Thread | None = None

    def start(self, work: Callable[[], None]) -> float:
        """Wait for the previous work to end, then run ``work`` on a thread of its own.
        Returns the seconds spent waiting. ``work`` must end its job whatever happens;
        anything it still raises is logged (its lease then runs out, as for a lost worker)."""
        waited = self.wait()
        # A daemon thread, as the heartbeats are: the loop waits for it on every way out
        # (drain included); only an abrupt exit skips that, and the lease covers that case.
        self._thread = threading.Thread(target=_logged, args=(work,), name=self._name, daemon=True)
        self._thread.start()
        return waited

    def wait(self) -> float:
        """Block until the running work (if any) has ended; the seconds waited."""
        thread, self._thread = self._thread, None
        if thread is None:
            return 0.0
        started = time.perf_counter()
        thread.join()
        return time.perf_counter() - started


def _logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:
        log.exception("a post stage failed unexpectedly")

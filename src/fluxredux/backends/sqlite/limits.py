"""Request limits on one machine: counted in the memory of its one HTTP process.

Embedded mode has a single HTTP process, so no table is needed; the limiter is exact there
and forgets its counts on restart (a minute's window at most).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from fluxredux.jobs.limits import rate_limited


class InProcessRateLimiter:
    """RateLimiter in this process's memory: exact for one API node, not shared by several."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._window = window
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window(self) -> float:
        return self._window

    def hit(self, key: str, what: str) -> None:
        with self._lock:
            # Read the clock under the lock: times then enter each deque in order.
            now = self.clock()
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self._window:
                hits.popleft()
            if len(hits) >= self._limit:
                raise rate_limited(self._limit, self._window, hits[0] + self._window - now, what)
            hits.append(now)

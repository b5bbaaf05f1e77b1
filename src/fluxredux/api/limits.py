"""Per-key request limits: a sliding one-minute window, plus what it means to be over it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from fluxredux.errors import RateLimited


class SlidingWindowLimiter:
    """At most ``limit`` hits per ``window`` seconds per key; a refused hit is not counted."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, what: str) -> None:
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                retry_after = hits[0] + self.window - now
                raise RateLimited(
                    f"rate limit: at most {self.limit} {what} per {self.window:g} s per API key; "
                    f"retry in {max(1, round(retry_after))} s",
                    retry_after=retry_after,
                    limit=self.limit,
                    window_seconds=self.window,
                )
            hits.append(now)

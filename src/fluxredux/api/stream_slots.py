"""How many event streams are open on this API node, per key and in all.

A stream holds a connection, a task and a watcher of its job for as long as the job runs
(minutes in a long queue): without a bound, one key could hold them by the thousand. The
count is per node (each API node bounds its own connections, as it bounds its sockets);
with N nodes behind a balancer a key may hold N times ``per_key``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from fluxredux.errors import TooManyStreams


class StreamSlots:
    """The event streams open on this API node, per key: at most ``per_key`` and ``total``."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self._open: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def take(self, key_id: str) -> Callable[[], None]:
        """A stream of ``key_id``'s, open until the returned function is called (once or
        more: only the first counts); TooManyStreams when the key or the node has no room."""
        if self._open[key_id] >= self.per_key:
            raise TooManyStreams(
                f"this key has {self.per_key} event streams open, the most it may; close one first",
                retry_after=5,
                limit=self.per_key,
            )
        if self.open >= self.total:
            raise TooManyStreams("the server has as many event streams open as it may", retry_after=5)
        self._open[key_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._open[key_id] -= 1
            if not self._open[key_id]:
                del self._open[key_id]

        return release

"""What the Redis registry, limiter, event bus and outbox share: a client from a URL or a
given client, a clock (Redis TIME unless a test injects one), and the Lua preamble every
script starts with.

Times cross the Lua boundary as strings formatted with ``%.17g``: Lua turns a number into
a string with ``%.14g`` by default (when it is passed to ``redis.call`` or returned), which
would round unix times with microseconds, and a lease compared against a rounded copy of
itself would be off by a hair. ``%.17g`` round-trips every double exactly, so a time the
script computes equals the same sum computed in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from fluxredux.redis_backend import connect, server_time

ClientOrUrl = str | redis.Redis

# Every script begins with these. ``clock_now(value)``: the injected clock's time when the
# caller passed one (tests), else the server's TIME, read inside the script so that the
# decision and its time stamp are one atomic step on the one clock all machines share.
LUA_PREAMBLE = """
local function clock_now(value)
  if value ~= nil and value ~= '' then return tonumber(value) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
"""


def open_client(url_or_client: ClientOrUrl) -> tuple[Any, bool]:
    """The client to use, and whether we opened it (then ``close`` closes it). A given
    client must decode responses (``decode_responses=True``, as ``connect`` makes it).

    Returned as Any: redis-py's annotations make every command's result a union with an
    Awaitable (the sync and async clients share them), which strict mypy cannot narrow."""
    if isinstance(url_or_client, str):
        return connect(url_or_client), True
    return url_or_client, False


class Clocked:
    """``now()`` for a Redis-backed seam: the injected clock if any, else Redis TIME."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] | None) -> None:
        self._time_client = client
        self._clock = clock

    def now(self) -> float:
        return self._clock() if self._clock is not None else server_time(self._time_client)

    def now_arg(self) -> str:
        """What a script gets as its time: the injected clock's time, or '' for TIME."""
        return repr(float(self._clock())) if self._clock is not None else ""


def fmt_time(value: float) -> str:
    """A float as a script argument, exactly (repr round-trips, like the script's %.17g)."""
    return repr(float(value))

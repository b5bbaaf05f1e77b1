"""What the Redis seams (job store, registry, limiter, event bus, outbox, key, share and
upload stores) share: a client from a URL or a given client, a clock (Redis TIME unless a
test injects one), both in the ``RedisSeam`` base, and the Lua preamble every script
starts with.

Times cross the Lua boundary as strings formatted with ``%.17g``: Lua turns a number into
a string with ``%.14g`` by default (when it is passed to ``redis.call`` or returned), which
would round unix times with microseconds, and a lease compared against a rounded copy of
itself would be off by a hair. ``%.17g`` round-trips every double exactly, so a time the
script computes equals the same sum computed in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import redis

from fluxredux.backends.redis.client import connect, redis_errors, server_time

ClientOrUrl = str | redis.Redis
# An injected clock (tests): unix time as a float. None instead means Redis TIME.
Clock = Callable[[], float]
_T = TypeVar("_T")

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

    def __init__(self, client: redis.Redis, clock: Clock | None) -> None:
        self._time_client = client
        self._clock = clock

    def now(self) -> float:
        return self._clock() if self._clock is not None else server_time(self._time_client)

    def now_arg(self) -> str:
        """What a script gets as its time: the injected clock's time, or '' for TIME."""
        return repr(float(self._clock())) if self._clock is not None else ""


class RedisSeam:
    """What every Redis implementation of a seam (job store, registry, outbox, limiter, event
    bus, key, share and upload stores) starts from, written once rather than in each: the
    client (``_redis``, from a URL or a given client, see ``open_client``), the clock
    (``_clock``: an injected one, else Redis TIME, the one clock all machines agree on),
    ``_script`` for Lua scripts, ``now()``, and ``close()``, which closes the client only
    when it was opened here (a given client belongs to whoever gave it)."""

    def __init__(self, url_or_client: ClientOrUrl, clock: Clock | None = None) -> None:
        self._redis, self._owned = open_client(url_or_client)
        self._clock = Clocked(self._redis, clock)

    def _script(self, source: str) -> Any:
        # redis-py's Script object: runs EVALSHA, loads the script again after a Redis
        # restart; Any because its results are untyped.
        return self._redis.register_script(source)

    def now(self) -> float:
        return self._clock.now()

    def close(self) -> None:
        if self._owned:
            self._redis.close()


def fmt_time(value: float) -> str:
    """A float as a script argument, exactly (repr round-trips, like the script's %.17g)."""
    return repr(float(value))


def batched(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """``items`` in lists of ``size`` (the last one shorter): long inputs go to Redis in
    several short scripts or commands rather than one that blocks it."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# How many fresh ids ``create_with_fresh_id`` tries: a random id of 48 bits or more is
# taken by another record about never, but an existing record must never be overwritten.
CREATE_TRIES = 3


def create_with_fresh_id(new_id: Callable[[], _T], write: Callable[[_T], Any], what: str) -> tuple[_T, Any]:
    """``write(new_id())`` until one takes, as (the id, what ``write`` returned). ``write``
    returns None when the id is taken (then a fresh one is tried); Redis failures raise
    StoreUnavailable, and RuntimeError follows ``CREATE_TRIES`` taken ids (never, really).
    ``what`` names the id in that error."""
    for _ in range(CREATE_TRIES):
        fresh = new_id()
        with redis_errors("written"):
            written = write(fresh)
        if written is not None:
            return fresh, written
    raise RuntimeError(f"no free {what} in {CREATE_TRIES} tries")


# KEYS: a sorted set of ids. ARGV: the hashes' key prefix, how many ids at most ('' for
# all), then the fields to read. Lowest score first: {id, field values, id, ...} for each
# id whose hash has its first field (an id left over from a deleted hash is skipped).
_INDEXED_HASHES = """
local stop = -1
if ARGV[2] ~= '' then stop = tonumber(ARGV[2]) - 1 end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, stop)) do
  local f = redis.call('HMGET', ARGV[1] .. id, unpack(ARGV, 3))
  if f[1] then
    out[#out + 1] = id
    for i = 1, #ARGV - 2 do out[#out + 1] = f[i] end
  end
end
return out
"""


class IndexedHashes:
    """Hashes ``{hash_prefix}{id}`` read through a sorted set of their ids (an index), in one
    script: one consistent snapshot. The script builds the hash keys from the prefix inside
    Lua, which a single Redis server (or a replicated pair) allows, not Redis Cluster."""

    def __init__(self, client: Any, hash_prefix: str, *fields: str) -> None:
        # redis-py's Script object (EVALSHA, reloaded after a restart); untyped results.
        self._script: Any = client.register_script(_INDEXED_HASHES)
        self._hash_prefix = hash_prefix
        self._fields = fields

    def read(self, index: str, limit: int | None = None) -> list[list[Any]]:
        """[id, *fields] per hash, lowest score first; the first ``limit`` ids when given
        (``limit`` > 0)."""
        args = [self._hash_prefix, "" if limit is None else str(limit), *self._fields]
        with redis_errors("read"):
            flat = self._script(keys=[index], args=args)
        width = len(self._fields) + 1
        return [flat[i : i + width] for i in range(0, len(flat), width)]

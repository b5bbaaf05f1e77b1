"""The rate limiter in Redis: one sliding window per key, shared by every API node.

One Lua script per hit over a sorted set per key (``{prefix}limit:{key}``), members
scored by the time of each counted hit: drop the scores at or before ``now - window``;
if fewer than ``limit`` remain, add ``now``, else answer the oldest score. Deciding and
recording are one atomic step inside Redis, so two nodes can never both let the last
allowed hit through. ``now`` is Redis TIME read inside the script (one clock for every
node), or an injected clock's time passed in (tests).
"""

from __future__ import annotations

import math
import secrets

from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import LUA_PREAMBLE, ClientOrUrl, Clock, RedisSeam
from fluxredux.jobs.limits import rate_limited

# KEYS: the key's sorted set. ARGV: now or '', limit, window, a unique member suffix,
# the key's expiry in ms.
# Returns {1} when counted, {0, oldest score, now} when refused (times as %.17g strings:
# a Lua number returned to Redis would be truncated to an integer).
_HIT = (
    LUA_PREAMBLE
    + """
local now = clock_now(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - window))
if redis.call('ZCARD', KEYS[1]) < limit then
  -- Members must be unique (many hits can share one time stamp); the score is the time.
  redis.call('ZADD', KEYS[1], fmt(now), fmt(now) .. ':' .. ARGV[4])
  -- Idle keys go away by themselves: after a window with no hit, nothing in it counts.
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {1}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #oldest == 0 then return {0, fmt(now), fmt(now)} end  -- limit 0: a window's wait
return {0, oldest[2], fmt(now)}
"""
)


class RedisRateLimiter(RedisSeam):
    """RateLimiter shared by every API node of a deployment (keys under ``prefix``).

    Exact under any number of threads and nodes: every decision is one script. With an
    injected ``clock`` the idle-key expiry still runs on Redis's real clock; it is at least
    one window long, so it only ever drops keys whose hits all expired in real time."""

    def __init__(
        self,
        url_or_client: ClientOrUrl,
        limit: int,
        window: float = 60.0,
        *,
        prefix: str = "fluxredux:",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(url_or_client, clock)
        self._limit = limit
        self._window = window
        self._prefix = f"{prefix}limit:"
        # One more second than the window: expiry must never drop a hit that still counts.
        self._expire_ms = str(math.ceil(window * 1000) + 1000)
        self._hit = self._script(_HIT)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window(self) -> float:
        return self._window

    def hit(self, key: str, what: str) -> None:
        # A random suffix keeps members unique across nodes without another round trip.
        args = [self._clock.now_arg(), str(self._limit), repr(float(self._window))]
        with redis_errors("written"):
            answer = self._hit(keys=[self._prefix + key], args=[*args, secrets.token_hex(8), self._expire_ms])
        if int(answer[0]) == 1:
            return
        oldest, now = float(answer[1]), float(answer[2])
        raise rate_limited(self._limit, self._window, oldest + self._window - now, what)

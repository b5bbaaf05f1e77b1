"""The webhook outbox in Redis: one delivery record per prediction, claimed with a lease,
shared by the sweepers of every API node.

Keys (under the deployment's prefix):
- ``{prefix}webhook:{prediction_id}``: a hash per delivery (the Delivery fields; '' for None);
- ``{prefix}webhooks:due``: the pending prediction ids, scored by ``next_at`` (a claim moves
  the score to the lease's end; a final delivery leaves the set);
- ``{prefix}webhooks:finished``: the final ones, scored by ``finished_at`` (for ``forget``).

``enqueue``, ``claim_due``, the fenced outcomes and ``forget`` are Lua scripts, so each is
one atomic step, stamped with Redis TIME inside the script (or an injected clock's time
passed in). The scripts reach delivery hashes by name from the prefix, which a single
Redis server (or a replicated pair) allows; Redis Cluster would need hash tags.
"""

from __future__ import annotations

from typing import cast

from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import LUA_PREAMBLE, ClientOrUrl, Clock, RedisSeam, fmt_time
from fluxredux.jobs.outbox import Delivery, DeliveryState

# How many final records one ``forget`` script deletes: a long backlog is deleted in
# several short scripts rather than one that blocks Redis.
_FORGET_BATCH = 500

# KEYS: the delivery's hash, due. ARGV: now or '', prediction id, url. Returns the hash.
_ENQUEUE = (
    LUA_PREAMBLE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = fmt(clock_now(ARGV[1]))
  redis.call('HSET', KEYS[1], 'url', ARGV[3], 'created_at', now, 'state', 'pending',
    'attempts', 0, 'next_at', now, 'claim_owner', '', 'claim_expires_at', '',
    'claim_token', 0, 'finished_at', '')
  redis.call('ZADD', KEYS[2], now, ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: due. ARGV: now or '', owner, lease seconds, limit, hash key prefix.
# Returns {id, HGETALL, id, HGETALL, ...} of what it claimed, earliest first (ties by id:
# a sorted set orders equal scores by member).
_CLAIM = (
    LUA_PREAMBLE
    + """
local now = clock_now(ARGV[1])
local until_ = fmt(now + tonumber(ARGV[3]))
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now), 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  local key = ARGV[5] .. id
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HINCRBY', key, 'claim_token', 1)
  redis.call('HSET', key, 'claim_owner', ARGV[2], 'claim_expires_at', until_, 'next_at', until_)
  redis.call('ZADD', KEYS[1], until_, id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', key)
end
return out
"""
)

# KEYS: the delivery's hash, due, finished. ARGV: now or '', prediction id, owner, token,
# outcome ('retry', 'delivered' or 'failed'), delay (retry). Returns the hash, or {} when
# the claim is no longer held (no longer pending, or another claim since: the fence).
_FENCED = (
    LUA_PREAMBLE
    + """
local held = redis.call('HMGET', KEYS[1], 'state', 'claim_owner', 'claim_token')
if held[1] ~= 'pending' or held[2] ~= ARGV[3] or held[3] ~= ARGV[4] then return {} end
local now = clock_now(ARGV[1])
if ARGV[5] == 'retry' then
  local next_at = fmt(now + tonumber(ARGV[6]))
  redis.call('HSET', KEYS[1], 'next_at', next_at, 'claim_owner', '', 'claim_expires_at', '')
  redis.call('ZADD', KEYS[2], next_at, ARGV[2])
else
  local finished = fmt(now)
  redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', finished,
    'claim_owner', '', 'claim_expires_at', '')
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], finished, ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: finished. ARGV: finished_before (exclusive), hash key prefix, batch size.
_FORGET = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[2] .. id)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


def _optional_float(value: str) -> float | None:
    return float(value) if value else None


def _delivery(prediction_id: str, flat: list[str]) -> Delivery:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return Delivery(
        prediction_id=prediction_id,
        url=fields["url"],
        created_at=float(fields["created_at"]),
        state=cast(DeliveryState, fields["state"]),
        attempts=int(fields["attempts"]),
        next_at=float(fields["next_at"]),
        claim_owner=fields["claim_owner"] or None,
        claim_expires_at=_optional_float(fields["claim_expires_at"]),
        claim_token=int(fields["claim_token"]),
        finished_at=_optional_float(fields["finished_at"]),
    )


class RedisWebhookOutbox(RedisSeam):
    """WebhookOutbox shared by every API node of a deployment (keys under ``prefix``)."""

    def __init__(
        self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:", clock: Clock | None = None
    ) -> None:
        super().__init__(url_or_client, clock)
        self._hash_prefix = f"{prefix}webhook:"
        self._due = f"{prefix}webhooks:due"
        self._finished = f"{prefix}webhooks:finished"
        self._enqueue = self._script(_ENQUEUE)
        self._claim = self._script(_CLAIM)
        self._fenced_script = self._script(_FENCED)
        self._forget = self._script(_FORGET)

    def _key(self, prediction_id: str) -> str:
        return self._hash_prefix + prediction_id

    def enqueue(self, prediction_id: str, url: str) -> Delivery:
        with redis_errors("written"):
            flat = self._enqueue(
                keys=[self._key(prediction_id), self._due], args=[self._clock.now_arg(), prediction_id, url]
            )
        return _delivery(prediction_id, flat)

    def get(self, prediction_id: str) -> Delivery | None:
        with redis_errors("read"):
            fields = self._redis.hgetall(self._key(prediction_id))
        if not fields:
            return None
        return _delivery(prediction_id, [item for pair in fields.items() for item in pair])

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Delivery]:
        if limit <= 0:
            return []
        args = [self._clock.now_arg(), owner, fmt_time(lease_seconds), str(limit), self._hash_prefix]
        with redis_errors("written"):
            flat = self._claim(keys=[self._due], args=args)
        return [_delivery(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    def _fenced(self, claimed: Delivery, outcome: str, delay: float = 0.0) -> Delivery | None:
        if claimed.claim_owner is None:  # never claimed: there is no claim to hold
            return None
        keys = [self._key(claimed.prediction_id), self._due, self._finished]
        args = [self._clock.now_arg(), claimed.prediction_id, claimed.claim_owner, str(claimed.claim_token)]
        with redis_errors("written"):
            flat = self._fenced_script(keys=keys, args=[*args, outcome, fmt_time(delay)])
        return _delivery(claimed.prediction_id, flat) if flat else None

    def retry(self, claimed: Delivery, delay: float) -> Delivery | None:
        return self._fenced(claimed, "retry", delay)

    def succeeded(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, "delivered")

    def failed(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, "failed")

    def next_due(self) -> float | None:
        with redis_errors("read"):
            earliest = self._redis.zrange(self._due, 0, 0, withscores=True)
        return float(earliest[0][1]) if earliest else None

    def forget(self, finished_before: float) -> int:
        gone = 0
        while True:
            with redis_errors("written"):
                batch = int(
                    self._forget(
                        keys=[self._finished],
                        args=[fmt_time(finished_before), self._hash_prefix, str(_FORGET_BATCH)],
                    )
                )
            gone += batch
            if batch < _FORGET_BATCH:
                return gone

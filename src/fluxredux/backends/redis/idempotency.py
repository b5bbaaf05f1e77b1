"""Idempotency keys in Redis: a key claimed through one API node is found by every other.

One hash per record, ``{prefix}idempotency:{scope}:{key}`` (the scope is an API key id,
hex without colons, so no key can make two records collide), with the fields of
``IdempotencyRecord`` ('' for None). Claim, complete and release are Lua scripts: each is
one atomic step, the claim's check and write stamped with Redis TIME inside the script
(or an injected clock's time passed in). Expiry is decided from the stored times; Redis
also expires each hash a minute after its 24 h, so nothing needs sweeping.
"""

from __future__ import annotations

from typing import Any

from fluxredux.access.idempotency import (
    CLAIM_SECONDS,
    IDEMPOTENCY_TTL_SECONDS,
    Claim,
    IdempotencyRecord,
    abandoned,
    is_live,
    new_token,
)
from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import LUA_PREAMBLE, ClientOrUrl, Clock, RedisSeam, fmt_time

_FIELDS = ("fingerprint", "token", "prediction_id", "created_at", "expires_at", "claim_expires_at")

# KEYS: the record. ARGV: now or '', fingerprint, token, ttl, claim seconds, prediction id.
# Returns {won (1 or 0), the record's fields in _FIELDS order, then the fields of the record
# it replaced (empty strings when none)}. A record holding this claim's token is this claim,
# resent after its answer was lost: it wins again, changing nothing.
_CLAIM = (
    LUA_PREAMBLE
    + """
local now = clock_now(ARGV[1])
local r = redis.call('HMGET', KEYS[1], 'fingerprint', 'token', 'prediction_id', 'created_at',
  'expires_at', 'claim_expires_at')
if r[1] and r[2] == ARGV[3] then
  return {1, r[1], r[2], r[3], r[4], r[5], r[6], '', '', '', '', '', ''}
end
if r[1] and tonumber(r[5]) > now and (r[6] == '' or tonumber(r[6]) > now) then
  return {0, r[1], r[2], r[3], r[4], r[5], r[6]}
end
local expires = fmt(now + tonumber(ARGV[4]))
local claim = fmt(now + tonumber(ARGV[5]))
if not r[1] then r = {'', '', '', '', '', ''} end
-- The same request's abandoned claim (unfinished, within its 24 h): its prediction is named
-- again (see access.idempotency.inherited).
local prediction = ARGV[6]
if r[1] == ARGV[2] and r[3] ~= '' and r[6] ~= '' and tonumber(r[5]) > now then prediction = r[3] end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[2], 'token', ARGV[3], 'prediction_id', prediction,
  'created_at', fmt(now), 'expires_at', expires, 'claim_expires_at', claim)
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])) + 60)
return {1, ARGV[2], ARGV[3], prediction, fmt(now), expires, claim, r[1], r[2], r[3], r[4], r[5], r[6]}
"""
)

# KEYS: the record. ARGV: token, prediction id, fingerprint. 1 when completed (or completed
# already with that prediction: a resend), 0 when not held.
_COMPLETE = """
local r = redis.call('HMGET', KEYS[1], 'token', 'prediction_id', 'claim_expires_at')
if r[1] ~= ARGV[1] or (r[3] == '' and r[2] ~= ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'prediction_id', ARGV[2], 'fingerprint', ARGV[3], 'claim_expires_at', '')
return 1
"""

# KEYS: the record. ARGV: now or '', token. 1 when released, 0 when not held. The record
# stays, ended: the next claim learns of the prediction this one named.
_RELEASE = (
    LUA_PREAMBLE
    + """
local r = redis.call('HMGET', KEYS[1], 'token', 'claim_expires_at')
if r[1] ~= ARGV[2] or r[2] == '' then return 0 end
redis.call('HSET', KEYS[1], 'claim_expires_at', fmt(math.min(tonumber(r[2]), clock_now(ARGV[1]))))
return 1
"""
)


def _optional_float(value: str) -> float | None:
    return float(value) if value else None


def _record(scope: str, key: str, fields: list[Any]) -> IdempotencyRecord:
    fingerprint, token, prediction_id, created_at, expires_at, claim_expires_at = (str(f) for f in fields)
    return IdempotencyRecord(
        scope,
        key,
        fingerprint,
        token,
        prediction_id or None,
        float(created_at),
        float(expires_at),
        _optional_float(claim_expires_at),
    )


class RedisIdempotencyStore(RedisSeam):
    def __init__(
        self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:", clock: Clock | None = None
    ) -> None:
        super().__init__(url_or_client, clock)
        self._prefix = f"{prefix}idempotency:"
        self._claim = self._script(_CLAIM)
        self._complete = self._script(_COMPLETE)
        self._release = self._script(_RELEASE)

    def _key(self, scope: str, key: str) -> str:
        return f"{self._prefix}{scope}:{key}"

    def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        prediction_id: str,
        *,
        ttl: float = IDEMPOTENCY_TTL_SECONDS,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> Claim:
        args = [
            self._clock.now_arg(),
            fingerprint,
            new_token(),
            fmt_time(ttl),
            fmt_time(claim_seconds),
            prediction_id,
        ]
        with redis_errors("written"):
            won, *fields = self._claim(keys=[self._key(scope, key)], args=args)
        record = _record(scope, key, fields[:6])
        replaced = _record(scope, key, fields[6:]) if len(fields) > 6 and fields[6] else None
        return Claim(won=int(won) == 1, record=record, abandoned=abandoned(replaced, record.created_at))

    def complete(self, claimed: IdempotencyRecord, adopt: IdempotencyRecord | None = None) -> bool:
        made = adopt or claimed
        with redis_errors("written"):
            done = self._complete(
                keys=[self._key(claimed.scope, claimed.key)],
                args=[claimed.token, made.prediction_id or "", made.fingerprint],
            )
        return int(done) == 1

    def release(self, claimed: IdempotencyRecord) -> bool:
        with redis_errors("written"):
            done = self._release(
                keys=[self._key(claimed.scope, claimed.key)], args=[self._clock.now_arg(), claimed.token]
            )
        return int(done) == 1

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        with redis_errors("read"):
            fields = self._redis.hmget(self._key(scope, key), *_FIELDS)
        if fields[0] is None:
            return None
        record = _record(scope, key, fields)
        return record if is_live(record, self.now()) else None

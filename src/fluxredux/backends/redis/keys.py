"""API keys in Redis: one set of keys for every API node of a deployment.

Keys (under the deployment's prefix):
- ``{prefix}keys:id:{key id}``: a hash per key: name, secret_sha256, created_at,
  revoked_at ('' while active). The secret itself is never stored, only its SHA-256;
- ``{prefix}keys:created``: the key ids scored by created_at, the order ``list`` returns.

The key format, the digest, the constant-time check and the one Unauthorized message are
``fluxredux.access.keys``'s, shared with the SQLite store. Creating and revoking are Lua scripts
stamped with Redis TIME (the clock every node shares), so a key and its index entry are
written in one step, and two nodes revoking one key at once revoke it once. The listing
script reaches key hashes by name from the prefix, which a single Redis server (or a
replicated pair) allows; Redis Cluster would need hash tags.
"""

from __future__ import annotations

import builtins

from fluxredux.access.keys import ApiKey, check_key, new_key
from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import (
    LUA_PREAMBLE,
    ClientOrUrl,
    IndexedHashes,
    RedisSeam,
    create_with_fresh_id,
)

# KEYS: the key's hash, the created index. ARGV: id, name, digest.
# Returns created_at (a %.17g string), or false when the id is taken.
_CREATE = (
    LUA_PREAMBLE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local now = fmt(clock_now(''))
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'secret_sha256', ARGV[3], 'created_at', now, 'revoked_at', '')
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"""
)

# KEYS: the key's hash. Returns 1 when it was active and is revoked now, else 0.
_REVOKE = (
    LUA_PREAMBLE
    + """
local revoked = redis.call('HGET', KEYS[1], 'revoked_at')
if revoked == false or revoked ~= '' then return 0 end  -- no such key, or revoked before
redis.call('HSET', KEYS[1], 'revoked_at', fmt(clock_now('')))
return 1
"""
)


def _api_key(key_id: str, name: str, created_at: str, revoked_at: str) -> ApiKey:
    return ApiKey(key_id, name, float(created_at), float(revoked_at) if revoked_at else None)


class RedisKeyStore(RedisSeam):
    """KeyStore shared by every API node of a deployment (keys under ``prefix``).

    Another deployment's keys (another prefix) are unknown here, as another data dir's are
    to the SQLite store."""

    def __init__(self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:") -> None:
        super().__init__(url_or_client)
        # ``id:`` keeps key hashes apart from the index whatever id a client presents.
        self._hash_prefix = f"{prefix}keys:id:"
        self._created = f"{prefix}keys:created"
        self._create = self._script(_CREATE)
        self._revoke = self._script(_REVOKE)
        # Oldest first, one consistent snapshot; the digests stay in Redis.
        self._list = IndexedHashes(self._redis, self._hash_prefix, "name", "created_at", "revoked_at")

    def create(self, name: str) -> tuple[ApiKey, str]:
        made, created_at = create_with_fresh_id(
            new_key,
            lambda made: self._create(
                keys=[self._hash_prefix + made.id, self._created], args=[made.id, name, made.digest]
            ),
            "key id",  # 48 random bits: never taken, really
        )
        return ApiKey(made.id, name, float(created_at), None), made.key

    def list(self) -> builtins.list[ApiKey]:
        return [_api_key(*row) for row in self._list.read(self._created)]

    def revoke(self, key_id: str) -> bool:
        with redis_errors("written"):
            return bool(self._revoke(keys=[self._hash_prefix + key_id]))

    def verify(self, presented: str | None) -> ApiKey:
        return check_key(presented, self._lookup)

    def _lookup(self, key_id: str) -> tuple[ApiKey, str] | None:
        with redis_errors("read"):
            name, secret_sha256, created_at, revoked_at = self._redis.hmget(
                self._hash_prefix + key_id, "name", "secret_sha256", "created_at", "revoked_at"
            )
        if name is None:
            return None
        return _api_key(key_id, name, created_at, revoked_at), secret_sha256

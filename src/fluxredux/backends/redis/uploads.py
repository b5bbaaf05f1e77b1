"""Uploaded reference images in Redis: an upload made through one API node is found,
used and expired by every other.

Keys (under the deployment's prefix):
- ``{prefix}uploads:id:{id}``: a hash per upload: key, owner, created_at, last_used_at,
  expired ('0' or '1');
- ``{prefix}uploads:by_key``: blob key -> upload id, for every recorded upload (expired or
  not): ``uploaded`` asks it, so retention never deletes an upload's blob as an orphan;
- ``{prefix}uploads:live``: the ids not expired, scored by last_used_at: ``expire`` ranges
  over it, never over all uploads;
- ``{prefix}uploads:expired``: the ids marked but not yet forgotten, scored by
  last_used_at, oldest use first, as ``expire`` returns them.

``use`` is one Lua script (check not expired, bump last_used_at to max(old, now), answer
the record), and so is each ``expire`` marking step (range the live ids, mark, move), so a
create that uses an upload and the retention round that expires it never interleave: the
upload is either used (and kept) or expired (and the create refused). Times are the
caller's ``now`` when given, else the injected clock's, else Redis TIME (read inside the
script). The scripts reach upload hashes by name from the prefix, which a single Redis
server (or a replicated pair) allows; Redis Cluster would need hash tags.
"""

from __future__ import annotations

from collections.abc import Iterable

from fluxredux.access.uploads import Upload, already_recorded, upload_id_of
from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import (
    LUA_PREAMBLE,
    ClientOrUrl,
    Clock,
    IndexedHashes,
    RedisSeam,
    batched,
    fmt_time,
)

# Ids or keys per script or command: long lists go in several short steps rather than
# one that blocks Redis.
_BATCH = 500

# KEYS: the upload's hash, by_key, live. ARGV: now or '', id, key, owner.
# Returns created_at (%.17g), or false when the id or the key is recorded already.
_ADD = (
    LUA_PREAMBLE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then
  return false
end
local now = fmt(clock_now(ARGV[1]))
redis.call('HSET', KEYS[1], 'key', ARGV[3], 'owner', ARGV[4], 'created_at', now,
  'last_used_at', now, 'expired', '0')
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[2])
return now
"""
)

# KEYS: the upload's hash, live. ARGV: now or '', id.
# Returns {key, owner, created_at, last_used_at}, or false when unknown or expired.
_USE = (
    LUA_PREAMBLE
    + """
local f = redis.call('HMGET', KEYS[1], 'expired', 'last_used_at')
if f[1] ~= '0' then return false end
local now = clock_now(ARGV[1])
if now > tonumber(f[2]) then  -- never moves back (an older create landing late)
  local stamp = fmt(now)
  redis.call('HSET', KEYS[1], 'last_used_at', stamp)
  redis.call('ZADD', KEYS[2], stamp, ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'key', 'owner', 'created_at', 'last_used_at')
"""
)

# KEYS: live, expired. ARGV: unused_since (exclusive), hash prefix, batch size.
# Marks up to a batch of uploads last used before unused_since; how many it marked.
_MARK = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #found, 2 do
  local id, last_used = found[i], found[i + 1]
  redis.call('HSET', ARGV[2] .. id, 'expired', '1')
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], last_used, id)
end
return #found / 2
"""

# KEYS: the upload's hash, live, expired. ARGV: id.
# Marks that one upload expired; returns {key, owner, created_at, last_used_at}, or false
# when unknown or expired already.
_WITHDRAW = """
local f = redis.call('HMGET', KEYS[1], 'expired', 'key', 'owner', 'created_at', 'last_used_at')
if f[1] ~= '0' then return false end
redis.call('HSET', KEYS[1], 'expired', '1')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], f[5], ARGV[1])
return {f[2], f[3], f[4], f[5]}
"""

# KEYS: by_key, expired. ARGV: hash prefix, then ids. Drops the expired ones among them;
# how many went.
_FORGET = """
local gone = 0
for i = 2, #ARGV do
  local hash = ARGV[1] .. ARGV[i]
  local f = redis.call('HMGET', hash, 'expired', 'key')
  if f[1] == '1' then
    redis.call('DEL', hash)
    redis.call('HDEL', KEYS[1], f[2])
    redis.call('ZREM', KEYS[2], ARGV[i])
    gone = gone + 1
  end
end
return gone
"""


def _upload(upload_id: str, key: str, owner: str, created_at: str, last_used_at: str) -> Upload:
    return Upload(upload_id, key, owner, float(created_at), float(last_used_at))


class RedisUploadStore(RedisSeam):
    """UploadStore shared by every API node of a deployment (keys under ``prefix``)."""

    def __init__(
        self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:", clock: Clock | None = None
    ) -> None:
        super().__init__(url_or_client, clock)
        self._hash_prefix = f"{prefix}uploads:id:"
        self._by_key = f"{prefix}uploads:by_key"
        self._live = f"{prefix}uploads:live"
        self._expired = f"{prefix}uploads:expired"
        self._add = self._script(_ADD)
        self._use = self._script(_USE)
        self._mark = self._script(_MARK)
        # The marked uploads, oldest use first.
        self._marked = IndexedHashes(
            self._redis, self._hash_prefix, "key", "owner", "created_at", "last_used_at"
        )
        self._forget = self._script(_FORGET)
        self._withdraw = self._script(_WITHDRAW)

    def _now_arg(self, now: float | None) -> str:
        return self._clock.now_arg() if now is None else fmt_time(now)

    def add(self, key: str, owner: str, now: float | None = None) -> Upload:
        upload_id = upload_id_of(key)
        keys = [self._hash_prefix + upload_id, self._by_key, self._live]
        with redis_errors("written"):
            created_at = self._add(keys=keys, args=[self._now_arg(now), upload_id, key, owner])
        if created_at is None:
            raise already_recorded(key)
        return _upload(upload_id, key, owner, created_at, created_at)

    def get(self, upload_id: str) -> Upload | None:
        with redis_errors("read"):
            expired, *fields = self._redis.hmget(
                self._hash_prefix + upload_id, "expired", "key", "owner", "created_at", "last_used_at"
            )
        return _upload(upload_id, *fields) if expired == "0" else None

    def use(self, upload_id: str, now: float | None = None) -> Upload | None:
        with redis_errors("written"):
            fields = self._use(
                keys=[self._hash_prefix + upload_id, self._live], args=[self._now_arg(now), upload_id]
            )
        return _upload(upload_id, *fields) if fields is not None else None

    def uploaded(self, keys: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for batch in batched(keys, _BATCH):
            with redis_errors("read"):
                ids = self._redis.hmget(self._by_key, batch)
            found.update(key for key, upload_id in zip(batch, ids, strict=True) if upload_id is not None)
        return found

    def expire(self, unused_since: float, limit: int = 10_000) -> list[Upload]:
        # Marked a batch at a time, each batch one script: a long backlog never blocks Redis.
        args = [fmt_time(unused_since), self._hash_prefix, str(_BATCH)]
        while True:
            with redis_errors("written"):
                marked = int(self._mark(keys=[self._live, self._expired], args=args))
            if marked < _BATCH:
                break
        if limit <= 0:
            return []
        return [_upload(*row) for row in self._marked.read(self._expired, limit)]

    def withdraw(self, upload_id: str) -> Upload | None:
        with redis_errors("written"):
            fields = self._withdraw(
                keys=[self._hash_prefix + upload_id, self._live, self._expired], args=[upload_id]
            )
        return _upload(upload_id, *fields) if fields is not None else None

    def forget(self, upload_ids: Iterable[str]) -> int:
        gone = 0
        for batch in batched(upload_ids, _BATCH):
            with redis_errors("written"):
                gone += int(
                    self._forget(keys=[self._by_key, self._expired], args=[self._hash_prefix, *batch])
                )
        return gone

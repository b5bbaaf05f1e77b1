"""Share links in Redis: a link made on one API node opens on every other.

Keys (under the deployment's prefix):
- ``{prefix}shares:token:{token}``: a hash per share: prediction_id, owner,
  include_reference ('1' or '0'), created_at;
- ``{prefix}shares:prediction:{prediction id}``: that prediction's tokens scored by
  created_at, so listing a prediction's links and deleting them with it (retention, many
  predictions at once) never scan other shares.

Every write is one Lua script stamped with Redis TIME, so a share and its index entry
come and go together. The scripts reach a share's index by name from the prefix, which a
single Redis server (or a replicated pair) allows; Redis Cluster would need hash tags.
"""

from __future__ import annotations

from collections.abc import Iterable

from fluxredux.access.shares import MAX_SHARES_PER_PREDICTION, Share, new_token
from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import (
    LUA_PREAMBLE,
    ClientOrUrl,
    IndexedHashes,
    RedisSeam,
    batched,
    create_with_fresh_id,
)
from fluxredux.errors import TooManyShares

# Predictions per ``delete_for_predictions`` script: retention may delete thousands at
# once, in several short scripts rather than one that blocks Redis.
_DELETE_BATCH = 500

# KEYS: the share's hash, its prediction's index. ARGV: token, prediction id, owner,
# include_reference ('1'/'0'), the most live shares the prediction may have. Returns
# created_at (%.17g), false when the token is taken, or the number of live shares (an
# integer) when they are at the limit: counted and added in one script, so concurrent
# creates on any API node never pass it. The index holds exactly the live shares (every
# script adds or drops a share and its entry together), so its size is the count.
_CREATE = (
    LUA_PREAMBLE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local live = redis.call('ZCARD', KEYS[2])
if live >= tonumber(ARGV[5]) then return live end
local now = fmt(clock_now(''))
redis.call('HSET', KEYS[1], 'prediction_id', ARGV[2], 'owner', ARGV[3],
  'include_reference', ARGV[4], 'created_at', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"""
)

# KEYS: the share's hash. ARGV: token, owner, the index key prefix. 1 when deleted.
_REVOKE = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'prediction_id')
if f[1] ~= ARGV[2] then return 0 end  -- no such share, or not theirs
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[3] .. f[2], ARGV[1])
return 1
"""

# KEYS: predictions' indexes. ARGV: the share hash prefix. How many shares went.
_DELETE = """
local gone = 0
for _, index in ipairs(KEYS) do
  for _, token in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    gone = gone + redis.call('DEL', ARGV[1] .. token)
  end
  redis.call('DEL', index)
end
return gone
"""


def _share(token: str, prediction_id: str, owner: str, include_reference: str, created_at: str) -> Share:
    return Share(token, prediction_id, owner, include_reference == "1", float(created_at))


class RedisShareStore(RedisSeam):
    """ShareStore shared by every API node of a deployment (keys under ``prefix``)."""

    def __init__(self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:") -> None:
        super().__init__(url_or_client)
        self._hash_prefix = f"{prefix}shares:token:"
        self._index_prefix = f"{prefix}shares:prediction:"
        self._create = self._script(_CREATE)
        # A prediction's shares, oldest first (ties by token).
        self._list = IndexedHashes(
            self._redis, self._hash_prefix, "prediction_id", "owner", "include_reference", "created_at"
        )
        self._revoke = self._script(_REVOKE)
        self._delete = self._script(_DELETE)

    def create(
        self,
        prediction_id: str,
        owner: str,
        *,
        include_reference: bool = False,
        limit: int = MAX_SHARES_PER_PREDICTION,
    ) -> Share:
        flag = "1" if include_reference else "0"
        token, created_at = create_with_fresh_id(
            new_token,
            lambda token: self._create(
                keys=[self._hash_prefix + token, self._index_prefix + prediction_id],
                args=[token, prediction_id, owner, flag, limit],
            ),
            "share token",  # 192 random bits: never taken, really
        )
        if isinstance(created_at, int):  # the live shares' count: at the limit, nothing written
            raise TooManyShares(limit)
        return _share(token, prediction_id, owner, flag, created_at)

    def get(self, token: str) -> Share | None:
        with redis_errors("read"):
            fields = self._redis.hmget(
                self._hash_prefix + token, "prediction_id", "owner", "include_reference", "created_at"
            )
        return _share(token, *fields) if fields[0] is not None else None

    def list_for_prediction(self, prediction_id: str) -> list[Share]:
        return [_share(*row) for row in self._list.read(self._index_prefix + prediction_id)]

    def revoke(self, token: str, owner: str) -> bool:
        with redis_errors("written"):
            return bool(
                self._revoke(keys=[self._hash_prefix + token], args=[token, owner, self._index_prefix])
            )

    def delete_for_predictions(self, prediction_ids: Iterable[str]) -> int:
        gone = 0
        for batch in batched(prediction_ids, _DELETE_BATCH):
            with redis_errors("written"):
                gone += int(
                    self._delete(keys=[self._index_prefix + p for p in batch], args=[self._hash_prefix])
                )
        return gone

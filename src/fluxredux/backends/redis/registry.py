"""The worker registry in Redis: the live workers of every machine, in one place.

Keys (under the deployment's prefix):
- ``{prefix}worker:{id}``: a hash per worker (its WorkerInfo fields; details as JSON);
- ``{prefix}workers``: a sorted set of worker ids scored by last_seen, the index that
  ``workers()`` reads (and a monitor could range over by silence).

Every write is one Lua script, stamped with Redis TIME (or an injected clock's time), so a
heartbeat and a conditional unregister never interleave: ``unregister(seen_before=...)``
compares last_seen and deletes in one step, and a heartbeat landing first keeps the worker.
Hash fields are plain strings, never re-encoded by Lua, so details and times come back as
they were written.
"""

from __future__ import annotations

import json
from typing import cast

from fluxredux.backends.redis.client import redis_errors
from fluxredux.backends.redis.common import LUA_PREAMBLE, ClientOrUrl, Clock, RedisSeam, fmt_time
from fluxredux.jobs.registry import WorkerInfo, WorkerState

# KEYS: worker hash, index. ARGV: now, id, then field/value pairs (without last_seen).
_REGISTER = (
    LUA_PREAMBLE
    + """
local now = fmt(clock_now(ARGV[1]))
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'last_seen', now, unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], now, ARGV[2])
return now
"""
)

# KEYS: worker hash, index. ARGV: now, id, state or '', model or ''.
_HEARTBEAT = (
    LUA_PREAMBLE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = fmt(clock_now(ARGV[1]))
redis.call('HSET', KEYS[1], 'last_seen', now)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'model', ARGV[4]) end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return 1
"""
)

# KEYS: worker hash, index. ARGV: id, seen_before or '' (unconditional).
_UNREGISTER = """
if ARGV[2] ~= '' then
  local seen = redis.call('HGET', KEYS[1], 'last_seen')
  if seen and tonumber(seen) > tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: index. ARGV: the worker key prefix. One consistent snapshot: [id, HGETALL, ...].
_WORKERS = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local fields = redis.call('HGETALL', ARGV[1] .. id)
  if #fields > 0 then
    out[#out + 1] = id
    out[#out + 1] = fields
  end
end
return out
"""


def _worker(worker_id: str, flat: list[str]) -> WorkerInfo:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return WorkerInfo(
        id=worker_id,
        host=fields["host"],
        pid=int(fields["pid"]),
        model=fields["model"],
        device=fields["device"],
        state=cast(WorkerState, fields["state"]),
        started_at=float(fields["started_at"]),
        last_seen=float(fields["last_seen"]),
        details=json.loads(fields.get("details", "{}")),
    )


class RedisWorkerRegistry(RedisSeam):
    """WorkerRegistry shared by every machine of a deployment (keys under ``prefix``)."""

    def __init__(
        self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:", clock: Clock | None = None
    ) -> None:
        super().__init__(url_or_client, clock)
        self._index = f"{prefix}workers"
        self._worker_prefix = f"{prefix}worker:"
        self._register = self._script(_REGISTER)
        self._heartbeat = self._script(_HEARTBEAT)
        self._unregister = self._script(_UNREGISTER)
        self._workers = self._script(_WORKERS)

    def _key(self, worker_id: str) -> str:
        return self._worker_prefix + worker_id

    def register(self, worker: WorkerInfo) -> None:
        fields = {
            "host": worker.host,
            "pid": str(worker.pid),
            "model": worker.model,
            "device": worker.device,
            "state": worker.state,
            "started_at": fmt_time(worker.started_at),
            "details": json.dumps(worker.details),
        }
        flat = [item for pair in fields.items() for item in pair]
        with redis_errors("written"):
            self._register(
                keys=[self._key(worker.id), self._index], args=[self._clock.now_arg(), worker.id, *flat]
            )

    def heartbeat(
        self, worker_id: str, *, state: WorkerState | None = None, model: str | None = None
    ) -> bool:
        with redis_errors("written"):
            found = self._heartbeat(
                keys=[self._key(worker_id), self._index],
                args=[self._clock.now_arg(), worker_id, state or "", model or ""],
            )
        return bool(found)

    def unregister(self, worker_id: str, *, seen_before: float | None = None) -> None:
        limit = "" if seen_before is None else fmt_time(seen_before)
        with redis_errors("written"):
            self._unregister(keys=[self._key(worker_id), self._index], args=[worker_id, limit])

    def workers(self) -> list[WorkerInfo]:
        with redis_errors("read"):
            flat = self._workers(keys=[self._index], args=[self._worker_prefix])
        found = [_worker(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(found, key=lambda w: (w.started_at, w.id))

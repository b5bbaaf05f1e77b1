"""Whether Redis still holds this deployment's data: what it keeps across a restart, and
a marker that tells when it kept nothing.

A Redis with neither an AOF nor RDB snapshots that restarts comes back empty: every queued
prediction, every API key and every share is gone, and nothing else says so (an empty
Redis answers like a healthy one; the API answers 401 to every key). So:

- at start, each process reads Redis's persistence settings (CONFIG GET appendonly, save)
  and warns when there is none (CONFIG may be disabled: then it cannot tell, and says so);
  and its eviction policy: a Redis with a memory limit that evicts keys to make room
  (allkeys-lru, volatile-ttl...) may delete a queued prediction, a result or a key, the
  marker included, at any time, so that is warned about too;
- the first process of a deployment writes ``{prefix}deployment`` (when it was written,
  and a random id), once; every process remembers the marker it found at start. A later
  look that finds it gone, or another in its place, means Redis lost its data since: the
  process says so (/ready, its log) for as long as it runs, since nothing brings the data
  back. A process that starts afterwards adopts the marker it finds, or writes a new one.

A fresh, empty Redis at a deployment's first start is no loss: the marker is written
then. Neither is a deployment from before markers existed: its first start with them
writes one.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from datetime import UTC, datetime
from typing import Any

import redis

from fluxredux.backends import Durability
from fluxredux.backends.redis.client import read_eviction, read_persistence, redis_errors
from fluxredux.errors import StoreUnavailable

log = logging.getLogger(__name__)

NO_PERSISTENCE_WARNING = (
    "Redis keeps this deployment's data in memory only: it has neither an AOF nor RDB snapshots "
    '(appendonly no, save ""), so a restart loses every queued prediction and every API key; '
    "run it with appendonly yes (see docs/deploy.md)"
)


def eviction_warning(policy: str) -> str:
    return (
        f"Redis may evict this deployment's keys to make room (maxmemory-policy {policy}, with a "
        "maxmemory set): a queued prediction, a result or an API key could vanish; run it with "
        "maxmemory-policy noeviction (see docs/deploy.md)"
    )


def _describe(marker: str) -> str:
    try:
        return f"written {json.loads(marker)['created_at']}"
    except (ValueError, KeyError, TypeError):
        return "of this deployment"


class RedisDeployment:
    """One process's view of its deployment in Redis (keys under ``prefix``)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis: Any = client  # redis-py's annotations: see backends/redis/common.open_client
        self.key = f"{prefix}deployment"
        self.durability = Durability("redis", "unknown")
        self._seen: str | None = None  # the marker found at start
        self._lost: str | None = None
        self._lock = threading.Lock()

    def start(self) -> list[str]:
        """At process start: read the persistence settings, write or adopt the marker;
        what to warn about. A Redis that is down now is tried again by ``lost``."""
        try:
            warning = self._look()
        except StoreUnavailable as exc:
            return [f"Redis's persistence and deployment marker cannot be checked now: {exc.message}"]
        return [warning] if warning else []

    def _look(self) -> str | None:
        """Read the persistence settings and adopt the marker; the warning, if any."""
        persistence = read_persistence(self._redis)
        eviction = read_eviction(self._redis)
        self._adopt()
        warnings = [NO_PERSISTENCE_WARNING] if persistence == "none" else []
        if eviction is not None:
            warnings.append(eviction_warning(eviction))
        warning = "; and ".join(warnings) or None
        self.durability = Durability("redis", persistence, warning)
        return warning

    def lost(self) -> str | None:
        """Why Redis lost this deployment's data since this process started, or None (also
        when it cannot tell now: a Redis that is down is reported by the stores)."""
        with self._lock:
            if self._lost is not None:
                return self._lost
            seen = self._seen
        try:
            if seen is None:  # Redis was down when we started: this is our first look
                if (warning := self._look()) is not None:
                    log.warning("%s", warning)
                return None
            with redis_errors("read"):
                current = self._redis.get(self.key)
        except StoreUnavailable:
            return None
        if current == seen:
            return None
        what = "is gone" if current is None else f"was replaced by one {_describe(current)}"
        reason = (
            f"Redis lost its data (the deployment marker {self.key}, {_describe(seen)}, {what}: Redis "
            "restarted without persistence, or was flushed); queued predictions and API keys are gone. "
            "Restore its data or create keys again (fluxredux keys create), then restart this process"
        )
        with self._lock:
            if self._lost is None:
                self._lost = reason
                log.error("%s", reason)
        return self._lost

    def _adopt(self) -> None:
        marker = json.dumps(
            {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "id": secrets.token_hex(8)}
        )
        with redis_errors("written"):
            # Only where there is none: the first process of a deployment writes it, once.
            self._redis.set(self.key, marker, nx=True)
            current = self._redis.get(self.key)
        with self._lock:
            if self._seen is None:
                self._seen = current

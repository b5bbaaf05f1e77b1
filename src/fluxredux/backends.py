"""Which implementation of each seam a process uses: the one place that picks between them.

Embedded (no Redis, one machine): the SQLite file in the data dir for jobs, workers,
webhooks, keys, shares, uploads and idempotency keys; limits counted in this process (it is the only HTTP
process); job events over a pipe from the worker child.

Scale-out (``redis_url``): every one of them in Redis, shared by all API nodes and
workers, through one client (one connection pool) per process, keys under
``redis_prefix``. The blob store is chosen separately (``storage``, see storage/).

Everything is built on first use and cached, so a worker builds only what a worker needs
(no key store, no limiter), and ``close`` closes what was built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

from fluxredux.config import Settings
from fluxredux.idempotency import IdempotencyStore, SQLiteIdempotencyStore
from fluxredux.jobs.events import EventBus, PipeEventBus
from fluxredux.jobs.limits import MemoryRateLimiter, RateLimiter
from fluxredux.jobs.outbox import SQLiteWebhookOutbox, WebhookOutbox
from fluxredux.jobs.registry import SQLiteWorkerRegistry, WorkerRegistry
from fluxredux.jobs.sqlite import SQLiteJobStore
from fluxredux.jobs.store import JobStore
from fluxredux.keys import KeyStore, SQLiteKeyStore
from fluxredux.shares import ShareStore, SQLiteShareStore
from fluxredux.uploads import SQLiteUploadStore, UploadStore

Clock = Callable[[], float]
T = TypeVar("T")


class Backends:
    """The seams of one process, built from its settings.

    ``clock`` replaces the stores' clock in tests (SQLite: ``time.time``; Redis: its TIME,
    the one clock every machine agrees on)."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._built: list[Any] = []  # what close() closes, in the order built

    @property
    def scale_out(self) -> bool:
        return self.settings.redis_url is not None

    def _keep(self, thing: T) -> T:
        self._built.append(thing)
        return thing

    # --- Redis ----------------------------------------------------------------------------

    @cached_property
    def redis(self) -> Any:
        """This process's Redis client (redis-py; a connection pool shared by every seam)."""
        from fluxredux.redis_backend import connect

        assert self.settings.redis_url is not None, "only in scale-out mode"
        return connect(self.settings.redis_url)

    @property
    def _prefix(self) -> str:
        return self.settings.redis_prefix

    # --- SQLite -----------------------------------------------------------------------------

    def _sqlite(self, cls: Callable[..., T], **extra: Any) -> T:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            self.settings.database_path, busy_timeout=self.settings.store_busy_timeout_seconds, **extra
        )

    @property
    def _sqlite_clock(self) -> Clock:
        return self._clock or time.time

    # --- the seams ----------------------------------------------------------------------------

    @cached_property
    def jobs(self) -> JobStore:
        if self.scale_out:
            from fluxredux.jobs.redis_store import RedisJobStore

            return self._keep(RedisJobStore(self.redis, prefix=self._prefix, clock=self._clock))
        return self._keep(self._sqlite(SQLiteJobStore, clock=self._sqlite_clock))

    @cached_property
    def registry(self) -> WorkerRegistry:
        if self.scale_out:
            from fluxredux.jobs.redis_registry import RedisWorkerRegistry

            return self._keep(RedisWorkerRegistry(self.redis, prefix=self._prefix, clock=self._clock))
        return self._keep(self._sqlite(SQLiteWorkerRegistry, clock=self._sqlite_clock))

    @cached_property
    def outbox(self) -> WebhookOutbox:
        if self.scale_out:
            from fluxredux.jobs.redis_outbox import RedisWebhookOutbox

            return self._keep(RedisWebhookOutbox(self.redis, prefix=self._prefix, clock=self._clock))
        return self._keep(self._sqlite(SQLiteWebhookOutbox, clock=self._sqlite_clock))

    @cached_property
    def keys(self) -> KeyStore:
        if self.scale_out:
            from fluxredux.redis_keys import RedisKeyStore

            return self._keep(RedisKeyStore(self.redis, prefix=self._prefix))
        return self._keep(self._sqlite(SQLiteKeyStore))

    @cached_property
    def shares(self) -> ShareStore:
        if self.scale_out:
            from fluxredux.redis_shares import RedisShareStore

            return self._keep(RedisShareStore(self.redis, prefix=self._prefix))
        return self._keep(self._sqlite(SQLiteShareStore))

    @cached_property
    def uploads(self) -> UploadStore:
        if self.scale_out:
            from fluxredux.redis_uploads import RedisUploadStore

            return self._keep(RedisUploadStore(self.redis, prefix=self._prefix, clock=self._clock))
        return self._keep(self._sqlite(SQLiteUploadStore))

    @cached_property
    def idempotency(self) -> IdempotencyStore:
        if self.scale_out:
            from fluxredux.redis_idempotency import RedisIdempotencyStore

            return self._keep(RedisIdempotencyStore(self.redis, prefix=self._prefix, clock=self._clock))
        return self._keep(self._sqlite(SQLiteIdempotencyStore, clock=self._sqlite_clock))

    def rate_limiter(self, name: str, per_minute: int) -> RateLimiter:
        """A limit of ``per_minute`` hits per API key, counted apart from other ``name``s.

        Embedded: counted in this process, the only HTTP process. Scale-out: in Redis,
        exact across every API node."""
        if self.scale_out:
            from fluxredux.jobs.redis_limits import RedisRateLimiter

            return RedisRateLimiter(
                self.redis, per_minute, prefix=f"{self._prefix}limits:{name}:", clock=self._clock
            )
        return MemoryRateLimiter(per_minute)

    @cached_property
    def bus(self) -> EventBus:
        """Job events of every process that changes jobs, heard here.

        Embedded: the worker children's pipes are attached to it (see the supervisor).
        Scale-out: Redis pub/sub, heard by every API node and worker."""
        if self.scale_out:
            from fluxredux.jobs.redis_events import RedisEventBus

            return self._keep(RedisEventBus(self.redis, prefix=self._prefix))
        return self._keep(PipeEventBus())

    def close(self) -> None:
        """Close what was built (newest first), then the Redis client they shared."""
        for thing in reversed(self._built):
            thing.close()
        self._built.clear()
        if "redis" in self.__dict__:
            self.__dict__.pop("redis").close()

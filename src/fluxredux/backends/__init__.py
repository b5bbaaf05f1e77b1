"""Which implementation of each seam a process uses: the one place that picks between them.

One small class per engine, chosen once by ``backends_for(settings)``:

- ``SQLiteBackends`` (no ``redis_url``, one machine): the SQLite file in the data dir for
  jobs, workers, webhooks, keys, shares, uploads and idempotency keys; limits counted in
  this process (it is the only HTTP process); job events over a pipe from the worker child.
- ``RedisBackends`` (``redis_url``): every one of them in Redis, shared by all API nodes
  and workers, through one client (one connection pool) per process, keys under
  ``redis_prefix``.

Each also says whether its store still holds the deployment's data (``start`` at process
start, ``lost_data`` in /ready and the worker's heartbeat): a SQLite file does; a Redis
may restart empty, which its persistence settings and a marker key tell
(backends/redis/deployment.py).

The blob store is chosen separately (``storage``, see storage/). Everything is built on
first use and cached, so a worker builds only what a worker needs (no key store, no
limiter), and ``close`` closes what was built.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from fluxredux.access.idempotency import IdempotencyStore
from fluxredux.access.keys import KeyStore
from fluxredux.access.shares import ShareStore
from fluxredux.access.uploads import UploadStore
from fluxredux.config import Settings
from fluxredux.errors import WouldWait
from fluxredux.jobs.events import EventBus
from fluxredux.jobs.limits import RateLimiter
from fluxredux.jobs.outbox import WebhookOutbox
from fluxredux.jobs.registry import WorkerRegistry
from fluxredux.jobs.store import JobStore

if TYPE_CHECKING:
    from fluxredux.backends.redis.deployment import RedisDeployment

Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Durability:
    """What the state store keeps across a restart, as /health's ``store`` shows it."""

    engine: str  # "redis" or "sqlite"
    # aof, rdb, aof+rdb or none (Redis); unknown: CONFIG refused, or Redis not reached yet;
    # file: SQLite, a file in the data dir
    persistence: str
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "persistence": self.persistence, "warning": self.warning}


class Backends(ABC):
    """The seams of one process, built from its settings by one engine.

    ``clock`` replaces the stores' clock in tests (SQLite: ``time.time``; Redis: its TIME,
    the one clock every machine agrees on)."""

    scale_out: ClassVar[bool]  # shared by many machines (API nodes and workers anywhere)

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._built: list[Any] = []  # what close() closes, in the order built

    def _keep(self, thing: T) -> T:
        self._built.append(thing)
        return thing

    @cached_property
    def jobs(self) -> JobStore:
        return self._keep(self._open_jobs())

    @cached_property
    def registry(self) -> WorkerRegistry:
        return self._keep(self._open_registry())

    @cached_property
    def outbox(self) -> WebhookOutbox:
        return self._keep(self._open_outbox())

    @cached_property
    def keys(self) -> KeyStore:
        return self._keep(self._open_keys())

    @cached_property
    def shares(self) -> ShareStore:
        return self._keep(self._open_shares())

    @cached_property
    def uploads(self) -> UploadStore:
        return self._keep(self._open_uploads())

    @cached_property
    def idempotency(self) -> IdempotencyStore:
        return self._keep(self._open_idempotency())

    @cached_property
    def bus(self) -> EventBus:
        """Job events of every process that changes jobs, heard here."""
        return self._keep(self._open_bus())

    @abstractmethod
    def rate_limiter(self, name: str, per_minute: int) -> RateLimiter:
        """A limit of ``per_minute`` hits per API key, counted apart from other ``name``s."""

    # --- whether the store still holds the deployment's data -------------------------------

    @property
    def durability(self) -> Durability:
        """What the store keeps across a restart (as read by ``start``)."""
        return Durability("sqlite", "file")

    def start(self) -> list[str]:
        """At process start (API node, worker): check the store; what to warn about."""
        return []

    def lost_data(self) -> str | None:
        """Why the store lost the deployment's data since this process started, or None.
        Blocking (it may ask the store): not on the event loop."""
        return None

    def read_without_waiting(self, read: Callable[[], T]) -> T:
        """``read()`` (a read of these stores) if the store answers it without waiting,
        else WouldWait: what may run on an event loop, where a quick read costs less than
        the thread hop it saves. Here: a store across the network always waits."""
        raise WouldWait("this store is read across the network")

    @abstractmethod
    def _open_jobs(self) -> JobStore: ...
    @abstractmethod
    def _open_registry(self) -> WorkerRegistry: ...
    @abstractmethod
    def _open_outbox(self) -> WebhookOutbox: ...
    @abstractmethod
    def _open_keys(self) -> KeyStore: ...
    @abstractmethod
    def _open_shares(self) -> ShareStore: ...
    @abstractmethod
    def _open_uploads(self) -> UploadStore: ...
    @abstractmethod
    def _open_idempotency(self) -> IdempotencyStore: ...
    @abstractmethod
    def _open_bus(self) -> EventBus: ...

    def close(self) -> None:
        """Close what was built, newest first."""
        for thing in reversed(self._built):
            thing.close()
        self._built.clear()


class SQLiteBackends(Backends):
    """One machine: the SQLite file in the data dir; limits and events in this process."""

    scale_out = False

    def read_without_waiting(self, read: Callable[[], T]) -> T:
        """A local file in WAL mode: reads wait for no writer (see ``without_waiting``)."""
        from fluxredux.backends.sqlite.database import without_waiting

        with without_waiting():
            return read()

    def _table(self, cls: Callable[..., T], *, clocked: bool = True) -> T:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        extra = {"clock": self._clock or time.time} if clocked else {}
        return cls(
            self.settings.database_path, busy_timeout=self.settings.store_busy_timeout_seconds, **extra
        )

    def _open_jobs(self) -> JobStore:
        from fluxredux.backends.sqlite.jobs import SQLiteJobStore

        return self._table(SQLiteJobStore)

    def _open_registry(self) -> WorkerRegistry:
        from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry

        return self._table(SQLiteWorkerRegistry)

    def _open_outbox(self) -> WebhookOutbox:
        from fluxredux.backends.sqlite.outbox import SQLiteWebhookOutbox

        return self._table(SQLiteWebhookOutbox)

    def _open_keys(self) -> KeyStore:
        from fluxredux.backends.sqlite.keys import SQLiteKeyStore

        return self._table(SQLiteKeyStore, clocked=False)

    def _open_shares(self) -> ShareStore:
        from fluxredux.backends.sqlite.shares import SQLiteShareStore

        return self._table(SQLiteShareStore, clocked=False)

    def _open_uploads(self) -> UploadStore:
        from fluxredux.backends.sqlite.uploads import SQLiteUploadStore

        return self._table(SQLiteUploadStore, clocked=False)

    def _open_idempotency(self) -> IdempotencyStore:
        from fluxredux.backends.sqlite.idempotency import SQLiteIdempotencyStore

        return self._table(SQLiteIdempotencyStore)

    def _open_bus(self) -> EventBus:
        """The worker children's pipes are attached to it (see the supervisor)."""
        from fluxredux.backends.sqlite.events import PipeEventBus

        return PipeEventBus()

    def rate_limiter(self, name: str, per_minute: int) -> RateLimiter:
        """Counted in this process, the only HTTP process."""
        from fluxredux.backends.sqlite.limits import InProcessRateLimiter

        return InProcessRateLimiter(per_minute)


class RedisBackends(Backends):
    """Many machines: every seam in one Redis, through one client per process."""

    scale_out = True

    @cached_property
    def redis(self) -> Any:
        """This process's Redis client (redis-py; a connection pool shared by every seam)."""
        from fluxredux.backends.redis.client import connect

        assert self.settings.redis_url is not None, "RedisBackends needs redis_url"
        return connect(self.settings.redis_url)

    @cached_property
    def deployment(self) -> RedisDeployment:
        """Redis's persistence settings, and the marker that tells when it lost its data."""
        from fluxredux.backends.redis.deployment import RedisDeployment

        return RedisDeployment(self.redis, self.settings.redis_prefix)

    @property
    def durability(self) -> Durability:
        return self.deployment.durability

    def start(self) -> list[str]:
        """Read Redis's persistence settings (a warning when it keeps nothing across a
        restart) and write or adopt the deployment's marker."""
        return self.deployment.start()

    def lost_data(self) -> str | None:
        return self.deployment.lost()

    def _seam(self, cls: Callable[..., T], *, clocked: bool = True) -> T:
        extra = {"clock": self._clock} if clocked else {}
        return cls(self.redis, prefix=self.settings.redis_prefix, **extra)

    def _open_jobs(self) -> JobStore:
        from fluxredux.backends.redis.jobs import RedisJobStore

        return self._seam(RedisJobStore)

    def _open_registry(self) -> WorkerRegistry:
        from fluxredux.backends.redis.registry import RedisWorkerRegistry

        return self._seam(RedisWorkerRegistry)

    def _open_outbox(self) -> WebhookOutbox:
        from fluxredux.backends.redis.outbox import RedisWebhookOutbox

        return self._seam(RedisWebhookOutbox)

    def _open_keys(self) -> KeyStore:
        from fluxredux.backends.redis.keys import RedisKeyStore

        return self._seam(RedisKeyStore, clocked=False)

    def _open_shares(self) -> ShareStore:
        from fluxredux.backends.redis.shares import RedisShareStore

        return self._seam(RedisShareStore, clocked=False)

    def _open_uploads(self) -> UploadStore:
        from fluxredux.backends.redis.uploads import RedisUploadStore

        return self._seam(RedisUploadStore)

    def _open_idempotency(self) -> IdempotencyStore:
        from fluxredux.backends.redis.idempotency import RedisIdempotencyStore

        return self._seam(RedisIdempotencyStore)

    def _open_bus(self) -> EventBus:
        """Redis pub/sub, heard by every API node and worker."""
        from fluxredux.backends.redis.events import RedisEventBus

        return self._seam(RedisEventBus, clocked=False)

    def rate_limiter(self, name: str, per_minute: int) -> RateLimiter:
        """In Redis, exact across every API node."""
        from fluxredux.backends.redis.limits import RedisRateLimiter

        return RedisRateLimiter(
            self.redis, per_minute, prefix=f"{self.settings.redis_prefix}limits:{name}:", clock=self._clock
        )

    def close(self) -> None:
        """Close what was built, then the Redis client they shared."""
        super().close()
        if "redis" in self.__dict__:
            self.__dict__.pop("redis").close()


def backends_for(settings: Settings, *, clock: Clock | None = None) -> Backends:
    """The engine the settings name: Redis when ``redis_url`` is set, else SQLite."""
    engine = RedisBackends if settings.redis_url is not None else SQLiteBackends
    return engine(settings, clock=clock)

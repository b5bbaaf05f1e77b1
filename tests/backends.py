"""Every seam built on every engine, in one place: the contract suites' one backend fixture.

huey's storage tests in spirit: one interface, one body of tests, run against each
implementation. A contract module names its seam (``SEAM = "jobs"``) and asks for the
``engine`` fixture; tests/conftest.py parametrises that fixture over the engines the seam
has here (``@pytest.mark.engines("redis")`` narrows it for one test or module), and
``engine.open()`` gives a handle on this test's own, empty deployment of the seam.

The engines:

- ``sqlite``: a file in the test's tmp dir; every handle a connection of its own (as
  separate processes have).
- ``redis``: the session's redis-server (tests/conftest.py, started only when a redis
  case runs), under this test's own key prefix; every handle a client of its own (as
  another API node or worker has).
- ``memory``: the test doubles (backends/memory); every handle on a deployment is the one
  object, as in one process.

The event bus runs on ``memory`` (``LocalEventBus``), ``sqlite`` (the one-machine mode: a
worker child's pipe into the server's ``PipeEventBus``) and ``redis`` (pub/sub); the rate
limiter on ``sqlite`` (counted in the one HTTP process, as ``SQLiteBackends`` does) and
``redis``. The blob store is chosen apart from the engine: ``local`` (a directory) and
``s3`` (the session's moto server, a fresh bucket per test).

Adding an implementation of a seam is one line in ``SEAMS``; every contract test of that
seam then runs against it too.
"""

from __future__ import annotations

import functools
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from fluxredux.backends.memory.jobs import MemoryJobStore
from fluxredux.backends.memory.outbox import MemoryWebhookOutbox
from fluxredux.backends.memory.registry import MemoryWorkerRegistry
from fluxredux.backends.redis.events import RedisEventBus, RedisEventPublisher
from fluxredux.backends.redis.idempotency import RedisIdempotencyStore
from fluxredux.backends.redis.jobs import RedisJobStore
from fluxredux.backends.redis.keys import RedisKeyStore
from fluxredux.backends.redis.limits import RedisRateLimiter
from fluxredux.backends.redis.outbox import RedisWebhookOutbox
from fluxredux.backends.redis.registry import RedisWorkerRegistry
from fluxredux.backends.redis.shares import RedisShareStore
from fluxredux.backends.redis.uploads import RedisUploadStore
from fluxredux.backends.sqlite.events import PipeEventBus, PipePublisher
from fluxredux.backends.sqlite.idempotency import SQLiteIdempotencyStore
from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.backends.sqlite.keys import SQLiteKeyStore
from fluxredux.backends.sqlite.limits import InProcessRateLimiter
from fluxredux.backends.sqlite.outbox import SQLiteWebhookOutbox
from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry
from fluxredux.backends.sqlite.shares import SQLiteShareStore
from fluxredux.backends.sqlite.uploads import SQLiteUploadStore
from fluxredux.jobs.events import EventBus, EventPublisher, LocalEventBus
from fluxredux.storage import LocalBlobStore
from fluxredux.storage.s3 import CLIENT_CONFIG, S3BlobStore

Clock = Callable[[], float]
# The deployment a test's handles are on unless it asks for another one.
MAIN = "main"
# The engines that need a server of the session's: their cases are integration tests.
SERVED = frozenset({"redis", "s3"})
# "The engine's clock" (the test's FakeClock), as opposed to None: the store's own clock.
ENGINE_CLOCK: Any = object()


# (the engine, the deployment, the clock or None, the implementation's own options) -> a
# new handle on that deployment of the seam.
Builder = Callable[..., Any]


def _timed(clock: Clock | None) -> dict[str, Clock]:
    """The clock argument to pass: none at all means the implementation's own clock."""
    return {} if clock is None else {"clock": clock}


def _one_object(cls: Callable[..., Any]) -> Builder:
    """memory: every handle on one deployment is the same object (one process)."""
    return lambda e, d, clock, **options: e.shared((cls, d), lambda: cls(**_timed(clock), **options))


def _pipe_bus(e: Engine) -> tuple[EventBus, EventPublisher]:
    """The server's bus, and a worker's end of a pipe attached to it (as a child has)."""
    bus = PipeEventBus()
    read_fd, write_fd = os.pipe()
    reader = bus.attach(read_fd)
    publisher = PipePublisher.from_fd(write_fd)
    e.later(bus.close)
    e.later(lambda: reader.join(5))
    e.later(publisher.close)  # first: it closes write_fd, so the reader sees the end of the pipe
    return bus, publisher


def _redis_bus(e: Engine, d: str) -> tuple[EventBus, EventPublisher]:
    """An API node's bus and a worker's publisher on another machine: two clients."""
    bus = RedisEventBus(e.redis_url, prefix=e.prefix(d))
    e.later(bus.close)
    publisher = RedisEventPublisher(e.redis_url, prefix=e.prefix(d))
    e.later(publisher.close)
    return bus, publisher


def _local_bus(e: Engine) -> tuple[EventBus, EventPublisher]:
    bus = LocalEventBus()
    e.later(bus.close)
    return bus, bus


@functools.cache
def s3_client(endpoint: str) -> Any:  # an untyped botocore client; made once (~0.2 s each)
    """A client of the test S3 server, built with the store's own timeouts and retries."""
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=CLIENT_CONFIG,
    )


def fresh_bucket(endpoint: str) -> str:
    """A new empty bucket on the test S3 server."""
    name = f"test-{secrets.token_hex(6)}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def _s3_blobs(e: Engine) -> S3BlobStore:
    # Under a prefix, so keys must come back without it. The client is passed in (one for
    # the session); the tests of the storage setting build theirs from the AWS variables.
    endpoint = e.s3_endpoint
    return S3BlobStore(fresh_bucket(endpoint), "blobs/", client=s3_client(endpoint))


def _sqlite(cls: Callable[..., Any], *, clocked: bool = True) -> Builder:
    """sqlite: the deployment's file; every handle a connection of its own."""
    return lambda e, d, clock, **options: cls(e.database(d), **(_timed(clock) if clocked else {}), **options)


def _redis(cls: Callable[..., Any], *, clocked: bool = True) -> Builder:
    """redis: the deployment's prefix; every handle a client of its own."""
    return lambda e, d, clock, **options: cls(
        e.redis_url, prefix=e.prefix(d), **(_timed(clock) if clocked else {}), **options
    )


SEAMS: dict[str, dict[str, Builder]] = {
    "jobs": {
        "sqlite": _sqlite(SQLiteJobStore),
        "redis": _redis(RedisJobStore),
        "memory": _one_object(MemoryJobStore),
    },
    "registry": {
        "sqlite": _sqlite(SQLiteWorkerRegistry),
        "redis": _redis(RedisWorkerRegistry),
        "memory": _one_object(MemoryWorkerRegistry),
    },
    "outbox": {
        "sqlite": _sqlite(SQLiteWebhookOutbox),
        "redis": _redis(RedisWebhookOutbox),
        "memory": _one_object(MemoryWebhookOutbox),
    },
    "idempotency": {"sqlite": _sqlite(SQLiteIdempotencyStore), "redis": _redis(RedisIdempotencyStore)},
    # Keys and shares have no clock to replace; SQLite's upload times come from the caller
    # or time.time, Redis's from the clock.
    "keys": {"sqlite": _sqlite(SQLiteKeyStore, clocked=False), "redis": _redis(RedisKeyStore, clocked=False)},
    "shares": {
        "sqlite": _sqlite(SQLiteShareStore, clocked=False),
        "redis": _redis(RedisShareStore, clocked=False),
    },
    "uploads": {"sqlite": _sqlite(SQLiteUploadStore, clocked=False), "redis": _redis(RedisUploadStore)},
    # Options: limit=, window=.
    "limiter": {
        "sqlite": lambda e, d, clock, **options: InProcessRateLimiter(**_timed(clock), **options),
        "redis": _redis(RedisRateLimiter),
    },
    # (the bus listeners subscribe to, a publisher); no clock.
    "bus": {
        "memory": lambda e, d, clock: _local_bus(e),
        "sqlite": lambda e, d, clock: _pipe_bus(e),
        "redis": lambda e, d, clock: _redis_bus(e, d),
    },
    "blobs": {
        "local": lambda e, d, clock: LocalBlobStore(e.tmp_path / d / "blobs"),
        "s3": lambda e, d, clock: _s3_blobs(e),
    },
}


def engines_of(seam: str) -> list[str]:
    return sorted(SEAMS[seam])


class Engine:
    """One engine of one seam for one test: opens handles on the test's deployments of it
    and closes them all at the end (newest first).

    The session's services are asked for only when used, so a SQLite case never starts
    redis-server; ``redis_url`` and ``prefix`` given here point the engine elsewhere (a
    Redis of the test's own, or one that is down)."""

    def __init__(
        self,
        name: str,
        seam: str,
        request: pytest.FixtureRequest,
        tmp_path: Path,
        clock: Clock | None,
        *,
        redis_url: str | None = None,
        prefix: str | None = None,
    ) -> None:
        if name not in SEAMS[seam]:
            raise ValueError(f"no {name} implementation of {seam}: {engines_of(seam)}")
        self.name, self.seam, self.tmp_path, self.clock = name, seam, tmp_path, clock
        self._request = request
        self._redis_url, self._prefix = redis_url, prefix
        self._shared: dict[Any, Any] = {}
        self._closing = ExitStack()

    def open(self, deployment: str = MAIN, *, clock: Clock | None = ENGINE_CLOCK, **options: Any) -> Any:
        """A new handle on ``deployment`` of the seam (another name: another deployment,
        sharing nothing with this one), on the engine's clock unless ``clock`` is given
        (None: the implementation's own, Redis TIME or time.time). ``options`` go to the
        implementation (``busy_timeout`` for SQLite, ``limit`` and ``window`` for limiters)."""
        build = SEAMS[self.seam][self.name]
        made = build(self, deployment, self.clock if clock is ENGINE_CLOCK else clock, **options)
        if hasattr(made, "close") and not any(made is kept for kept in self._shared.values()):
            self.later(made.close)
        return made

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """The one object for ``key``, made on first use (closed once, at the end)."""
        if key not in self._shared:
            self._shared[key] = made = make()
            self.later(made.close)
        return self._shared[key]

    def later(self, cleanup: Callable[[], object]) -> None:
        """Run ``cleanup`` at the end of the test (before what was registered earlier)."""
        self._closing.callback(cleanup)

    def close(self) -> None:
        self._closing.close()

    # --- where the engines keep their data ----------------------------------------------

    def database(self, deployment: str = MAIN) -> Path:
        """sqlite: the file of ``deployment``."""
        return self.tmp_path / f"{deployment}.db"

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            self._redis_url = str(self._request.getfixturevalue("redis_url"))
        return self._redis_url

    def prefix(self, deployment: str = MAIN) -> str:
        """redis: the key prefix of ``deployment`` (this test's own)."""
        if self._prefix is None:
            self._prefix = str(self._request.getfixturevalue("redis_prefix"))
        return self._prefix if deployment == MAIN else f"{self._prefix}{deployment}:"

    @property
    def s3_endpoint(self) -> str:
        return str(self._request.getfixturevalue("s3_endpoint"))

    def redis_client(self) -> Any:
        """redis: a raw client of the engine's server (decoded replies), closed at the end."""
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.later(client.close)
        return client

    def redis_keys(self, deployment: str = MAIN) -> list[str]:
        """redis: every key under ``deployment``'s prefix, sorted."""
        return sorted(self.redis_client().scan_iter(match=f"{self.prefix(deployment)}*"))

    # --- faults --------------------------------------------------------------------------

    @contextmanager
    def writes_refused(self) -> Iterator[None]:
        """A real fault under which the engine refuses writes, for as long as the block
        lasts: SQLite's write lock held by another connection (another process); Redis
        refusing writes as it does when its replicas are gone (``min-replicas-to-write``:
        NOREPLICAS), on the session's server for a moment."""
        if self.name == "sqlite":
            holder = sqlite3.connect(self.database(), isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                holder.execute("ROLLBACK")
                holder.close()
        elif self.name == "redis":
            admin = self.redis_client()
            admin.config_set("min-replicas-to-write", 1)
            try:
                yield
            finally:
                admin.config_set("min-replicas-to-write", 0)
        else:
            raise ValueError(f"{self.name} has no fault that refuses writes")

"""What every Redis implementation of a seam shares: the connection and its failure mode.

A Redis that is down, restarting or loading its AOF must cost a caller a quick
``StoreUnavailable`` (a 503 with Retry-After, a worker backing off), never a hang and
never a 500: short socket timeouts, and redis-py's errors translated in one place.
Keys of one deployment share a prefix, so that several deployments (or tests) can share
one Redis server without seeing each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis

from fluxredux.errors import StoreUnavailable

# How long one command may take before the store counts as unavailable.
SOCKET_TIMEOUT_SECONDS = 2.0


def connect(url: str) -> redis.Redis:
    """A client for ``url`` (redis://host:port/db), with bounded connect and command times."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
        decode_responses=True,
    )


def redacted(url: str) -> str:
    """``url`` fit for a log line: its password (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


_OUTAGE_REPLY = re.compile(r"(^|: )(MISCONF|OOM|BUSY|MASTERDOWN|NOREPLICAS|TRYAGAIN|LOADING|READONLY)\b")
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # over maxmemory: writes refused until memory frees up
    redis.exceptions.ExecAbortError,
)


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Redis failures (down, timing out, loading, read-only replica) as StoreUnavailable."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"Redis cannot be {what} right now ({exc}); retry shortly") from exc
    except redis.ResponseError as exc:
        # Error replies that mean "not now" rather than "wrong command": refusing writes
        # after a failed save (MISCONF), out of memory, busy with a script, no primary.
        # Inside a transaction redis-py prefixes the reply ("Command # 1 (SET ...) of
        # pipeline caused error: MISCONF ..."), so the code is looked for, not at the start.
        if not _OUTAGE_REPLY.search(str(exc)):
            raise
        raise StoreUnavailable(f"Redis cannot be {what} right now ({exc}); retry shortly") from exc


def server_time(client: redis.Redis) -> float:
    """Redis's clock (TIME): the one clock that stamps leases across machines."""
    with redis_errors("read"):
        seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def _config(client: redis.Redis, *names: str) -> dict[str, str] | None:
    """CONFIG GET of each of ``names`` (a missing one as ""), or None where CONFIG is
    refused (managed services rename or disable it, an ACL may deny it). StoreUnavailable
    when Redis is down or answers "not now" (LOADING, BUSY...)."""
    with redis_errors("read"):
        try:
            return {name: str(client.config_get(name).get(name, "")) for name in names}
        except redis.ResponseError as exc:
            if _OUTAGE_REPLY.search(str(exc)):
                raise  # redis_errors makes it StoreUnavailable
            return None


def read_persistence(client: redis.Redis) -> str:
    """What this Redis keeps across a restart, as configured now: ``aof``, ``rdb`` (save
    points), ``aof+rdb`` or ``none``; ``unknown`` where CONFIG is refused."""
    config = _config(client, "appendonly", "save")
    if config is None:
        return "unknown"
    on = (("aof", config["appendonly"] == "yes"), ("rdb", bool(config["save"].strip())))
    return "+".join(kind for kind, yes in on if yes) or "none"


def read_eviction(client: redis.Redis) -> str | None:
    """The eviction policy under which this Redis may delete keys to make room (a
    ``maxmemory`` set and a policy other than ``noeviction``), or None: it never evicts,
    or CONFIG is refused (then it cannot tell)."""
    config = _config(client, "maxmemory", "maxmemory-policy")
    if config is None or config["maxmemory"] in ("", "0"):
        return None
    policy = config["maxmemory-policy"] or "noeviction"
    return None if policy == "noeviction" else policy

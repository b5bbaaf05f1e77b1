"""``fluxredux serve``: the HTTP server, its worker process, and start-up recovery."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn

from fluxredux.api.app import create_app
from fluxredux.api.services import Services, build_services
from fluxredux.api.timeouts import timeout_protocol
from fluxredux.backends.redis.client import redacted
from fluxredux.backends.sqlite.events import PipeEventBus
from fluxredux.config import Settings
from fluxredux.errors import ClientError, StoreUnavailable
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.events import EventBus
from fluxredux.jobs.registry import WorkerRegistry, recover_orphans
from fluxredux.storage import unshared_storage
from fluxredux.worker.monitor import WorkerFleet
from fluxredux.worker.supervisor import WorkerSupervisor

log = logging.getLogger("fluxredux.serve")


class CannotListen(ClientError):
    """The address cannot be listened on (a port in use, a host not of this machine):
    said before anything starts (no store opened, no worker spawned)."""

    code = "cannot_listen"


def ensure_first_key(services: Services) -> str | None:
    """On the very first start there is no key: create one, so the API is usable at once.

    Not with Redis: nodes starting together would each make one. There the operator makes
    keys with the command line, as the log says."""
    if services.keys.list():
        return None
    if services.backends.scale_out:
        log.warning("no API key exists yet: create one with `fluxredux keys create --name NAME --redis URL`")
        return None
    _key, secret = services.keys.create("default")
    return secret


def recover_after_restart(services: Services) -> int:
    """Jobs left processing by workers that are gone (the previous run's, typically):
    re-run once, or fail as "worker lost". Workers alive elsewhere keep theirs."""
    settings = services.settings
    recovered = recover_orphans(
        services.lifecycle,
        services.registry,
        max_attempts=settings.max_attempts,
        ttl=settings.worker_ttl_seconds,
    )
    return len(recovered)


def bind(settings: Settings) -> socket.socket:
    """Bind first, so port 0 becomes a real port before anything prints a URL.

    proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on connections whose
    socket says so, and without it every keep-alive response stalls ~40 ms (Nagle's
    algorithm meeting the client's delayed ACK).
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise cannot_listen(settings, exc) from None
    settings.port = sock.getsockname()[1]
    return sock


def cannot_listen(settings: Settings, exc: OSError) -> CannotListen:
    """What to do about a failed bind, in one line naming the flag that fixes it."""
    if exc.errno == errno.EADDRINUSE:
        return CannotListen(
            f"port {settings.port} is in use (another server?); choose another with --port",
            port=settings.port,
        )
    if exc.errno == errno.EACCES:
        return CannotListen(
            f"port {settings.port} needs privileges this user lacks (below 1024?); "
            "choose another with --port",
            port=settings.port,
        )
    return CannotListen(
        f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); check --host and --port",
        port=settings.port,
    )


def local_workers(
    settings: Settings, lifecycle: Lifecycle, bus: EventBus, registry: WorkerRegistry
) -> WorkerSupervisor | WorkerFleet:
    """Who runs this server's predictions.

    The embedded default: one worker child, started and watched by this process, whose
    events come over a pipe. Otherwise (Redis, or ``--workers N`` other than 1) any
    registered worker does, on this machine (N children) or elsewhere."""
    pipe = bus if isinstance(bus, PipeEventBus) else None  # Redis: children publish there themselves
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if settings.local_workers > 1 and gpus and settings.local_workers > len(gpus.split(",")):
        log.warning(
            "%d workers but CUDA_VISIBLE_DEVICES names %d GPUs: some GPUs will hold two models",
            settings.local_workers,
            len(gpus.split(",")),
        )
    supervisors = [
        WorkerSupervisor(settings, lifecycle, pipe, registry, index=i) for i in range(settings.local_workers)
    ]
    if settings.redis_url is None and len(supervisors) == 1:
        return supervisors[0]
    return WorkerFleet(registry, settings.worker_ttl_seconds, supervisors)


def announce_first_key(secret: str, settings: Settings) -> None:
    """The first key, shown once: set apart on its own line, for a person to copy; a
    record like any other where the log is JSON (a line that is not would break shippers)."""
    if settings.log_format == "json":
        log.warning("No API key existed, so one was created. It is shown only this once: %s", secret)
        return
    print(
        f"\nNo API key existed, so one was created. It is shown only this once:\n\n    {secret}\n", flush=True
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: Settings, *, announce: bool = True) -> None:
    # First: a port in use ends the start here, before a store is opened or a worker spawned.
    sock = bind(settings)
    services = build_services(settings, local_workers)
    workers = services.workers
    assert isinstance(workers, (WorkerSupervisor, WorkerFleet))
    url = settings.public_url or f"http://{settings.host}:{settings.port}"
    # Before anything is written: a Redis that keeps nothing across a restart is said now,
    # and the deployment's marker written (or adopted), so that /ready can tell later when
    # Redis came back without the data it held.
    for warning in services.backends.start():
        log.warning("%s", warning)
    try:
        first_key = ensure_first_key(services)
        recovered = recover_after_restart(services)
    except StoreUnavailable as exc:
        # Serve all the same: requests get 503s and /ready says why until the store is back
        # (maintenance then recovers what needs it). A node must not need Redis to start.
        log.warning("the store cannot be used now (%s); serving anyway", exc.message)
        first_key, recovered = None, 0
    if announce:
        log.info("fluxredux serving on %s (playground: %s/, API docs: %s/docs)", url, url, url)
        if settings.redis_url:
            log.info(
                "state: Redis (%s, persistence: %s), %d local worker(s)",
                redacted(settings.redis_url),
                services.backends.durability.persistence,
                settings.local_workers,
            )
        else:
            log.info("data: %s", settings.data_dir)
        log.info("files: %s", settings.storage or settings.files_dir)
        if (problem := unshared_storage(settings)) is not None:
            log.warning(problem)
        if settings.model in ("demo", "fake") or settings.model == "auto":
            log.info("model: %s (the worker says which model it loaded)", settings.model)
        if settings.host in ("0.0.0.0", "::") and not settings.public_url:
            log.warning(
                "listening on all interfaces: set FLUXREDUX_PUBLIC_URL so that webhooks carry reachable links"
            )
        if recovered:
            log.warning("recovered %d prediction(s) interrupted by the last shutdown", recovered)
        if first_key:
            announce_first_key(first_key, settings)
    workers.start()
    config = uvicorn.Config(
        create_app(services),
        http=timeout_protocol(settings),  # bounds slow headers and bodies (api/timeouts.py)
        # None: uvicorn's records go to our handler (one line, or JSON, as ours do), not
        # to handlers of its own in a style of its own.
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    # Everything built so far lives as long as the process: out of the collector's sight, a
    # full collection (every few thousand requests) scans only what was made since, instead
    # of pausing every request in flight for tens of milliseconds (66 ms measured).
    gc.collect()
    gc.freeze()
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler
    # it found. The default one would end the process there, before the workers are told
    # to finish their jobs and the stores are closed: exit through ``finally`` instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
    finally:
        workers.stop()
        services.close()

"""Everything the HTTP app needs, built once from settings and passed in (no globals)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fluxredux.access.idempotency import IdempotencyStore
from fluxredux.access.keys import KeyStore
from fluxredux.access.shares import ShareStore
from fluxredux.access.uploads import UploadStore
from fluxredux.api.eachlabs.render import render
from fluxredux.api.metrics import Metrics
from fluxredux.api.notifier import Notifier, SharedReads
from fluxredux.api.readiness import Readiness
from fluxredux.api.replicate.render import render_replicate
from fluxredux.api.stream_slots import StreamSlots
from fluxredux.backends import Backends, backends_for
from fluxredux.config import Settings
from fluxredux.errors import WouldWait
from fluxredux.images import DecodeLimits
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.events import EventBus, Unsubscribe, publish_changes
from fluxredux.jobs.job import REPLICATE, Job
from fluxredux.jobs.limits import RateLimiter
from fluxredux.jobs.outbox import WebhookOutbox
from fluxredux.jobs.registry import WorkerRegistry
from fluxredux.jobs.store import JobStore
from fluxredux.loras.catalog import LoraCatalog
from fluxredux.net import FetchPolicy, SafeFetcher
from fluxredux.storage import BlobStore, blob_store
from fluxredux.webhooks.sender import WebhookPolicy, WebhookSender
from fluxredux.worker.monitor import WorkerMonitor

T = TypeVar("T")


@dataclass
class Services:
    settings: Settings
    store: JobStore
    lifecycle: Lifecycle
    keys: KeyStore
    shares: ShareStore
    blobs: BlobStore  # inputs and outputs
    uploads: UploadStore
    idempotency: IdempotencyStore  # Idempotency-Key records of creates, both surfaces
    bus: EventBus  # job changes, wherever they happen (worker pipes, or Redis pub/sub)
    notifier: Notifier  # the same, on the event loop (long-polls, webhooks, metrics)
    fetcher: SafeFetcher
    outbox: WebhookOutbox  # webhook deliveries, shared by every API process
    webhooks: WebhookSender  # this process's sweeper of the outbox
    metrics: Metrics
    creations: RateLimiter
    reads: RateLimiter
    registry: WorkerRegistry  # every live worker, wherever it runs
    # Whoever runs the models: the supervisor of a worker process, or a thread in tests.
    workers: WorkerMonitor
    backends: Backends  # what built the seams above; closes them
    stop_notifying: Unsubscribe  # ends the bus -> notifier subscription
    # /ready's checks and their threads (a check that overran its budget is awaited again).
    readiness: Readiness = field(default_factory=Readiness)
    # Reads of a job from the event loop, shared by the tasks its change wakes at once.
    job_reads: SharedReads = field(init=False)
    loras: LoraCatalog = field(init=False)  # the style adapters this deployment offers
    streams: StreamSlots = field(init=False)  # the event streams open on this node

    def __post_init__(self) -> None:
        store, backends = self.store, self.backends
        self.loras = LoraCatalog.from_settings(self.settings)
        self.streams = StreamSlots(self.settings.max_streams_per_key, self.settings.max_streams)
        self.job_reads = SharedReads(
            store.get, now=lambda job_id: backends.read_without_waiting(lambda: store.get(job_id))
        )

    async def read(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)``, a quick read of the stores, on the event loop where they answer
        it without waiting (SQLite), else in a thread (Redis; a lock in the way): a thread
        hop costs the loop many times what a local read does, on every request."""
        try:
            return self.backends.read_without_waiting(lambda: read(*args))
        except WouldWait:
            return await asyncio.to_thread(read, *args)

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)

    def close(self) -> None:
        self.readiness.close()
        self.stop_notifying()
        self.backends.close()


# Builds the worker monitor from the store's lifecycle, the event bus and the registry.
WorkersFactory = Callable[[Settings, Lifecycle, EventBus, WorkerRegistry], WorkerMonitor]


def build_services(
    settings: Settings,
    workers: WorkersFactory,
    *,
    fetcher: SafeFetcher | None = None,
    clock: Callable[[], float] | None = None,
) -> Services:
    backends = backends_for(settings, clock=clock)
    store, registry, bus = backends.jobs, backends.registry, backends.bus
    notifier = Notifier()
    stop_notifying = bus.add_listener(notifier.publish)
    lifecycle = Lifecycle(store, publish=publish_changes(bus))
    fetcher = fetcher or SafeFetcher(
        FetchPolicy(
            max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout_seconds,
            allow_private=settings.allow_private_urls,
        )
    )

    def webhook_body(job: Job) -> dict[str, Any]:
        # Read at send time: the port is known only once the server has bound its socket.
        public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
        if job.surface == REPLICATE:  # the body in the shape of the surface it was made on
            return render_replicate(job, public_url).model_dump(mode="json")
        return render(job, public_url).model_dump(mode="json")

    outbox = backends.outbox
    webhooks = WebhookSender(
        store,
        outbox,
        WebhookPolicy(
            attempts=settings.webhook_attempts,
            first_delay=settings.webhook_first_delay_seconds,
            server_secret=settings.webhook_secret,
            keep_seconds=settings.retention_hours * 3600,
        ),
        fetcher,
        webhook_body,
    )
    return Services(
        settings=settings,
        store=store,
        lifecycle=lifecycle,
        keys=backends.keys,
        shares=backends.shares,
        blobs=blob_store(settings),
        uploads=backends.uploads,
        idempotency=backends.idempotency,
        bus=bus,
        notifier=notifier,
        fetcher=fetcher,
        outbox=outbox,
        webhooks=webhooks,
        metrics=Metrics(store, registry, settings.worker_ttl_seconds),
        registry=registry,
        workers=workers(settings, lifecycle, bus, registry),
        creations=backends.rate_limiter("creations", settings.rate_limit_per_minute),
        reads=backends.rate_limiter("reads", settings.read_limit_per_minute),
        backends=backends,
        stop_notifying=stop_notifying,
    )

"""Everything the HTTP app needs, built once from settings and passed in (no globals)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxredux.api.limits import SlidingWindowLimiter
from fluxredux.api.metrics import Metrics
from fluxredux.api.render import render
from fluxredux.config import Settings
from fluxredux.events import JobEvent, Notifier
from fluxredux.images import DecodeLimits
from fluxredux.jobs import Job, Lifecycle, SQLiteJobStore
from fluxredux.jobs.store import JobStore
from fluxredux.keys import KeyStore
from fluxredux.net import FetchPolicy, SafeFetcher
from fluxredux.storage import FileStore
from fluxredux.webhooks import WebhookPolicy, WebhookSender


@dataclass
class Services:
    settings: Settings
    store: JobStore
    lifecycle: Lifecycle
    keys: KeyStore
    files: FileStore
    notifier: Notifier
    fetcher: SafeFetcher
    webhooks: WebhookSender
    metrics: Metrics
    creations: SlidingWindowLimiter
    reads: SlidingWindowLimiter
    # Set by whoever runs the worker (the supervisor, or a thread in tests).
    wake_worker: Callable[[], None] = lambda: None
    worker_status: Callable[[], dict[str, Any]] = field(default=lambda: {"ready": False})

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.settings.max_image_bytes, self.settings.max_image_pixels)

    def close(self) -> None:
        self.store.close()
        self.keys.close()


def build_services(
    settings: Settings, *, fetcher: SafeFetcher | None = None, clock: Callable[[], float] = time.time
) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteJobStore(settings.database_path)
    notifier = Notifier()
    lifecycle = Lifecycle(
        store, clock=clock, publish=lambda job: notifier.publish(JobEvent(job.id, job.status.value))
    )
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
        return render(job, public_url).model_dump(mode="json")

    webhooks = WebhookSender(
        store,
        WebhookPolicy(
            attempts=settings.webhook_attempts,
            first_delay=settings.webhook_first_delay_seconds,
            server_secret=settings.webhook_secret,
        ),
        fetcher,
        webhook_body,
    )
    return Services(
        settings=settings,
        store=store,
        lifecycle=lifecycle,
        keys=KeyStore(settings.database_path),
        files=FileStore(settings.files_dir),
        notifier=notifier,
        fetcher=fetcher,
        webhooks=webhooks,
        metrics=Metrics(store),
        creations=SlidingWindowLimiter(settings.rate_limit_per_minute),
        reads=SlidingWindowLimiter(settings.read_limit_per_minute),
    )

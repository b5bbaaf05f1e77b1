"""The FastAPI app factory. Never imports torch: the model lives in the worker process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxredux import __version__
from fluxredux.api import errors
from fluxredux.api.eachlabs import routes as eachlabs_routes
from fluxredux.api.maintenance import run_maintenance
from fluxredux.api.replicate import routes as replicate_routes
from fluxredux.api.routes import docs, files, loras, shares, system, web
from fluxredux.api.routes.web import STATIC_DIR
from fluxredux.api.services import Services
from fluxredux.errors import PayloadTooLarge, StoreUnavailable
from fluxredux.jobs.events import JobEvent
from fluxredux.jobs.job import TERMINAL, Status

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over the cap, counting streamed bytes too (no Content-Length needed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"the request body is over the {self.max_bytes:,}-byte limit", limit_bytes=self.max_bytes
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await errors.error_response(too_large, errors.surface_of(scope["path"]))(scope, receive, send)
            return
        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app answers to a cut-off body, the answer is 413
            started = True
            await send(message)

        with contextlib.suppress(PayloadTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not started:
            await errors.error_response(too_large, errors.surface_of(scope["path"]))(scope, receive, send)


class CountRequests:
    """Counts each answered request by method, route and status (``/metrics``).

    Plain ASGI, not ``@app.middleware("http")``: that one (Starlette's BaseHTTPMiddleware)
    runs every request in a task of its own with memory streams in between, a cost paid on
    every request, long-polls included."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            if status is not None:  # an answer started (a request cut off before one is not counted)
                # The router put the matched route in this same scope dict.
                route: Any = scope.get("route")
                self.services.metrics.requests.labels(
                    scope["method"], getattr(route, "path", "unmatched"), str(status)
                ).inc()


# An event's status is a string (as it crossed the bus): the terminal ones, as strings.
_TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)


def create_app(services: Services) -> FastAPI:
    pending: set[asyncio.Task[None]] = set()  # strong references until each task is done

    async def after_terminal(event: JobEvent, heard: float) -> None:
        try:
            # As the event carried it; else a read shared with the long-polls its end woke.
            job = event.job or await services.job_reads.get(event.job_id, after=heard)
        except StoreUnavailable as exc:  # still marked pending: enqueued by the next maintenance round
            log.warning("prediction %s ended, but could not be read: %s", event.job_id, exc.message)
            return
        if job is None:
            return
        if job.status == Status.SUCCEEDED and "predict_time" in job.metrics:
            services.metrics.predict_time.observe(job.metrics["predict_time"])
            if "denoise" in job.metrics and job.progress_total:
                services.metrics.step_time.observe(job.metrics["denoise"] / job.progress_total)
        await services.webhooks.enqueue(job)  # and the sweeper woken: the first try goes out now

    def on_event(event: JobEvent) -> None:
        # Called on the event loop: the store is read in a thread (in the tasks), never here.
        if event.status == Status.PROCESSING.value:  # claimed, or a step done: maybe a webhook event
            if services.webhooks.ignores_progress(event.job_id):
                return  # most jobs: no task at all
            task = asyncio.get_running_loop().create_task(services.webhooks.progressed(event.job_id))
        elif event.status in _TERMINAL_STATUSES:
            services.metrics.finished.labels(event.status).inc()
            task = asyncio.get_running_loop().create_task(after_terminal(event, time.monotonic()))
        else:
            return
        pending.add(task)
        task.add_done_callback(pending.discard)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Store calls run in these threads. A locked database holds a thread per waiting
        # write for up to the busy timeout: asyncio's default (CPU count + 4 threads)
        # would then queue every read behind them.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="blocking"))
        services.notifier.bind(loop)
        stop_listening = services.notifier.listen(on_event)
        services.webhooks.start()  # the sweeper of the webhook outbox (first: what ended while down)
        background = asyncio.create_task(run_maintenance(services))
        try:
            yield
        finally:
            background.cancel()
            for task in pending:
                task.cancel()
            await services.webhooks.aclose()
            await services.fetcher.aclose()
            stop_listening()

    app = errors.ErrorDocumentingFastAPI(
        title="fluxredux",
        version=__version__,
        description="Self-hosted FLUX.1 Redux [schnell] predictions, compatible with the hosted "
        "flux-redux-schnell API.",
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load their assets from a CDN: routes/docs.py serves them itself.
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    errors.install(app)
    app.include_router(eachlabs_routes.router)
    app.include_router(replicate_routes.router)
    app.include_router(shares.router)
    app.include_router(files.router)
    app.include_router(loras.router)
    app.include_router(system.router)
    app.include_router(web.router)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(docs.ASSETS_PATH, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")

    app.add_middleware(CountRequests, services=services)
    app.add_middleware(BodyLimit, max_bytes=services.settings.max_body_bytes)
    return app

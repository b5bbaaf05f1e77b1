"""/health (liveness), /ready (readiness) and /metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fluxredux.api.deps import ServicesDep, presented_key, verified_key
from fluxredux.api.errors import error_responses
from fluxredux.api.services import Services
from fluxredux.errors import NotFound, StorageError, StoreUnavailable
from fluxredux.jobs.registry import WorkerInfo, is_gone


class NotReady(BaseModel):
    ready: Literal[False] = False
    error: str
    code: Literal["not_ready"] = "not_ready"
    reasons: list[str]


router = APIRouter(tags=["system"])


@router.get("/health", summary="Liveness: the process answers (and what the worker says about the model)")
async def health(services: ServicesDep) -> dict[str, Any]:
    queue_depth: int | None
    try:  # liveness never waits on the store (/ready is about the store)
        async with asyncio.timeout(0.5):
            queue_depth = await asyncio.to_thread(services.lifecycle.queue_depth)
    except (StoreUnavailable, TimeoutError):
        queue_depth = None
    return {
        "status": "ok",
        "model": services.workers.status(),
        "queue_depth": queue_depth,
        "limits": {"max_image_bytes": services.settings.max_image_bytes},
        # What the state store keeps across a restart, as read at start: a Redis with
        # neither AOF nor snapshots is a warning here (and in the start-up log).
        "store": services.backends.durability.as_dict(),
    }


def live_workers(services: Services) -> list[WorkerInfo]:
    registry, ttl = services.registry, services.settings.worker_ttl_seconds
    now = registry.now()
    # A worker whose model failed to load is alive but runs nothing.
    return [w for w in registry.workers() if not is_gone(w, now, ttl) and w.state != "failed"]


def job_store_problems(services: Services) -> list[str]:
    """The job store takes writes, still holds the deployment's data, and a worker is live."""
    problems = []
    try:
        services.store.check_writable()
        if (lost := services.backends.lost_data()) is not None:
            problems.append(lost)
        if not live_workers(services):
            problems.append("no live worker is registered (`fluxredux workers` lists them)")
    except StoreUnavailable as exc:
        problems.append(exc.message)
    return problems


def storage_problems(services: Services) -> list[str]:
    try:  # a tiny real write: a read-only or full disk, or a bucket that cannot be written, fails here
        services.blobs.check_writable()
    except StorageError as exc:
        return [exc.message]
    return []


async def readiness_problems(services: Services) -> list[str]:
    """Why predictions accepted now would not run. Each check on its own thread, all at
    once, within /ready's budget (api/readiness.py): a store that hangs is named, not waited on."""
    return await services.readiness.problems(
        {
            "workers": services.workers.problems,
            "job store": lambda: job_store_problems(services),
            "storage": lambda: storage_problems(services),
        }
    )


@router.get(
    "/ready",
    summary="Readiness: 200 when accepted predictions will run, 503 with the reasons when not",
    responses={503: {"description": "Not ready; `reasons` says why", "model": NotReady}},
)
async def ready(services: ServicesDep) -> JSONResponse:
    problems = await readiness_problems(services)
    if problems:
        body = NotReady(error="not ready: " + "; ".join(problems), reasons=problems)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"ready": True, "model": services.workers.status()})


@router.get(
    "/metrics",
    summary="Prometheus metrics (FLUXREDUX_METRICS_ACCESS: open, key or off)",
    responses=error_responses(401, 404),
)
async def metrics(
    services: ServicesDep,
    x_api_key: Annotated[str | None, Header(description="An API key, when metrics need one.")] = None,
    authorization: Annotated[str | None, Header(description="Or: Bearer <API key>.")] = None,
) -> Response:
    # Queue depths, request counts and timings tell an outsider how busy (and how big) the
    # server is: a server reachable beyond loopback asks for a key by default.
    access = services.settings.metrics_policy
    if access == "off":
        raise NotFound("metrics are turned off on this server (FLUXREDUX_METRICS_ACCESS=off)")
    if access == "key":
        await asyncio.to_thread(verified_key, services, presented_key(x_api_key, authorization))
    body = await asyncio.to_thread(services.metrics.render)  # reads the job store: not on the loop
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

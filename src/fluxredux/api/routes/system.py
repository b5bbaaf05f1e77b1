"""/health and /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from fluxredux.api.deps import ServicesDep

router = APIRouter(tags=["system"])


@router.get("/health", summary="Liveness, and whether the model is loaded (demo or real)")
async def health(services: ServicesDep) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": services.worker_status(),
        "queue_depth": services.lifecycle.queue_depth(),
        "limits": {"max_image_bytes": services.settings.max_image_bytes},
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

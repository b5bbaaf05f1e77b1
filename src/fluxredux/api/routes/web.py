"""The playground page, the share page, and the one public read of a prediction."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fluxredux.api.deps import BaseUrlDep, ServicesDep
from fluxredux.api.render import render
from fluxredux.errors import NotFound
from fluxredux.schema import Prediction
from fluxredux.web import STATIC_DIR

router = APIRouter()

# Pages change with releases: always revalidate them.
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


@router.get("/p/{prediction_id}", include_in_schema=False)
async def share_page(prediction_id: str) -> FileResponse:
    return FileResponse(STATIC_DIR / "share.html", headers=NO_CACHE)


@router.get("/v1/share/{prediction_id}", response_model=Prediction, tags=["predictions"],
            summary="A prediction by its id, without a key (the 128-bit id is the capability)")  # fmt: skip
async def shared_prediction(prediction_id: str, services: ServicesDep, base: BaseUrlDep) -> Prediction:
    job = services.store.get(prediction_id)
    if job is None:
        raise NotFound(f"no prediction with id '{prediction_id}'", id=prediction_id)
    return render(job, base)

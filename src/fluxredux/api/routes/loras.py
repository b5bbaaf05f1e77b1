"""GET /v1/loras: the style adapters (LoRA) a caller may name in a prediction's ``loras``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from fluxredux.api.deps import ReaderKeyDep, ServicesDep
from fluxredux.api.eachlabs.shapes import LoraAdapter, LoraList
from fluxredux.api.errors import error_responses
from fluxredux.schema import MAX_LORAS

router = APIRouter(tags=["loras"], responses=error_responses(401, 429))


@router.get("/v1/loras", response_model=LoraList, summary="The style adapters (LoRA) you may use")
async def list_loras(key: ReaderKeyDep, services: ServicesDep) -> LoraList:
    catalog = services.loras
    usable = await asyncio.to_thread(catalog.usable)  # reads the folder and file headers
    return LoraList(
        adapters=[LoraAdapter(name=e.name, source=e.source, rank=e.rank, size=e.size) for e in usable],
        max_loras=MAX_LORAS,
        max_rank=catalog.max_rank,
    )

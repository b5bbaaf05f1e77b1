"""GET /v1/loras: the style adapters (LoRA) a caller may name in a prediction's ``loras``."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fluxredux.api.deps import ReaderKeyDep, ServicesDep
from fluxredux.api.errors import error_responses
from fluxredux.schema import MAX_LORAS

router = APIRouter(tags=["loras"], responses=error_responses(401, 429))


class LoraAdapter(BaseModel):
    name: str = Field(description="What to give as loras[].name.")
    source: Literal["local", "hub"] = Field(
        description="local: a file on this server; hub: Hugging Face repos of this pattern "
        "(owner/* or owner/repo), fetched by a worker on first use."
    )
    rank: int | None = Field(description="The adapter's LoRA rank (unknown for a hub pattern).")
    size: int | None = Field(description="Its file's size in bytes (unknown for a hub pattern).")


class LoraList(BaseModel):
    adapters: list[LoraAdapter]
    max_loras: int = Field(description="At most this many per prediction.")
    max_rank: int = Field(description="The largest rank this server accepts.")


@router.get("/v1/loras", response_model=LoraList, summary="The style adapters (LoRA) you may use")
async def list_loras(key: ReaderKeyDep, services: ServicesDep) -> LoraList:
    catalog = services.loras
    usable = await asyncio.to_thread(catalog.usable)  # reads the folder and file headers
    return LoraList(
        adapters=[LoraAdapter(name=e.name, source=e.source, rank=e.rank, size=e.size) for e in usable],
        max_loras=MAX_LORAS,
        max_rank=catalog.max_rank,
    )

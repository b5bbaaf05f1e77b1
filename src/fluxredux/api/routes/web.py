"""The playground page and the share page (the share API itself is in routes/shares.py)."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fluxredux.api.deps import ServicesDep
from fluxredux.api.routes.shares import shared_job
from fluxredux.errors import NotFound

# The playground's static files: shipped as package data, not a package of their own.
STATIC_DIR = Path(str(files("fluxredux") / "web" / "static"))

router = APIRouter()

# Pages change with releases: always revalidate them.
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


@router.get("/p/{token}", include_in_schema=False)
async def share_page(token: str, services: ServicesDep) -> FileResponse:
    # An unknown or revoked token (or a bare prediction id) is a 404, still with the page:
    # it reads /v1/share/{token} itself and says in words that the link opens nothing.
    try:
        await asyncio.to_thread(shared_job, services, token)
        status = 200
    except NotFound:
        status = 404
    return FileResponse(STATIC_DIR / "share.html", status_code=status, headers=NO_CACHE)

"""Uploads (/v1/files, keyed) and file downloads (/files/{name}, public by unguessable name)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from fluxredux.api.deps import BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.errors import error_responses
from fluxredux.api.inputs import check_and_store
from fluxredux.api.render import file_url
from fluxredux.errors import FluxReduxError, ImageError, StorageError
from fluxredux.formats import INPUT_FORMATS
from fluxredux.schema import UploadedFile
from fluxredux.storage import BlobStream

router = APIRouter(tags=["files"], responses=error_responses(400, 401, 404, 413, 429, 503))

# A file's name never changes what it holds, so caches may keep it for the retention period.
_HEADERS = {"Cache-Control": "public, max-age=604800, immutable", "X-Content-Type-Options": "nosniff"}


@router.post("/v1/files", response_model=UploadedFile, summary="Upload a reference image")
async def upload_file(
    file: Annotated[UploadFile, File(description="JPEG, PNG, WEBP or GIF")],
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
) -> UploadedFile:
    limit = services.settings.max_image_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ImageError("image_too_large", f"the image is over the {limit:,}-byte limit", limit_bytes=limit)
    stored = await check_and_store(data, services.blobs, services.decode_limits)
    try:
        await asyncio.to_thread(services.uploads.add, stored.name, key.id)
    except FluxReduxError:  # not recorded, so never found nor expired: the blob goes now
        with contextlib.suppress(StorageError):
            await asyncio.to_thread(services.blobs.delete, [stored.name])
        raise
    return UploadedFile(
        id=stored.file_id,
        url=file_url(base, stored.name),
        content_type=stored.content_type,
        size=stored.size,
        width=stored.width,
        height=stored.height,
    )


async def _chunks(blob: BlobStream) -> AsyncIterator[bytes]:
    """The blob's chunks, read in threads; closed however the response ends (a client
    that disconnects mid-download included)."""
    try:
        async for chunk in iterate_in_threadpool(blob):
            yield chunk
    finally:
        blob.close()


@router.get(
    "/files/{name}",
    response_class=StreamingResponse,
    summary="Download an input or output file (no key: the name is the capability)",
    responses={
        200: {
            "description": "The file",
            "content": {f.content_type: {} for f in INPUT_FORMATS.values()},
        }
    },
)
async def download_file(name: str, services: ServicesDep) -> StreamingResponse:
    blob = await asyncio.to_thread(services.blobs.open, name)  # BlobNotFound: 404
    headers = {"Content-Length": str(blob.info.size), **_HEADERS}
    return StreamingResponse(_chunks(blob), media_type=blob.info.content_type, headers=headers)

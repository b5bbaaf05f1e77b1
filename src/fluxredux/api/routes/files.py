"""Uploads (/v1/files, keyed) and file downloads (/files/{name}, public by unguessable name)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import FileResponse

from fluxredux.api.deps import ApiKeyDep, BaseUrlDep, ServicesDep
from fluxredux.api.errors import error_responses
from fluxredux.api.inputs import check_and_store
from fluxredux.api.render import file_url
from fluxredux.errors import ImageError, NotFound
from fluxredux.schema import UploadedFile

router = APIRouter(tags=["files"], responses=error_responses(400, 401, 404, 413, 429, 503))

CONTENT_TYPES = {
    "webp": "image/webp",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
}


@router.post("/v1/files", response_model=UploadedFile, summary="Upload a reference image")
async def upload_file(
    file: Annotated[UploadFile, File(description="JPEG, PNG, WEBP or GIF")],
    key: ApiKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
) -> UploadedFile:
    services.reads.hit(key.id, "reads")
    limit = services.settings.max_image_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ImageError("image_too_large", f"the image is over the {limit:,}-byte limit", limit_bytes=limit)
    stored = await check_and_store(data, services.files, services.decode_limits)
    return UploadedFile(
        id=stored.file_id,
        url=file_url(base, stored.name),
        content_type=stored.content_type,
        size=stored.size,
        width=stored.width,
        height=stored.height,
    )


@router.get("/files/{name}", summary="Download an input or output file (no key: the name is the capability)")
async def download_file(name: str, services: ServicesDep) -> FileResponse:
    path = services.files.path(name)
    if path is None:
        raise NotFound("no such file (expired, or never existed)")
    return FileResponse(
        path,
        media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]],
        headers={"Cache-Control": "public, max-age=604800, immutable", "X-Content-Type-Options": "nosniff"},
    )

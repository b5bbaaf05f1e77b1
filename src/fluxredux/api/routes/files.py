"""Uploads (/v1/files, keyed) and file downloads (/files/{name}, public by unguessable name).

``POST /v1/files`` serves both surfaces: the multipart field ``file`` answers as before
(``UploadedFile``), the field ``content`` (with an optional JSON ``metadata`` field), as
Replicate's clients send it, answers with Replicate's File object, whose ``urls.get`` is
usable as ``redux_image``. ``GET`` and ``DELETE /v1/files/{id}`` are Replicate's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from fluxredux.access.keys import ApiKey
from fluxredux.access.uploads import Upload
from fluxredux.api.deps import BaseUrlDep, ReaderKeyDep, ServicesDep
from fluxredux.api.eachlabs.render import file_url, iso_time
from fluxredux.api.eachlabs.shapes import UploadedFile
from fluxredux.api.errors import error_responses, problem_responses
from fluxredux.api.inputs import check_and_store
from fluxredux.api.replicate.shapes import ReplicateFile
from fluxredux.api.services import Services
from fluxredux.errors import FluxReduxError, ImageError, InvalidInput, NotFound, StorageError
from fluxredux.images.formats import INPUT_FORMATS, content_type_for
from fluxredux.jobs.job import Status
from fluxredux.schema import shorten
from fluxredux.storage import BlobStream

router = APIRouter(tags=["files"])

# A file's name never changes what it holds, so caches may keep it for the retention period.
_HEADERS = {"Cache-Control": "public, max-age=604800, immutable", "X-Content-Type-Options": "nosniff"}
MAX_METADATA_CHARS = 16 * 1024
MAX_NAME_CHARS = 255


def _field_error(message: str, field: str) -> InvalidInput:
    return InvalidInput(message, fields=[{"field": field, "message": message, "type": "value_error"}])


def _metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's stack
        value = None
    if not isinstance(value, dict):
        raise _field_error("metadata: must be a JSON object", "metadata")
    return value


def replicate_file(
    upload: Upload, data: bytes, content_type: str, base: str, retention_seconds: float, **shown: Any
) -> ReplicateFile:
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return ReplicateFile.model_validate(
        {
            "id": upload.id,
            "name": upload.key,
            "content_type": content_type,
            "size": len(data),
            "etag": md5,
            "checksums": {"sha256": hashlib.sha256(data).hexdigest(), "md5": md5},
            "metadata": {},
            "created_at": iso_time(upload.created_at),
            # Kept for the retention period after its last use (see fluxredux.access.uploads).
            "expires_at": iso_time(upload.last_used_at + retention_seconds),
            "urls": {"get": file_url(base, upload.key)},
            **shown,
        }
    )


@router.post(
    "/v1/files",
    response_model=UploadedFile | ReplicateFile,
    summary="Upload a reference image",
    responses=error_responses(400, 401, 413, 429, 503),
)
async def upload_file(
    key: ReaderKeyDep,
    services: ServicesDep,
    base: BaseUrlDep,
    file: Annotated[UploadFile | None, File(description="JPEG, PNG, WEBP or GIF")] = None,
    content: Annotated[
        UploadFile | None, File(description="Instead of file, as Replicate's clients send it: answers a File")
    ] = None,
    metadata: Annotated[
        str | None, Form(max_length=MAX_METADATA_CHARS, description="With content: a JSON object, echoed")
    ] = None,
) -> UploadedFile | ReplicateFile:
    given = file or content
    if given is None or (file is not None and content is not None):
        raise _field_error("send the image as one multipart field: 'file' (or 'content')", "file")
    shown_metadata = _metadata(metadata)
    limit = services.settings.max_image_bytes
    data = await given.read(limit + 1)
    if len(data) > limit:
        raise ImageError("image_too_large", f"the image is over the {limit:,}-byte limit", limit_bytes=limit)
    stored = await check_and_store(data, services.blobs, services.decode_limits)
    try:
        upload = await asyncio.to_thread(services.uploads.add, stored.name, key.id)
    except FluxReduxError:  # not recorded, so never found nor expired: the blob goes now
        with contextlib.suppress(StorageError):
            await asyncio.to_thread(services.blobs.delete, [stored.name])
        raise
    if content is not None:
        return replicate_file(
            upload,
            data,
            stored.content_type,
            base,
            services.settings.retention_hours * 3600,
            name=shorten(content.filename or upload.key, MAX_NAME_CHARS),
            metadata=shown_metadata,
        )
    return UploadedFile(
        id=stored.file_id,
        url=file_url(base, stored.name),
        content_type=stored.content_type,
        size=stored.size,
        width=stored.width,
        height=stored.height,
    )


def owned_upload(services: Services, file_id: str, key: ApiKey) -> Upload:
    """The caller's upload (blocking: call it in a thread)."""
    upload = services.uploads.get(file_id)
    if upload is None or upload.owner != key.id:  # another key's upload is as good as absent
        raise NotFound(f"no file with id '{file_id}'", id=file_id)
    return upload


@router.get(
    "/v1/files/{file_id}",
    response_model=ReplicateFile,
    summary="An uploaded file (Replicate-compatible; name and metadata are not kept)",
    responses=problem_responses(401, 404, 429, 503),
)
async def get_file(file_id: str, key: ReaderKeyDep, services: ServicesDep, base: BaseUrlDep) -> ReplicateFile:
    upload = await asyncio.to_thread(owned_upload, services, file_id, key)
    data = await asyncio.to_thread(services.blobs.get, upload.key)  # BlobNotFound: 404
    content_type = content_type_for(upload.key) or "application/octet-stream"
    return replicate_file(upload, data, content_type, base, services.settings.retention_hours * 3600)


@router.delete(
    "/v1/files/{file_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an uploaded file (Replicate-compatible)",
    responses=problem_responses(401, 404, 429, 503),
)
async def delete_file(file_id: str, key: ReaderKeyDep, services: ServicesDep) -> Response:
    await asyncio.to_thread(owned_upload, services, file_id, key)
    upload = await asyncio.to_thread(services.uploads.withdraw, file_id)
    if upload is None:  # deleted meanwhile
        raise NotFound(f"no file with id '{file_id}'", id=file_id)
    # Accepted predictions that use it must still run: while one waits or runs, the
    # image stays (and goes with that prediction, as its own input copy, at its
    # retention: the upload record that would keep it is forgotten below). Otherwise it
    # goes now. If deleting fails, the upload stays marked: the next retention round does it.
    if not await asyncio.to_thread(_used_by_unfinished_predictions, services, upload.key):
        await asyncio.to_thread(services.blobs.delete, [upload.key])
    await asyncio.to_thread(services.uploads.forget, [upload.id])
    return Response(status_code=204)


def _used_by_unfinished_predictions(services: Services, key: str) -> bool:
    """Whether a queued or running prediction reads the blob ``key`` (blocking). The
    queue is bounded (max_queue), so this reads a bounded number of jobs."""
    unfinished = services.store.find([Status.STARTING, Status.PROCESSING], limit=10_000_000)
    return any(key in job.input_files for job in unfinished)


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
        **error_responses(404),
        200: {
            "description": "The file",
            "content": {f.content_type: {} for f in INPUT_FORMATS.values()},
        },
    },
)
async def download_file(name: str, services: ServicesDep) -> StreamingResponse:
    blob = await asyncio.to_thread(services.blobs.open, name)  # BlobNotFound: 404
    headers = {"Content-Length": str(blob.info.size), **_HEADERS}
    return StreamingResponse(_chunks(blob), media_type=blob.info.content_type, headers=headers)

"""Turning ``redux_image`` into a stored, checked reference image at request time.

Whatever the source (upload id, data: URI, http(s) URL), the image is decoded once here
so a bad image is a 400 now rather than a failed prediction later, then stored as an
input file the worker reads.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

from PIL import Image

from fluxredux.errors import ImageError, StorageError
from fluxredux.images import DecodeLimits, decode_image, parse_data_uri
from fluxredux.net import SafeFetcher
from fluxredux.storage import FileStore

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class StoredImage:
    name: str  # file name in the FileStore
    width: int
    height: int
    content_type: str
    size: int
    saved_now: bool  # stored for this request (a URL or data: URI), not an earlier upload

    @property
    def file_id(self) -> str:
        return self.name.split(".", 1)[0]


def _probe(data: bytes, limits: DecodeLimits) -> tuple[str, int, int]:
    """Format and displayed size, after the full check the worker's decode will do."""
    width, height = decode_image(data, limits).size
    with Image.open(io.BytesIO(data)) as original:  # header only: which format it was
        return str(original.format), width, height


async def check_and_store(
    data: bytes, files: FileStore, limits: DecodeLimits, name: str | None = None
) -> StoredImage:
    """Validate (in a thread: decoding is CPU work) and store the original bytes."""
    fmt, width, height = await asyncio.to_thread(_probe, data, limits)
    saved_now = name is None
    if name is None:
        try:
            name = await asyncio.to_thread(files.save, data, _EXTENSIONS[fmt])
        except OSError as exc:  # a full or read-only disk is the server's problem: 503, not 500
            raise StorageError(f"the image could not be stored ({exc.strerror or exc}); retry later") from exc
    return StoredImage(
        name=name,
        width=width,
        height=height,
        content_type=_CONTENT_TYPES[fmt],
        size=len(data),
        saved_now=saved_now,
    )


async def resolve_reference(
    ref: str, files: FileStore, fetcher: SafeFetcher, limits: DecodeLimits
) -> StoredImage:
    if ref[:5].lower() == "data:":
        return await check_and_store(parse_data_uri(ref, limits.max_bytes), files, limits)
    if ref[:7].lower() == "http://" or ref[:8].lower() == "https://":
        return await check_and_store(await fetcher.fetch(ref), files, limits)
    name = files.find(ref)
    path = files.path(name) if name else None
    if name is None or path is None:
        raise ImageError(
            "image_file_not_found", f"no uploaded file with id '{ref}' (expired or never uploaded)"
        )
    return await check_and_store(await asyncio.to_thread(path.read_bytes), files, limits, name=name)

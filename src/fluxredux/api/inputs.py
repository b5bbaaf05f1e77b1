"""Turning the reference images (``redux_image``, or each of ``redux_images``) into
stored, checked images at request time.

Whatever the source (upload id, data: URI, http(s) URL), the image is decoded once here
so a bad image is a 400 now rather than a failed prediction later, then stored as an
input blob the worker reads. A URL or data: URI is stored as a copy of this prediction's
own; an upload of the caller's own key is used in place (and kept by its own retention,
see fluxredux.access.uploads); another key's upload id is refused as an unknown one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fluxredux.access.uploads import UploadStore, upload_id_of
from fluxredux.errors import ImageError, ImageFileNotFound, StorageError
from fluxredux.images import DecodeLimits, parse_data_uri
from fluxredux.images.decode import displayed_size, load_checked
from fluxredux.images.formats import INPUT_FORMATS
from fluxredux.net import SafeFetcher
from fluxredux.schema import PredictionInput
from fluxredux.storage import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    is_valid_id,
    is_valid_key,
    key_id,
    new_key,
)


@dataclass(frozen=True)
class StoredImage:
    name: str  # the blob's key
    width: int
    height: int
    content_type: str
    size: int
    saved_now: bool  # stored for this request (a URL or data: URI), not an earlier upload

    @property
    def file_id(self) -> str:
        return key_id(self.name)


def _probe(data: bytes, limits: DecodeLimits) -> tuple[str, int, int]:
    """Format and displayed size, after the full check the worker's decode will do."""
    with load_checked(data, limits) as image:  # decoded once; its format still known
        width, height = displayed_size(image)
        return str(image.format), width, height


async def check_and_store(
    data: bytes, blobs: BlobStore, limits: DecodeLimits, name: str | None = None
) -> StoredImage:
    """Validate (in a thread: decoding is CPU work) and store the original bytes, unless
    they are already stored as ``name``: both in one thread, one hop off the event loop."""
    return await asyncio.to_thread(_check_and_store, data, blobs, limits, name)


def _check_and_store(data: bytes, blobs: BlobStore, limits: DecodeLimits, name: str | None) -> StoredImage:
    fmt, width, height = _probe(data, limits)
    image_format = INPUT_FORMATS[fmt]
    saved_now = name is None
    if name is None:
        name = new_key(image_format.extension)
        try:
            blobs.put(name, data, image_format.content_type)
        except BlobStoreError as exc:  # a full or read-only disk is the server's problem: 503, not 500
            raise StorageError(f"the image could not be stored ({exc.reason}); retry later") from exc
    return StoredImage(
        name=name,
        width=width,
        height=height,
        content_type=image_format.content_type,
        size=len(data),
        saved_now=saved_now,
    )


def own_file_key(ref: str, own_files: str | None) -> str | None:
    """The blob key in a link to this server's file ``{own_files}{key}``, if ``ref`` is
    one: an upload (the Replicate client passes uploads as URLs), or another prediction's
    output or input (feeding an output back in is a common Redux loop). This server need
    not (and, on a private address, may not) fetch those from itself."""
    if own_files is None or not ref.startswith(own_files):
        return None
    key = ref[len(own_files) :]
    return key if is_valid_key(key) else None


def _field(inputs: PredictionInput, index: int) -> str:
    """How the request names reference ``index`` (in errors)."""
    return "input.redux_image" if inputs.redux_images is None else f"input.redux_images.{index}.image"


@contextmanager
def _naming(inputs: PredictionInput, index: int) -> Iterator[None]:
    """An ImageError of reference ``index`` says which reference it was, as a validation error does."""
    try:
        yield
    except ImageError as exc:
        field = _field(inputs, index)
        raise type(exc)(exc.code, f"{field}: {exc.message}", **{**exc.detail, "field": field}) from None


def _is_download(ref: str, own_files: str | None) -> bool:
    return _is_url(ref) and own_file_key(ref, own_files) is None


def needs_download(inputs: PredictionInput, own_files: str | None = None) -> bool:
    """Whether a reference must be fetched from the network (an http(s) URL not to this
    server's own files)."""
    return any(_is_download(ref, own_files) for ref, _weight in inputs.references)


async def download_references(
    inputs: PredictionInput, fetcher: SafeFetcher, own_files: str | None = None
) -> dict[int, bytes]:
    """The bytes of each reference that must be fetched, by its index: the only part of
    resolving references that waits on the network (on the event loop, through httpx)."""
    fetched: dict[int, bytes] = {}
    for index, (ref, _weight) in enumerate(inputs.references):
        if _is_download(ref, own_files):
            with _naming(inputs, index):
                fetched[index] = await fetcher.fetch(ref)
    return fetched


def store_references(
    inputs: PredictionInput,
    owner: str,
    blobs: BlobStore,
    uploads: UploadStore,
    limits: DecodeLimits,
    own_files: str | None = None,
    downloaded: dict[int, bytes] | None = None,
) -> list[StoredImage]:
    """Every reference of ``inputs``, in order, checked and stored; if one fails, the
    copies already made for this request are deleted before the error goes up.

    Blocking (decoding, the blob store, the upload records): the caller runs it in a
    thread, in one hop with the rest of a create's store work (each hop off the event loop
    costs as much as the work). ``owner``: the creating API key's id (only its own uploads
    are found by id). ``own_files``: this server's files' URL prefix (links to its uploads
    are uploads). ``downloaded``: the bytes ``download_references`` fetched, by index."""
    stored: list[StoredImage] = []
    try:
        for index, (ref, _weight) in enumerate(inputs.references):
            with _naming(inputs, index):
                fetched = (downloaded or {}).get(index)
                stored.append(_store_reference(ref, owner, blobs, uploads, limits, own_files, fetched))
    except BaseException:
        blobs.delete([image.name for image in stored if image.saved_now])
        raise
    return stored


def _store_reference(
    ref: str,
    owner: str,
    blobs: BlobStore,
    uploads: UploadStore,
    limits: DecodeLimits,
    own_files: str | None,
    downloaded: bytes | None,
) -> StoredImage:
    """``ref`` checked and stored for a prediction of the API key ``owner`` (blocking)."""
    if downloaded is not None:
        return _check_and_store(downloaded, blobs, limits, None)
    own_key = own_file_key(ref, own_files)
    if own_key is not None:
        linked = uploads.get(upload_id_of(own_key))
        if linked is not None and linked.owner == owner:
            ref = upload_id_of(own_key)  # one of the caller's uploads: used as such, below
        else:
            # Another prediction's file, or another key's upload (its URL downloads without
            # a key: a capability): a copy of this prediction's own, as for a fetched URL
            # (in place, it would go when that prediction or upload does, or keep it).
            return _check_and_store(_own_file(blobs, own_key, ref), blobs, limits, None)
    if ref[:5].lower() == "data:":
        return _check_and_store(parse_data_uri(ref, limits.max_bytes), blobs, limits, None)
    # An upload id: found among the caller's uploads only (an id is no secret: another
    # key's upload is as good as absent, as on GET /v1/files/{id}), and marked as used now,
    # which keeps it for another retention period (and keeps a retention round from
    # deleting it meanwhile). Ownership first: another key's attempt must not keep it.
    found = uploads.get(ref) if is_valid_id(ref) else None
    upload = uploads.use(ref) if found is not None and found.owner == owner else None
    data = None
    if upload is not None:
        try:
            data = blobs.get(upload.key)
        except BlobNotFound:
            data = None
    if upload is None or data is None:
        raise ImageFileNotFound(
            "image_file_not_found", f"no uploaded file with id '{ref}' (expired or never uploaded)"
        )
    return _check_and_store(data, blobs, limits, upload.key)


def copy_images(names: list[str], blobs: BlobStore, limits: DecodeLimits) -> list[StoredImage]:
    """A checked copy of each stored image, in order (an upscale's draft and its references:
    the final keeps its inputs whatever becomes of the draft). BlobNotFound when one is gone;
    the copies already made are deleted then. Blocking."""
    copies: list[StoredImage] = []
    try:
        for name in names:
            try:
                data = blobs.get(name)
            except BlobStoreError as exc:
                if isinstance(exc, BlobNotFound):
                    raise
                raise StorageError(
                    f"the image could not be read from storage ({exc.reason}); retry later"
                ) from exc
            copies.append(_check_and_store(data, blobs, limits, None))
    except BaseException:
        blobs.delete([image.name for image in copies])
        raise
    return copies


def _own_file(blobs: BlobStore, key: str, ref: str) -> bytes:
    try:
        return blobs.get(key)
    except BlobNotFound:
        raise ImageFileNotFound(
            "image_file_not_found", f"{ref} is no longer stored (expired or deleted)"
        ) from None
    except BlobStoreError as exc:
        raise StorageError(f"the image could not be read from storage ({exc.reason}); retry later") from exc


def _is_url(reference: str) -> bool:
    return reference[:8].lower().startswith(("http://", "https://"))


UNTIL_USED = ("width", "height", "upscale_from", "scale", "upscale_strength", "loras", "preview")


def recorded_input(inputs: PredictionInput, stored: list[StoredImage]) -> dict[str, object]:
    """The input as the prediction keeps and echoes it: each reference that is not a URL
    by its stored file's id (not a 30 MB data: URI echoed on every poll)."""
    recorded = inputs.model_dump(mode="json")
    # The fields of drafts to finals are kept only where used: a prediction without them
    # is recorded, and echoed, exactly as before they existed (the hosted contract).
    for name in UNTIL_USED:
        if (
            recorded[name] is None
            or (name == "upscale_strength" and inputs.upscale_from is None)
            or (name == "preview" and not inputs.preview)
        ):
            del recorded[name]
    if not stored:  # a prompt alone
        return recorded
    if inputs.redux_images is None:
        if not _is_url(recorded["redux_image"]):
            recorded["redux_image"] = stored[0].file_id
        return recorded
    for item, image in zip(recorded["redux_images"], stored, strict=True):
        if not _is_url(item["image"]):
            item["image"] = image.file_id
    return recorded


def shown_references(
    recorded: dict[str, Any], files: list[str], link: Callable[[str], str]
) -> dict[str, Any]:
    """``recorded`` with each reference that is not a URL shown as a link to its file."""
    shown = dict(recorded)
    if shown.get("redux_images"):
        shown["redux_images"] = [
            {**item, "image": item["image"] if _is_url(str(item["image"])) else link(name)}
            for item, name in zip(shown["redux_images"], files, strict=False)
        ]
    elif files and not _is_url(str(shown.get("redux_image", ""))):
        shown["redux_image"] = link(files[0])
    return shown

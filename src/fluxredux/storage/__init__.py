"""Blob storage: uploaded reference images and generated outputs, stored by key.

``BlobStore`` is the contract; ``LocalBlobStore`` keeps blobs in a local directory,
``S3BlobStore`` (storage/s3.py) in an S3-compatible bucket. ``blob_store(settings)``
builds the store the ``storage`` setting describes, for the HTTP process and the worker
alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fluxredux.config import Settings
from fluxredux.storage.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    BlobStream,
    is_valid_id,
    is_valid_key,
    key_id,
    new_key,
)
from fluxredux.storage.local import LocalBlobStore

# S3's rules for bucket names (3-63 lower-case letters, digits, dots and hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SETTING = "the storage setting (FLUXREDUX_STORAGE)"


def blob_store(settings: Settings) -> BlobStore:
    """The store of the server's files (the one place that picks the backend).

    ``file:///dir``: a directory (a mount several machines share); ``s3://bucket/prefix``:
    an S3-compatible bucket, configured by the standard AWS variables; unset: the data
    dir's files folder. Anything else is a ValueError naming the setting."""
    if settings.storage is None:
        return LocalBlobStore(settings.files_dir)
    kind, where, prefix = parse_storage_url(settings.storage)
    if kind == "file":
        return LocalBlobStore(where)
    # Imported here: boto3 takes a while to import, and most servers never need it.
    from fluxredux.storage.s3 import S3BlobStore, client_config

    return S3BlobStore(
        where, prefix, config=client_config(settings.storage_timeout_seconds, settings.storage_attempts)
    )


def unshared_storage(settings: Settings) -> str | None:
    """A warning when files would stay on this machine though other machines need them:
    with Redis, API nodes and workers elsewhere serve and write them too."""
    if settings.redis_url is None or settings.storage is not None:
        return None
    return (
        f"no --storage given: files go to this machine's data dir ({settings.files_dir}), which "
        "API nodes and workers on other machines cannot see; use s3://bucket/prefix or "
        "file:///shared/mount"
    )


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """``("file", directory, "")`` or ``("s3", bucket, prefix)``; a ValueError that names
    the setting for anything else (a typo must stop the server, not store files elsewhere)."""
    shown = url[:200]
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise ValueError(f"{_SETTING} cannot have a query or fragment: {shown!r}")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{_SETTING} must be a local directory, file:///absolute/path (not a host): {shown!r}"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path.rstrip("/") == "":
            raise ValueError(f"{_SETTING} must name a directory, as file:///absolute/path: {shown!r}")
        return "file", str(Path(path)), ""
    if parts.scheme == "s3":
        if not _BUCKET.match(parts.netloc):
            raise ValueError(
                f"{_SETTING} must be s3://bucket/optional/prefix with a valid bucket name: {shown!r}"
            )
        prefix = unquote(parts.path).strip("/")
        if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
            raise ValueError(f"{_SETTING} has an empty, '.' or '..' segment in its prefix: {shown!r}")
        return "s3", parts.netloc, prefix
    raise ValueError(f"{_SETTING} must be file:///dir or s3://bucket/prefix, not {shown!r}")


__all__ = [
    "CHUNK_SIZE",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobStream",
    "LocalBlobStore",
    "blob_store",
    "is_valid_id",
    "is_valid_key",
    "key_id",
    "new_key",
    "parse_storage_url",
    "unshared_storage",
]

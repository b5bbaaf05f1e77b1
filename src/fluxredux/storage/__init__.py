"""Blob storage: uploaded reference images and generated outputs, stored by key.

``BlobStore`` is the contract; ``LocalBlobStore`` keeps blobs in a local directory.
``blob_store(settings)`` builds the store the settings describe, for the HTTP process
and the worker alike.
"""

from __future__ import annotations

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


def blob_store(settings: Settings) -> BlobStore:
    """The store of the server's files (the one place that picks the backend)."""
    return LocalBlobStore(settings.files_dir)


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
]

"""The BlobStore contract: input and output images stored by key, wherever they live.

A local directory today; an S3-compatible bucket, or a mount shared by several machines,
tomorrow. Nothing outside this package knows where a blob's bytes are: callers have a
key, bytes, a content type and a stream of chunks, never a local path.

Keys are flat names, ``<22 url-safe characters>.<extension>``: 128 random bits, because
a file's name is its capability (``/files/{name}`` is served without an API key, so a
result can be shared by its link and nobody can guess another). Keys are validated before
any backend sees them: no separator, no "..", nothing that can escape a root or prefix.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from fluxredux.errors import NotFound, StorageError
from fluxredux.images.formats import CONTENT_TYPES_BY_EXTENSION, content_type_for

_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")
_KEY = re.compile(
    r"^[A-Za-z0-9_-]{22}\.(" + "|".join(sorted(map(re.escape, CONTENT_TYPES_BY_EXTENSION))) + r")$"
)

# How much of a blob a stream hands out at a time: big enough that a multi-MB image is a
# few dozen reads (each a thread hop when served), small enough to keep memory flat.
CHUNK_SIZE = 256 * 1024


def new_key(extension: str) -> str:
    """A fresh random key for a blob of this extension (one of the formats table's)."""
    key = f"{secrets.token_urlsafe(16)}.{extension}"
    if not _KEY.match(key):
        raise ValueError(f"no stored format has the extension {extension!r}")
    return key


def is_valid_key(key: str) -> bool:
    return bool(_KEY.match(key))


def is_valid_id(blob_id: str) -> bool:
    """The random part of a key alone (how uploads are referred to)."""
    return bool(_ID.match(blob_id))


def key_id(key: str) -> str:
    return key.split(".", 1)[0]


def check_put(key: str, content_type: str) -> None:
    """Refuse a malformed key, or a content type its extension does not name: the type a
    blob is served with must not depend on which backend stored it."""
    if not _KEY.match(key):
        raise ValueError(f"malformed blob key {key[:40]!r}")
    if content_type != content_type_for(key):
        raise ValueError(
            f"a .{key.rsplit('.', 1)[1]} blob cannot have the content type {content_type[:40]!r}"
        )


class BlobNotFound(NotFound):
    """No blob of that key (expired, never stored, or a malformed key): a 404."""

    def __init__(self, key: str) -> None:
        super().__init__("no such file (expired, or never existed)")
        self.key = key


class BlobStoreError(StorageError):
    """The storage failed (disk full, read-only, unreachable): a 503 in a request, the
    job's ``storage_error`` in a worker. ``reason`` is the underlying cause, for messages.

    ``transient``: an outage that may pass by itself within seconds (unreachable, timed
    out, throttled, a 5xx): worth retrying while the caller can wait, as a worker holding
    images it made can. Not a full or read-only disk, denied access or a missing bucket:
    those need someone to act, and retrying them only delays the answer.

    ``for_operator``: the same failure for the server's log, where it may name what
    ``message`` must not (``message`` reaches anonymous callers in a 503's body and
    /ready's reasons): the bucket, the endpoint, and what to do about it."""

    def __init__(
        self, message: str, reason: str, *, transient: bool = False, for_operator: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient
        self.for_operator = for_operator or message


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int  # bytes
    content_type: str
    created_at: float  # unix seconds, as the backend stored it


class BlobStream:
    """An open blob: what it is, then its bytes in chunks of at most ``CHUNK_SIZE``.

    Close it (or use ``with``) to release the file or connection behind it, whether or
    not it was read to the end. Iterating may raise BlobStoreError."""

    def __init__(self, info: BlobInfo, chunks: Iterator[bytes], close: Callable[[], None]) -> None:
        self.info = info
        self._chunks = chunks
        self._close = close
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BlobStore(Protocol):
    """Blobs by key. Operational failures raise BlobStoreError; an absent blob (or a
    malformed key, which can name none) is BlobNotFound on reads, False for ``exists``
    and skipped by ``delete``. One contract suite (tests/test_blobstore.py) runs against
    every implementation."""

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        """Store ``data`` under ``key`` all or nothing (readers never see half a blob).
        ``content_type`` must be the one the key's extension names; a malformed key or a
        mismatched type is a ValueError (a programming error, not a user's)."""

    def get(self, key: str) -> bytes:
        """The whole blob, for what is read into memory anyway (a reference image)."""

    def open(self, key: str) -> BlobStream:
        """The blob as a stream of chunks, for serving without reading it all into memory."""

    def exists(self, key: str) -> bool: ...

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these blobs; absent and malformed keys are skipped (idempotent)."""

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """The blobs whose key starts with ``prefix``, in key order."""

    def check_writable(self) -> None:
        """Raise BlobStoreError unless a tiny write succeeds now (the readiness probe)."""

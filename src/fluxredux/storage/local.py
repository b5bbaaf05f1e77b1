"""BlobStore on a local directory (or a mount several machines share).

One file per blob, named by its key, written to a temp file and renamed into place so a
reader never sees half a blob. The content type is the one the key's extension names
(checked on put), so nothing is stored beside the file; its created time is the file's
modification time (files are never rewritten).

Only regular files directly inside the root are blobs: a link in the directory (made by
mistake, by another program, or by whoever can write there) is never followed, so it
cannot serve a file from elsewhere. Every OSError surfaces as BlobStoreError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fluxredux.images.formats import content_type_for
from fluxredux.storage.blobs import (
    CHUNK_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobStoreError,
    BlobStream,
    check_put,
    is_valid_key,
)

_TEMP_PREFIXES = (".incoming-", ".ready-")
# A temp file this old belongs to a write that died with its process (a live write takes
# milliseconds); both processes sharing the directory clear such files when they start.
_STALE_TEMP_SECONDS = 3600.0


# Errors of a network mount (NFS, SMB) that is briefly unreachable or failing over: they
# may pass by themselves. A full disk (ENOSPC, EDQUOT), a read-only one or denied access
# do not: someone has to act.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)


def _error(failed: str, exc: OSError) -> BlobStoreError:
    reason = exc.strerror or str(exc)
    return BlobStoreError(
        f"the file storage {failed} ({reason})", reason, transient=exc.errno in _TRANSIENT_ERRNOS
    )


@contextmanager
def _os_errors(failed: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _error(failed, exc) from exc


class LocalBlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        check_put(key, content_type)
        with _os_errors("cannot be written"):
            fd, temp = tempfile.mkstemp(dir=self.root, prefix=_TEMP_PREFIXES[0])
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temp, self.root / key)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            created_at = os.stat(self.root / key).st_mtime
        return BlobInfo(key, len(data), content_type, created_at)

    def get(self, key: str) -> bytes:
        handle, _info = self._open(key)
        with handle, _os_errors("cannot be read"):
            return handle.read()

    def open(self, key: str) -> BlobStream:
        handle, info = self._open(key)

        def chunks() -> Iterator[bytes]:
            with _os_errors("cannot be read"):
                while chunk := handle.read(CHUNK_SIZE):
                    yield chunk

        return BlobStream(info, chunks(), handle.close)

    def exists(self, key: str) -> bool:
        return self._regular_file(key) is not None

    def delete(self, keys: Iterable[str]) -> None:
        with _os_errors("cannot delete files"):
            for key in keys:
                if self._regular_file(key) is not None:  # a link or directory is not ours to remove
                    (self.root / key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        found = []
        with _os_errors("cannot be listed"):
            for name in sorted(os.listdir(self.root)):
                if name.startswith(prefix) and (status := self._regular_file(name)) is not None:
                    found.append(BlobInfo(name, status.st_size, str(content_type_for(name)), status.st_mtime))
        return iter(found)

    def check_writable(self) -> None:
        # A few bytes really written and flushed: a read-only or full disk fails here.
        with (
            _os_errors("cannot be written"),
            tempfile.NamedTemporaryFile(dir=self.root, prefix=_TEMP_PREFIXES[1]) as probe,
        ):
            probe.write(b"ready")
            probe.flush()

    def _regular_file(self, key: str) -> os.stat_result | None:
        """The blob file's status (links not followed), or None when it is not a blob."""
        if not is_valid_key(key):
            return None
        try:
            status = os.lstat(self.root / key)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("cannot be read", exc) from exc
        return status if stat.S_ISREG(status.st_mode) else None

    def _open(self, key: str) -> tuple[BinaryIO, BlobInfo]:
        """Open a blob for reading: a regular file in the root, never through a link.

        O_NOFOLLOW makes opening a link fail instead of following it, and the type is
        checked on the open file itself, so nothing can be swapped in between a check
        and the open. O_NONBLOCK keeps a FIFO planted in the directory from blocking
        the open (it is then refused as not a regular file)."""
        if not is_valid_key(key):
            raise BlobNotFound(key)
        try:
            fd = os.open(self.root / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):  # none, or a link (not followed)
                raise BlobNotFound(key) from None
            raise _error("cannot be read", exc) from exc
        try:
            with _os_errors("cannot be read"):
                status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise BlobNotFound(key)
        except BaseException:
            os.close(fd)
            raise
        handle = os.fdopen(fd, "rb", buffering=0)
        return handle, BlobInfo(key, status.st_size, str(content_type_for(key)), status.st_mtime)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes that died with their process; never a blob (blobs are
        kept or deleted by their records, not by their age)."""
        cutoff = time.time() - _STALE_TEMP_SECONDS
        with contextlib.suppress(OSError):  # housekeeping only: a read-only disk is reported elsewhere
            for entry in os.scandir(self.root):
                if (
                    entry.name.startswith(_TEMP_PREFIXES)
                    and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff
                ):
                    os.unlink(entry.path)

"""Input and output files on local disk, named by 128-bit random ids.

A file's name is its capability: outputs are served without a key at /files/{name},
so a result can be shared by its link and nobody can guess another.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_-]{22}\.(webp|jpg|jpeg|png|gif)$")
_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        """Write atomically (temp file + rename); returns the new file's name."""
        name = f"{secrets.token_urlsafe(16)}.{extension}"
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, self.root / name)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return name

    def path(self, name: str) -> Path | None:
        """The file's path, or None for a malformed or unknown name (no traversal).

        The name regex keeps the path inside the root, but a link in the files directory
        (made by mistake, by another program, or by whoever can write there) would still
        lead out of it: only a regular file that is inside the root once resolved counts.
        """
        if not _NAME.match(name):
            return None
        path = self.root / name
        try:
            resolved = path.resolve(strict=True)
            regular = stat.S_ISREG(resolved.stat().st_mode)
        except (OSError, RuntimeError):  # missing, a dangling link, a link loop
            return None
        return resolved if regular and resolved.parent == self.root.resolve() else None

    def find(self, file_id: str) -> str | None:
        """The name of the file with this id (uploads are referred to by id alone)."""
        if not _ID.match(file_id):
            return None
        for candidate in self.root.glob(f"{file_id}.*"):
            if _NAME.match(candidate.name):
                return candidate.name
        return None

    def read(self, name: str) -> bytes:
        path = self.path(name)
        if path is None:
            raise FileNotFoundError(name)
        return path.read_bytes()

    def delete(self, names: list[str]) -> None:
        for name in names:
            path = self.path(name)
            if path is not None:
                path.unlink(missing_ok=True)

    def delete_older_than(self, cutoff: float) -> int:
        """Remove files (and stale temp files) last written before ``cutoff``."""
        removed = 0
        for path in self.root.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

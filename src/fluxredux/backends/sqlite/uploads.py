"""Upload records in the SQLite file (one machine)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from fluxredux.access.uploads import Upload, already_recorded, upload_id_of
from fluxredux.backends.sqlite.database import Database
from fluxredux.config import DEFAULT_BUSY_TIMEOUT

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uploads_by_last_use ON uploads (last_used_at);
"""

_FIELDS = "id, key, owner, created_at, last_used_at"
_BATCH = 500  # bound parameters per statement, well under SQLite's limit


def _upload(row: tuple[str, str, str, float, float]) -> Upload:
    return Upload(*row)


class SQLiteUploadStore:
    """Uploads in the ``uploads`` table of the server's SQLite file."""

    def __init__(self, path: Path | str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self._db = Database(path, _SCHEMA, busy_timeout=busy_timeout)

    def add(self, key: str, owner: str, now: float | None = None) -> Upload:
        now = time.time() if now is None else now
        upload = Upload(upload_id_of(key), key, owner, now, now)
        try:
            self._db.write(
                f"INSERT INTO uploads ({_FIELDS}) VALUES (?, ?, ?, ?, ?)",
                (upload.id, upload.key, upload.owner, upload.created_at, upload.last_used_at),
            )
        except sqlite3.IntegrityError as exc:
            raise already_recorded(key) from exc
        return upload

    def get(self, upload_id: str) -> Upload | None:
        rows = self._db.rows(f"SELECT {_FIELDS} FROM uploads WHERE id = ? AND expired = 0", (upload_id,))
        return _upload(rows[0]) if rows else None

    def use(self, upload_id: str, now: float | None = None) -> Upload | None:
        now = time.time() if now is None else now
        with self._db.transaction() as db:
            db.execute(
                "UPDATE uploads SET last_used_at = max(last_used_at, ?) WHERE id = ? AND expired = 0",
                (now, upload_id),
            )
            row = db.execute(
                f"SELECT {_FIELDS} FROM uploads WHERE id = ? AND expired = 0", (upload_id,)
            ).fetchone()
        return _upload(row) if row else None

    def uploaded(self, keys: Iterable[str]) -> set[str]:
        wanted = list(keys)
        found: set[str] = set()
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            marks = ", ".join("?" * len(batch))
            found.update(
                row[0] for row in self._db.rows(f"SELECT key FROM uploads WHERE key IN ({marks})", batch)
            )
        return found

    def expire(self, unused_since: float, limit: int = 10_000) -> list[Upload]:
        with self._db.transaction() as db:
            db.execute(
                "UPDATE uploads SET expired = 1 WHERE last_used_at < ? AND expired = 0", (unused_since,)
            )
            rows = db.execute(
                f"SELECT {_FIELDS} FROM uploads WHERE expired = 1 ORDER BY last_used_at LIMIT ?", (limit,)
            ).fetchall()
        return [_upload(row) for row in rows]

    def withdraw(self, upload_id: str) -> Upload | None:
        with self._db.transaction() as db:
            row = db.execute(
                f"SELECT {_FIELDS} FROM uploads WHERE id = ? AND expired = 0", (upload_id,)
            ).fetchone()
            if row is not None:
                db.execute("UPDATE uploads SET expired = 1 WHERE id = ?", (upload_id,))
        return _upload(row) if row else None

    def forget(self, upload_ids: Iterable[str]) -> int:
        ids = [(upload_id,) for upload_id in upload_ids]
        with self._db.transaction() as db:
            before = db.total_changes
            db.executemany("DELETE FROM uploads WHERE id = ? AND expired = 1", ids)
            return db.total_changes - before

    def close(self) -> None:
        self._db.close()

"""API keys in the SQLite file (one machine): only the SHA-256 of each secret is stored."""

from __future__ import annotations

import time
from pathlib import Path

from fluxredux.access.keys import ApiKey, check_key, new_key
from fluxredux.backends.sqlite.database import Database
from fluxredux.config import DEFAULT_BUSY_TIMEOUT

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class SQLiteKeyStore:
    """Keys in the ``api_keys`` table of the server's SQLite file."""

    def __init__(self, path: Path | str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self._db = Database(path, _SCHEMA, busy_timeout=busy_timeout)

    def create(self, name: str) -> tuple[ApiKey, str]:
        made = new_key()
        now = time.time()
        self._db.write(
            "INSERT INTO api_keys (id, name, secret_sha256, created_at) VALUES (?, ?, ?, ?)",
            (made.id, name, made.digest, now),
        )
        return ApiKey(made.id, name, now, None), made.key

    def list(self) -> list[ApiKey]:
        rows = self._db.rows("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        changed = self._db.write(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return changed == 1

    def verify(self, presented: str | None) -> ApiKey:
        return check_key(presented, self._lookup)

    def _lookup(self, key_id: str) -> tuple[ApiKey, str] | None:
        rows = self._db.rows(
            "SELECT id, name, created_at, revoked_at, secret_sha256 FROM api_keys WHERE id = ?", (key_id,)
        )
        return (ApiKey(*rows[0][:4]), rows[0][4]) if rows else None

    def close(self) -> None:
        self._db.close()

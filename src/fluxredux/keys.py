"""API keys: created once, shown once, stored only as hashes, checked in constant time.

A key looks like ``fr_<key id>_<secret>``. The id finds the row; the SHA-256 of the
secret is compared with ``hmac.compare_digest``. Keys are 256-bit random strings, so a
fast hash is enough (slow password hashes are for guessable secrets).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fluxredux.database import DEFAULT_BUSY_TIMEOUT, Database
from fluxredux.errors import Unauthorized

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path | str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self._db = Database(path, _SCHEMA, busy_timeout=busy_timeout)

    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key; the full key string is returned here and never again."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        self._db.write(
            "INSERT INTO api_keys (id, name, secret_sha256, created_at) VALUES (?, ?, ?, ?)",
            (key_id, name, _digest(secret), now),
        )
        return ApiKey(key_id, name, now, None), f"fr_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        rows = self._db.rows("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        changed = self._db.write(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return changed == 1

    def verify(self, presented: str | None) -> ApiKey:
        """The key's record, or Unauthorized (one message for every failure)."""
        if presented and presented.startswith("fr_") and presented.count("_") >= 2:
            key_id, secret = presented[3:].split("_", 1)
            rows = self._db.rows(
                "SELECT id, name, created_at, revoked_at, secret_sha256 FROM api_keys WHERE id = ?", (key_id,)
            )
            row = rows[0] if rows else None
            expected = row[4] if row else _digest("no such key")  # same work either way
            if hmac.compare_digest(_digest(secret), expected) and row and row[3] is None:
                return ApiKey(*row[:4])
        raise Unauthorized("missing or invalid API key: send it as X-API-Key (or Authorization: Bearer)")

    def close(self) -> None:
        self._db.close()

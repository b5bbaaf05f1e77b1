"""Share links: explicit, revocable, read-only views of one prediction.

A prediction id travels in logs, webhooks and client code, so it is no secret. A share
is created on purpose by the prediction's owner and found by its own random token
(192 bits), never by the prediction id; deleting the row revokes it.

``ShareStore`` is a small protocol (create, get, list_for_prediction, revoke,
delete_for_predictions): the SQLite table here (one machine), Redis in
``fluxredux.redis_shares`` (many API nodes), one contract suite (tests/test_shares.py).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fluxredux.database import DEFAULT_BUSY_TIMEOUT, Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    token TEXT PRIMARY KEY,
    prediction_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    include_reference INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS shares_by_prediction ON shares (prediction_id, created_at);
"""

_FIELDS = "token, prediction_id, owner, include_reference, created_at"


@dataclass(frozen=True)
class Share:
    token: str
    prediction_id: str
    owner: str  # the API key id that created it: only that key may list or revoke it
    include_reference: bool
    created_at: float


def new_token() -> str:
    # Longer than a prediction id (22 characters), so the two are never confused in a link.
    return secrets.token_urlsafe(24)


def _share(row: tuple[str, str, str, int, float]) -> Share:
    token, prediction_id, owner, include_reference, created_at = row
    return Share(token, prediction_id, owner, bool(include_reference), created_at)


class ShareStore(Protocol):
    def create(self, prediction_id: str, owner: str, *, include_reference: bool = False) -> Share:
        """A new share; the caller has checked that ``owner`` owns the prediction."""

    def get(self, token: str) -> Share | None:
        """The share this token opens; None when there is none (never made, or revoked)."""

    def list_for_prediction(self, prediction_id: str) -> list[Share]:
        """The prediction's active shares, oldest first."""

    def revoke(self, token: str, owner: str) -> bool:
        """Delete the share if ``owner`` made it; False when there is none of theirs."""

    def delete_for_predictions(self, prediction_ids: Iterable[str]) -> int:
        """Forget every share of these predictions (they are being deleted); how many went."""

    def close(self) -> None: ...


class SQLiteShareStore:
    """Shares in the ``shares`` table of the server's SQLite file."""

    def __init__(self, path: Path | str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self._db = Database(path, _SCHEMA, busy_timeout=busy_timeout)

    def create(self, prediction_id: str, owner: str, *, include_reference: bool = False) -> Share:
        share = Share(new_token(), prediction_id, owner, include_reference, time.time())
        self._db.write(
            f"INSERT INTO shares ({_FIELDS}) VALUES (?, ?, ?, ?, ?)",
            (share.token, prediction_id, owner, int(include_reference), share.created_at),
        )
        return share

    def get(self, token: str) -> Share | None:
        rows = self._db.rows(f"SELECT {_FIELDS} FROM shares WHERE token = ?", (token,))
        return _share(rows[0]) if rows else None

    def list_for_prediction(self, prediction_id: str) -> list[Share]:
        rows = self._db.rows(
            f"SELECT {_FIELDS} FROM shares WHERE prediction_id = ? ORDER BY created_at", (prediction_id,)
        )
        return [_share(row) for row in rows]

    def revoke(self, token: str, owner: str) -> bool:
        return self._db.write("DELETE FROM shares WHERE token = ? AND owner = ?", (token, owner)) == 1

    def delete_for_predictions(self, prediction_ids: Iterable[str]) -> int:
        ids = [(prediction_id,) for prediction_id in prediction_ids]
        # One transaction: retention may delete thousands at once, one commit for all.
        with self._db.transaction() as db:
            before = db.total_changes
            db.executemany("DELETE FROM shares WHERE prediction_id = ?", ids)
            return db.total_changes - before

    def close(self) -> None:
        self._db.close()

"""Share links in the SQLite file (one machine)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from fluxredux.access.shares import MAX_SHARES_PER_PREDICTION, Share, new_token
from fluxredux.backends.sqlite.database import Database
from fluxredux.config import DEFAULT_BUSY_TIMEOUT
from fluxredux.errors import TooManyShares

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


def _share(row: tuple[str, str, str, int, float]) -> Share:
    token, prediction_id, owner, include_reference, created_at = row
    return Share(token, prediction_id, owner, bool(include_reference), created_at)


class SQLiteShareStore:
    """Shares in the ``shares`` table of the server's SQLite file."""

    def __init__(self, path: Path | str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self._db = Database(path, _SCHEMA, busy_timeout=busy_timeout)

    def create(
        self,
        prediction_id: str,
        owner: str,
        *,
        include_reference: bool = False,
        limit: int = MAX_SHARES_PER_PREDICTION,
    ) -> Share:
        share = Share(new_token(), prediction_id, owner, include_reference, time.time())
        # Count and insert in one write transaction (BEGIN IMMEDIATE): two creates, of
        # this process or another, cannot both see a free slot.
        with self._db.transaction() as db:
            (live,) = db.execute(
                "SELECT COUNT(*) FROM shares WHERE prediction_id = ?", (prediction_id,)
            ).fetchone()
            if live >= limit:
                raise TooManyShares(limit)
            db.execute(
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

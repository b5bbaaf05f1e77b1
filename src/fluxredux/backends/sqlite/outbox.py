"""The webhook outbox in the SQLite file (one machine): one record per delivery, claims
leased and fenced by token, as the protocol in ``jobs/outbox.py`` describes."""

from __future__ import annotations

from typing import Any

from fluxredux.backends.sqlite.database import ClockedTables
from fluxredux.jobs.outbox import Delivery, claim_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    prediction_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at REAL NOT NULL,
    claim_owner TEXT,
    claim_expires_at REAL,
    claim_token INTEGER NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished ON webhook_deliveries (finished_at);
"""
_FIELDS = (
    "prediction_id, url, created_at, state, attempts, next_at, "
    "claim_owner, claim_expires_at, claim_token, finished_at"
)
_SELECT = f"SELECT {_FIELDS} FROM webhook_deliveries"
# The fence: still pending, still this claim.
_HELD = "prediction_id = ? AND state = 'pending' AND claim_owner = ? AND claim_token = ?"


def _delivery(row: Any) -> Delivery:
    return Delivery(*row)


class SQLiteWebhookOutbox(ClockedTables):
    """The records in the job database's file: every process of one machine shares them,
    and each change is one write transaction (BEGIN IMMEDIATE), so claims serialise on
    SQLite's write lock across processes."""

    SCHEMA = _SCHEMA

    def enqueue(self, prediction_id: str, url: str) -> Delivery:
        now = self.now()
        with self._db.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries "
                f"({_FIELDS}) VALUES (?, ?, ?, 'pending', 0, ?, NULL, NULL, 0, NULL)",
                (prediction_id, url, now, now),
            )
            row = db.execute(f"{_SELECT} WHERE prediction_id = ?", (prediction_id,)).fetchone()
        return _delivery(row)

    def get(self, prediction_id: str) -> Delivery | None:
        rows = self._db.rows(f"{_SELECT} WHERE prediction_id = ?", (prediction_id,))
        return _delivery(rows[0]) if rows else None

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Delivery]:
        now = self.now()
        # Quick read first: most sweeps find nothing, and need not take the write lock.
        if limit <= 0 or not self._db.rows(
            "SELECT 1 FROM webhook_deliveries WHERE state = 'pending' AND next_at <= ? LIMIT 1", (now,)
        ):
            return []
        with self._db.transaction() as db:
            due = [
                _delivery(row)
                for row in db.execute(
                    f"{_SELECT} WHERE state = 'pending' AND next_at <= ? "
                    "ORDER BY next_at, prediction_id LIMIT ?",
                    (now, limit),
                ).fetchall()
            ]
            claimed = [claim_of(d, owner, now, lease_seconds) for d in due]
            db.executemany(
                "UPDATE webhook_deliveries SET attempts = ?, next_at = ?, claim_owner = ?, "
                "claim_expires_at = ?, claim_token = ? WHERE prediction_id = ?",
                [
                    (d.attempts, d.next_at, d.claim_owner, d.claim_expires_at, d.claim_token, d.prediction_id)
                    for d in claimed
                ],
            )
        return claimed

    def _fenced(self, claimed: Delivery, assignments: str, params: tuple[Any, ...]) -> Delivery | None:
        with self._db.transaction() as db:
            changed = db.execute(
                f"UPDATE webhook_deliveries SET {assignments}, claim_owner = NULL, claim_expires_at = NULL "
                f"WHERE {_HELD}",
                (*params, claimed.prediction_id, claimed.claim_owner, claimed.claim_token),
            ).rowcount
            if changed != 1:
                return None
            row = db.execute(f"{_SELECT} WHERE prediction_id = ?", (claimed.prediction_id,)).fetchone()
        return _delivery(row)

    def retry(self, claimed: Delivery, delay: float) -> Delivery | None:
        return self._fenced(claimed, "next_at = ?", (self.now() + delay,))

    def succeeded(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, "state = 'delivered', finished_at = ?", (self.now(),))

    def failed(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, "state = 'failed', finished_at = ?", (self.now(),))

    def next_due(self) -> float | None:
        rows = self._db.rows("SELECT MIN(next_at) FROM webhook_deliveries WHERE state = 'pending'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def forget(self, finished_before: float) -> int:
        return self._db.write(
            "DELETE FROM webhook_deliveries WHERE finished_at IS NOT NULL AND finished_at < ?",
            (finished_before,),
        )

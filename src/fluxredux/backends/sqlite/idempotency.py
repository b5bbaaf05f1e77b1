"""Idempotency keys in the SQLite file (one machine): claim, complete and release are each
one transaction, so two creates with the same key never both make a prediction."""

from __future__ import annotations

from typing import Any

from fluxredux.access.idempotency import (
    CLAIM_SECONDS,
    IDEMPOTENCY_TTL_SECONDS,
    Claim,
    IdempotencyRecord,
    abandoned,
    inherited,
    is_live,
    new_token,
)
from fluxredux.backends.sqlite.database import ClockedTables

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    token TEXT NOT NULL,
    prediction_id TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    claim_expires_at REAL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at);
"""
_FIELDS = "scope, key, fingerprint, token, prediction_id, created_at, expires_at, claim_expires_at"


def _record(row: Any) -> IdempotencyRecord:
    return IdempotencyRecord(*row)


class SQLiteIdempotencyStore(ClockedTables):
    """The records in the server's SQLite file; each claim is one write transaction
    (BEGIN IMMEDIATE), so claims serialise across the processes of the machine."""

    SCHEMA = _SCHEMA

    def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        prediction_id: str,
        *,
        ttl: float = IDEMPOTENCY_TTL_SECONDS,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> Claim:
        now = self.now()
        with self._db.transaction() as db:
            # Expired records go here, a few at a time with every claim: no sweeper needed.
            db.execute(
                "DELETE FROM idempotency_keys WHERE rowid IN "
                "(SELECT rowid FROM idempotency_keys WHERE expires_at <= ? LIMIT 100)",
                (now,),
            )
            row = db.execute(
                f"SELECT {_FIELDS} FROM idempotency_keys WHERE scope = ? AND key = ?", (scope, key)
            ).fetchone()
            found = _record(row) if row is not None else None
            if found is not None and is_live(found, now):
                return Claim(won=False, record=found)
            replaced = abandoned(found, now)
            claimed = IdempotencyRecord(
                scope,
                key,
                fingerprint,
                new_token(),
                inherited(replaced, fingerprint) or prediction_id,
                now,
                now + ttl,
                now + claim_seconds,
            )
            db.execute(
                f"INSERT OR REPLACE INTO idempotency_keys ({_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claimed.scope,
                    claimed.key,
                    claimed.fingerprint,
                    claimed.token,
                    claimed.prediction_id,
                    claimed.created_at,
                    claimed.expires_at,
                    claimed.claim_expires_at,
                ),
            )
        return Claim(won=True, record=claimed, abandoned=replaced)

    def complete(self, claimed: IdempotencyRecord, adopt: IdempotencyRecord | None = None) -> bool:
        made, scope, key = adopt or claimed, claimed.scope, claimed.key
        # Held: this claim's token, not completed yet, or completed with this prediction.
        changed = self._db.write(
            "UPDATE idempotency_keys SET prediction_id = ?, fingerprint = ?, claim_expires_at = NULL "
            "WHERE scope = ? AND key = ? AND token = ? "
            "AND (claim_expires_at IS NOT NULL OR prediction_id = ?)",
            (made.prediction_id, made.fingerprint, scope, key, claimed.token, made.prediction_id),
        )
        return changed == 1

    def release(self, claimed: IdempotencyRecord) -> bool:
        # Ended, not deleted: the next claim learns of the prediction this one named.
        changed = self._db.write(
            "UPDATE idempotency_keys SET claim_expires_at = MIN(claim_expires_at, ?) "
            "WHERE scope = ? AND key = ? AND token = ? AND claim_expires_at IS NOT NULL",
            (self.now(), claimed.scope, claimed.key, claimed.token),
        )
        return changed == 1

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        rows = self._db.rows(
            f"SELECT {_FIELDS} FROM idempotency_keys WHERE scope = ? AND key = ?", (scope, key)
        )
        if not rows:
            return None
        record = _record(rows[0])
        return record if is_live(record, self.now()) else None

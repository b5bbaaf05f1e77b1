"""Idempotency keys: a create retried with the same ``Idempotency-Key`` gets the prediction
the first one made, so a client that lost the answer to a create never makes a duplicate.

A record per (scope, key), the scope being the caller's API key id (one caller's keys
never meet another's), holds the request's fingerprint (a digest of its route and body),
the prediction it made, and when it expires (24 h after the first use).

The first create *claims* the key before it creates anything, atomically, so concurrent
identical creates cannot both create: the others find the claim and wait for its
prediction id (``complete``). A claim has a short lease of its own: if the claimer dies
before completing, the key can be claimed again once the lease ends, rather than stay
stuck for 24 h. A create that fails (a 4xx, a full queue) ``release``s its claim, so the
retry is tried afresh. ``complete`` and ``release`` are fenced by the claim's random
token: a claimer whose lease ran out and was taken over changes nothing.

``IdempotencyStore`` is a small protocol: SQLite here (one machine), Redis in
``fluxredux.redis_idempotency`` (many API nodes), one contract suite
(tests/test_idempotency.py). Every time is the store's clock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from fluxredux.database import ClockedTables

# How long a key keeps answering with its prediction.
IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0
# How long a claim without a prediction yet holds the key: longer than any create takes
# (fetching a reference URL included), short enough that a dead claimer is soon forgotten.
CLAIM_SECONDS = 60.0


@dataclass(frozen=True)
class IdempotencyRecord:
    scope: str
    key: str
    fingerprint: str
    token: str  # the claim's: fences complete and release
    prediction_id: str | None  # None while the claimer creates it
    created_at: float
    expires_at: float
    claim_expires_at: float | None  # while no prediction id: when the claim runs out


@dataclass(frozen=True)
class Claim:
    won: bool  # True: this caller holds the key now and must create, then complete or release
    record: IdempotencyRecord  # the caller's claim, or the live record it found


def new_token() -> str:
    return secrets.token_hex(16)


class IdempotencyStore(Protocol):
    def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        ttl: float = IDEMPOTENCY_TTL_SECONDS,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> Claim:
        """One atomic step: when (scope, key) has no live record (none, expired, or a claim
        that ran out without a prediction), store a new claim for ``fingerprint`` and win;
        otherwise lose, with the live record (whatever its fingerprint)."""

    def complete(self, claimed: IdempotencyRecord, prediction_id: str) -> bool:
        """Record the prediction the claim made; False (no change) when the claim is not
        held any more."""

    def release(self, claimed: IdempotencyRecord) -> bool:
        """Drop a claim that made no prediction (the create failed); False when not held."""

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The live record (not expired), if any."""

    def now(self) -> float: ...

    def close(self) -> None: ...


def is_live(record: IdempotencyRecord, now: float) -> bool:
    """Expired records, and claims that ran out without a prediction, count as absent."""
    if record.expires_at <= now:
        return False
    return record.prediction_id is not None or (
        record.claim_expires_at is not None and record.claim_expires_at > now
    )


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
            if row is not None and is_live(found := _record(row), now):
                return Claim(won=False, record=found)
            claimed = IdempotencyRecord(
                scope, key, fingerprint, new_token(), None, now, now + ttl, now + claim_seconds
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
        return Claim(won=True, record=claimed)

    def complete(self, claimed: IdempotencyRecord, prediction_id: str) -> bool:
        changed = self._db.write(
            "UPDATE idempotency_keys SET prediction_id = ?, claim_expires_at = NULL "
            "WHERE scope = ? AND key = ? AND token = ? AND prediction_id IS NULL",
            (prediction_id, claimed.scope, claimed.key, claimed.token),
        )
        return changed == 1

    def release(self, claimed: IdempotencyRecord) -> bool:
        changed = self._db.write(
            "DELETE FROM idempotency_keys "
            "WHERE scope = ? AND key = ? AND token = ? AND prediction_id IS NULL",
            (claimed.scope, claimed.key, claimed.token),
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

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

``IdempotencyStore`` is a small protocol: SQLite in
``backends/sqlite/idempotency.py`` (one machine), Redis in ``backends/redis/idempotency.py``
(many API nodes), one contract suite (tests/test_idempotency.py). Every time is the store's clock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

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

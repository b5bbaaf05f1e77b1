"""Idempotency keys: a create retried with the same ``Idempotency-Key`` gets the prediction
the first one made, so a client that lost the answer to a create never makes a duplicate.

A record per (scope, key), the scope being the caller's API key id (one caller's keys
never meet another's), holds the request's fingerprint (a digest of its route and body),
the prediction it made, and when it expires (24 h after the first use).

The first create *claims* the key before it creates anything, atomically, so concurrent
identical creates cannot both create: the others find the claim and wait for its
prediction (``complete``). The claim names the id the prediction will have, so the answer
to a create that was lost on its way back (the store made the prediction, its reply never
came) cannot make a second one: whoever finds that claim later (waiting on it, or taking
over once it has run out) looks for its prediction first. A claim has a short lease of its
own: if the claimer dies before completing, the key can be claimed again once the lease
ends, rather than stay stuck for 24 h. A create that fails ``release``s its claim, so the
retry is tried afresh; the released claim stays behind, ended, until the next claim (its
prediction might exist after all: an insert whose answer was lost fails too).
``complete`` and ``release`` are fenced by the claim's random token: a claimer whose lease
ran out and was taken over changes nothing.

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
    # The prediction the claim makes (named as it is claimed) or made. None only in a claim
    # an older version stored, before ids were named at claim time.
    prediction_id: str | None
    created_at: float
    expires_at: float
    claim_expires_at: float | None  # None once completed; until then, when the claim runs out

    @property
    def completed(self) -> bool:
        """The prediction was made and recorded: the key answers with it for 24 h."""
        return self.claim_expires_at is None


@dataclass(frozen=True)
class Claim:
    won: bool  # True: this caller holds the key now and must create, then complete or release
    record: IdempotencyRecord  # the caller's claim, or the live record it found
    # When a won claim replaced one that ended without completing (ran out, or released
    # after a failure) within its 24 h: that claim. Its prediction may exist (a create
    # whose answer was lost); if it does, it is this key's prediction.
    abandoned: IdempotencyRecord | None = None


def new_token() -> str:
    return secrets.token_hex(16)


class IdempotencyStore(Protocol):
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
        """One atomic step: when (scope, key) has no live record (none, expired, or a claim
        that ended without completing), store a new claim for ``fingerprint`` that will make
        ``prediction_id`` (or the prediction an abandoned claim of the same fingerprint
        named: ``inherited``) and win; otherwise lose, with the live record (whatever its
        fingerprint). A claim resent after its answer was lost finds itself and wins."""

    def complete(self, claimed: IdempotencyRecord, adopt: IdempotencyRecord | None = None) -> bool:
        """Record the claim's prediction as made (with ``adopt``: the abandoned claim's
        prediction and fingerprint instead, when that prediction turned out to exist);
        False (no change) when the claim is not held any more. Repeating a completion that
        took effect is True."""

    def release(self, claimed: IdempotencyRecord) -> bool:
        """End a claim that made no prediction that is known of (the create failed): the
        key is free; the next claim gets this one as ``abandoned``. False when not held."""

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The live record (not expired), if any."""

    def now(self) -> float: ...

    def close(self) -> None: ...


def is_live(record: IdempotencyRecord, now: float) -> bool:
    """Expired records, and claims that ended without completing, count as absent."""
    if record.expires_at <= now:
        return False
    return record.claim_expires_at is None or record.claim_expires_at > now


def inherited(replaced: IdempotencyRecord | None, fingerprint: str) -> str | None:
    """The prediction id a new claim for ``fingerprint`` takes over from the abandoned claim
    it replaces: the same request's, so that however many claims fail in a row without
    knowing whether it was made, each names the same prediction (and a create can make
    it only once: the id is taken then)."""
    if replaced is None or replaced.fingerprint != fingerprint:
        return None
    return replaced.prediction_id


def abandoned(record: IdempotencyRecord | None, now: float) -> IdempotencyRecord | None:
    """``record``, found by a claim that replaces it, when it is a claim that ended without
    completing within its 24 h and named a prediction (that may exist)."""
    if record is None or record.expires_at <= now or record.completed or record.prediction_id is None:
        return None
    return record

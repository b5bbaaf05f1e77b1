"""Share links: explicit, revocable, read-only views of one prediction.

A prediction id travels in logs, webhooks and client code, so it is no secret. A share
is created on purpose by the prediction's owner and found by its own random token
(192 bits), never by the prediction id; deleting the row revokes it. A prediction has
at most ``MAX_SHARES_PER_PREDICTION`` live links, counted and created in one atomic step.

``ShareStore`` is a small protocol (create, get, list_for_prediction, revoke,
delete_for_predictions): SQLite in ``backends/sqlite/shares.py``
(one machine), Redis in ``backends/redis/shares.py`` (many API nodes), one contract suite
(tests/test_shares.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

# Live share links per prediction. Each is a capability that lives until it is revoked
# (or the prediction goes), so an unbounded number is unbounded exposure and storage
# for one prediction; a few links (one per audience) are all anyone needs.
MAX_SHARES_PER_PREDICTION = 10


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


class ShareStore(Protocol):
    def create(
        self,
        prediction_id: str,
        owner: str,
        *,
        include_reference: bool = False,
        limit: int = MAX_SHARES_PER_PREDICTION,
    ) -> Share:
        """A new share; the caller has checked that ``owner`` owns the prediction.
        TooManyShares when the prediction has ``limit`` live shares already: counted and
        inserted in one atomic step, so concurrent creates (of any API node) never pass it."""

    def get(self, token: str) -> Share | None:
        """The share this token opens; None when there is none (never made, or revoked)."""

    def list_for_prediction(self, prediction_id: str) -> list[Share]:
        """The prediction's active shares, oldest first."""

    def revoke(self, token: str, owner: str) -> bool:
        """Delete the share if ``owner`` made it; False when there is none of theirs."""

    def delete_for_predictions(self, prediction_ids: Iterable[str]) -> int:
        """Forget every share of these predictions (they are being deleted); how many went."""

    def close(self) -> None: ...

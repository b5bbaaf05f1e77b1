"""The webhook outbox: one stored delivery record per prediction, claimed with a lease.

Every API process runs a sweeper that claims the deliveries that are due and sends them
(``fluxredux.webhooks.sender``). The record holds what a restart or another process needs to go
on where the last one stopped: the target, how many tries were started, when the next one
is due, who holds the claim (until when, and with which fencing token), and the final
state. Sending needs the job too (its body and its secret are read from it at send time),
so no secret is copied here.

Rules every backend implements (one contract suite, ``tests/test_webhook_outbox.py``):

- ``enqueue`` is idempotent per prediction: enqueueing again returns the stored record,
  whatever its state, so any number of processes may enqueue the same prediction.
- ``claim_due`` is one atomic operation: a delivery is handed to one claimer at a time.
  A claim moves the record's ``next_at`` to the end of its lease, so a claim that is never
  recorded (its process died mid-send) makes the delivery due again once the lease ends,
  and the same "due by ``next_at``" query finds it; its try counts as made (it may have
  reached the receiver), which bounds the tries even when a process keeps dying.
- ``retry``, ``succeeded`` and ``failed`` are fenced by the claim: they apply only while
  the record is still pending and still holds the caller's claim (owner and token). A
  sweeper whose claim expired and was taken over cannot record over the new owner; one
  whose claim expired but was not taken over still records (its outcome is the latest).
- Every time is this outbox's clock (``now``), like the job store's leases, so processes
  on machines whose clocks disagree still agree on who holds a claim.

For Redis (many machines): a sorted set of pending prediction ids scored by ``next_at``
plus a hash per delivery; ``claim_due`` and the fenced updates are Lua scripts (the score
moves to the lease's end on claim, the member leaves the set when the delivery is final),
stamped with the server's ``TIME``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol

DeliveryState = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True)
class Delivery:
    prediction_id: str
    url: str
    created_at: float
    state: DeliveryState = "pending"
    attempts: int = 0  # tries started: one per claim
    # When sweepers should look at it next: its next try, or while claimed, its lease's end.
    next_at: float = 0.0
    claim_owner: str | None = None
    claim_expires_at: float | None = None
    claim_token: int = 0  # how many claims it has had: fences the updates of a stale claimer
    finished_at: float | None = None


class WebhookOutbox(Protocol):
    def enqueue(self, prediction_id: str, url: str) -> Delivery:
        """Add a pending delivery due now, unless this prediction has one (in any state);
        return the stored record."""

    def get(self, prediction_id: str) -> Delivery | None: ...

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Delivery]:
        """Atomically take up to ``limit`` pending deliveries due now (earliest first),
        each leased to ``owner`` for ``lease_seconds``: its next try, counted at once."""

    def retry(self, claimed: Delivery, delay: float) -> Delivery | None:
        """Release the claim; the next try is due ``delay`` seconds from now.
        None (and no change) when ``claimed``'s claim is no longer held."""

    def succeeded(self, claimed: Delivery) -> Delivery | None:
        """Final: delivered (fenced like ``retry``)."""

    def failed(self, claimed: Delivery) -> Delivery | None:
        """Final: given up (fenced like ``retry``)."""

    def next_due(self) -> float | None:
        """The earliest ``next_at`` of the pending deliveries; None when there are none."""

    def forget(self, finished_before: float) -> int:
        """Delete the final records finished before then; how many went."""

    def now(self) -> float:
        """This outbox's clock (unix seconds): claims are stamped and compared with it only."""

    def close(self) -> None: ...


def claim_of(delivery: Delivery, owner: str, now: float, lease_seconds: float) -> Delivery:
    """A claim: the next try of ``delivery``, held by ``owner`` until now + lease. The
    token fences off an earlier holder; ``next_at`` moves to the lease's end, so that a
    claimer that dies is found by the same "due" query once its lease runs out."""
    return replace(
        delivery,
        attempts=delivery.attempts + 1,
        next_at=now + lease_seconds,
        claim_owner=owner,
        claim_expires_at=now + lease_seconds,
        claim_token=delivery.claim_token + 1,
    )

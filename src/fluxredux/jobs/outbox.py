"""The webhook outbox: one stored delivery record per prediction, claimed with a lease.

Every API process runs a sweeper that claims the deliveries that are due and sends them
(``fluxredux.webhooks``). The record holds what a restart or another process needs to go
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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from fluxredux.database import ClockedTables

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


class MemoryWebhookOutbox:
    """The reference implementation, for tests: one lock makes every operation atomic."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._deliveries: dict[str, Delivery] = {}
        self._lock = threading.Lock()

    def enqueue(self, prediction_id: str, url: str) -> Delivery:
        now = self.now()
        with self._lock:
            return self._deliveries.setdefault(
                prediction_id, Delivery(prediction_id, url, created_at=now, next_at=now)
            )

    def get(self, prediction_id: str) -> Delivery | None:
        with self._lock:
            return self._deliveries.get(prediction_id)

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Delivery]:
        now = self.now()
        with self._lock:
            due = sorted(
                (d for d in self._deliveries.values() if d.state == "pending" and d.next_at <= now),
                key=lambda d: (d.next_at, d.prediction_id),
            )[: max(limit, 0)]
            claimed = [claim_of(d, owner, now, lease_seconds) for d in due]
            self._deliveries.update((d.prediction_id, d) for d in claimed)
            return claimed

    def _fenced(self, claimed: Delivery, **changes: Any) -> Delivery | None:
        with self._lock:
            current = self._deliveries.get(claimed.prediction_id)
            if (
                current is None
                or current.state != "pending"
                or current.claim_owner != claimed.claim_owner
                or current.claim_token != claimed.claim_token
            ):
                return None
            updated = replace(current, claim_owner=None, claim_expires_at=None, **changes)
            self._deliveries[claimed.prediction_id] = updated
            return updated

    def retry(self, claimed: Delivery, delay: float) -> Delivery | None:
        return self._fenced(claimed, next_at=self.now() + delay)

    def succeeded(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, state="delivered", finished_at=self.now())

    def failed(self, claimed: Delivery) -> Delivery | None:
        return self._fenced(claimed, state="failed", finished_at=self.now())

    def next_due(self) -> float | None:
        with self._lock:
            return min((d.next_at for d in self._deliveries.values() if d.state == "pending"), default=None)

    def forget(self, finished_before: float) -> int:
        with self._lock:
            gone = [
                key
                for key, d in self._deliveries.items()
                if d.finished_at is not None and d.finished_at < finished_before
            ]
            for key in gone:
                del self._deliveries[key]
            return len(gone)

    def now(self) -> float:
        return self._clock()

    def close(self) -> None:
        pass

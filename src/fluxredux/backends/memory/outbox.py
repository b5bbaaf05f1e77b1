"""Test double: a webhook outbox in memory (same contract as the real ones)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fluxredux.jobs.outbox import Delivery, claim_of


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

"""The worker registry in the SQLite file: the worker children of one ``serve``."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fluxredux.backends.sqlite.database import ClockedTables
from fluxredux.jobs.registry import WorkerInfo, WorkerState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    details TEXT NOT NULL
);
"""
_FIELDS = "id, host, pid, model, device, state, started_at, last_seen, details"


def _worker(row: tuple[Any, ...]) -> WorkerInfo:
    worker_id, host, pid, model, device, state, started_at, last_seen, details = row
    return WorkerInfo(worker_id, host, pid, model, device, state, started_at, last_seen, json.loads(details))


class SQLiteWorkerRegistry(ClockedTables):
    SCHEMA = _SCHEMA

    def register(self, worker: WorkerInfo) -> None:
        seen = replace(worker, last_seen=self.now())
        self._db.write(
            f"INSERT OR REPLACE INTO workers ({_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *(seen.id, seen.host, seen.pid, seen.model, seen.device, seen.state),
                *(seen.started_at, seen.last_seen, json.dumps(seen.details)),
            ),
        )

    def heartbeat(
        self, worker_id: str, *, state: WorkerState | None = None, model: str | None = None
    ) -> bool:
        changed = self._db.write(
            "UPDATE workers SET last_seen = ?, state = COALESCE(?, state), model = COALESCE(?, model) "
            "WHERE id = ?",
            (self.now(), state, model, worker_id),
        )
        return changed == 1

    def unregister(self, worker_id: str, *, seen_before: float | None = None) -> None:
        limit = float("inf") if seen_before is None else seen_before
        self._db.write("DELETE FROM workers WHERE id = ? AND last_seen <= ?", (worker_id, limit))

    def workers(self) -> list[WorkerInfo]:
        rows = self._db.rows(f"SELECT {_FIELDS} FROM workers ORDER BY started_at, id")
        return [_worker(row) for row in rows]

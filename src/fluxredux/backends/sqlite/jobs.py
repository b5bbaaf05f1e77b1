"""The embedded job store: one SQLite file in WAL mode, shared by the HTTP process and
its worker processes. Every change is a read-modify-write inside BEGIN IMMEDIATE, so
concurrent writers (another process included) serialise on SQLite's write lock. Any
operational failure (locked past the busy timeout, disk full, read-only, I/O error) is
raised as ``StoreUnavailable``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable
from typing import Any

from fluxredux.backends.sqlite.database import ClockedTables
from fluxredux.jobs.job import IN_FLIGHT, Job, Status, job_from_json, job_to_json
from fluxredux.jobs.store import Capacity, Change, same_create
from fluxredux.jobs.transitions import start_attempt

_COLUMNS = (
    "id",
    "owner",
    "status",
    "created_at",
    "completed_at",
    "lease_expires_at",
    "webhook_state",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    completed_at REAL,
    lease_expires_at REAL,
    webhook_state TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
-- A key's predictions in flight, counted on every create: from this index alone, however
-- many finished predictions the key has (through jobs_by_owner it read every one of them).
CREATE INDEX IF NOT EXISTS jobs_by_owner_status ON jobs (owner, status);
CREATE INDEX IF NOT EXISTS jobs_by_webhook_state ON jobs (webhook_state) WHERE webhook_state IS NOT NULL;
CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, at REAL);
"""


def _to_row(job: Job) -> tuple[Any, ...]:
    columns = {"status": job.status.value}
    return (*(columns.get(c, getattr(job, c)) for c in _COLUMNS), job_to_json(job))


_INSERT = f"INSERT INTO jobs ({','.join(_COLUMNS)}, data) VALUES ({','.join('?' * (len(_COLUMNS) + 1))})"
_IN_FLIGHT = tuple(s.value for s in IN_FLIGHT)


class SQLiteJobStore(ClockedTables):
    SCHEMA = _SCHEMA

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Job]:
        return [job_from_json(row[0]) for row in self._db.rows(sql, params)]

    def insert(self, job: Job) -> None:
        with self._db.transaction() as db:
            db.execute(_INSERT, _to_row(job))

    def create_if_under_capacity(self, job: Job, per_owner_limit: int, queue_limit: int) -> Capacity:
        # Count and insert in one write transaction: no other process can slip a job
        # in between, so the limits hold across HTTP processes, not just one event loop.
        with self._db.transaction() as db:
            in_flight = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)", (job.owner, *_IN_FLIGHT)
            ).fetchone()[0]
            queued = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ?", (Status.STARTING.value,)
            ).fetchone()[0]
            stored = db.execute("SELECT data FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if stored is not None:
                if not same_create(job_from_json(stored[0]), job):
                    raise KeyError(f"job {job.id} exists")
                return Capacity(in_flight=in_flight, queued=queued, accepted=True)
            accepted = in_flight < per_owner_limit and queued < queue_limit
            if accepted:
                db.execute(_INSERT, _to_row(job))
            return Capacity(in_flight=in_flight, queued=queued, accepted=accepted)

    def get(self, job_id: str) -> Job | None:
        found = self._query("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return found[0] if found else None

    def _apply(self, db: sqlite3.Connection, current: Job, change: Change) -> Job | None:
        updated = change(dataclasses.replace(current))
        if updated is None:
            return None
        assignments = ",".join(f"{c} = ?" for c in _COLUMNS[1:])
        row = _to_row(updated)
        db.execute(f"UPDATE jobs SET {assignments}, data = ? WHERE id = ?", (*row[1:], current.id))
        return updated

    def update(self, job_id: str, change: Change) -> Job | None:
        with self._db.transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._apply(db, job_from_json(row[0]), change) if row else None

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        # Nothing queued: say so from a read, without taking the write lock (which creates
        # and the end of the job in its post stage wait for). A job queued after this read
        # wakes the worker, which then claims again.
        if not self._db.rows("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (Status.STARTING.value,)):
            return None
        now = self.now()
        with self._db.transaction() as db:
            row = db.execute(
                "SELECT data FROM jobs WHERE status = ? ORDER BY created_at, id LIMIT 1",
                (Status.STARTING.value,),
            ).fetchone()
            if row is None:
                return None
            return self._apply(
                db, job_from_json(row[0]), lambda job: start_attempt(job, worker_id, now, lease_seconds)
            )

    def queue_position(self, job_id: str) -> int | None:
        rows = self._db.rows(
            "SELECT (SELECT COUNT(*) FROM jobs AS ahead WHERE ahead.status = ? AND "
            "(ahead.created_at < me.created_at OR (ahead.created_at = me.created_at AND ahead.id < me.id))) "
            "FROM jobs AS me WHERE me.id = ? AND me.status = ?",
            (Status.STARTING.value, job_id, Status.STARTING.value),
        )
        return int(rows[0][0]) if rows else None

    def list_by_owner(self, owner: str, limit: int, before: float | None = None) -> list[Job]:
        return self._query(
            "SELECT data FROM jobs WHERE owner = ? AND created_at < ? "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (owner, before if before is not None else float("inf"), limit),
        )

    def find(
        self,
        statuses: Iterable[Status] | None = None,
        *,
        lease_expired_at: float | None = None,
        webhook_state: str | None = None,
        completed_before: float | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if statuses is not None:
            wanted = [s.value for s in statuses]
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            params.extend(wanted)
        if lease_expired_at is not None:
            where.append("lease_expires_at IS NOT NULL AND lease_expires_at <= ?")
            params.append(lease_expired_at)
        if webhook_state is not None:
            where.append("webhook_state = ?")
            params.append(webhook_state)
        if completed_before is not None:
            where.append("completed_at IS NOT NULL AND completed_at < ?")
            params.append(completed_before)
        sql = f"SELECT data FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at, id LIMIT ?"
        return self._query(sql, (*params, limit))

    def count(self, statuses: Iterable[Status], owner: str | None = None) -> int:
        wanted = [s.value for s in statuses]
        sql = f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' * len(wanted))})"
        params: list[Any] = list(wanted)
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        return int(self._db.rows(sql, params)[0][0])

    def counts_by_status(self) -> dict[Status, int]:
        rows = self._db.rows("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = dict.fromkeys(Status, 0)
        counts.update({Status(status): n for status, n in rows})
        return counts

    def delete(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            with self._db.transaction() as db:
                db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])

    def check_writable(self) -> None:
        # A real (tiny) committed write: BEGIN alone would not notice a full disk or a
        # read-only file, which only fail when pages are written.
        self._db.write("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, julianday('now'))")

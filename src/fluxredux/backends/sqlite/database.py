"""The embedded SQLite database, shared by the job store, the API keys and the shares.

One file in WAL mode, used by the HTTP process and its worker process at once. What
every table's code needs, and must not get wrong on its own, is here:

- one connection per thread, so a thread waiting for the write lock never holds up
  readers in other threads (in WAL mode reads never wait for writers); connections of
  threads that ended are closed, so short-lived threads leak no file descriptors;
- a short busy timeout, so a database locked elsewhere is reported within seconds;
- reads that must not wait at all (``without_waiting``: the HTTP process's quick reads,
  on its event loop) use a second connection per thread with no busy timeout, and a lock
  in their way raises ``WouldWait`` at once instead;
- SQLite's operational failures (locked past the timeout, disk full, read-only file,
  I/O error) raised as the domain's ``StoreUnavailable`` (a 503, retried);
- transactions that never stay open after a failure, a failed COMMIT included: an open
  transaction would hold the write lock, and stop every other writer, for good.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from fluxredux.config import DEFAULT_BUSY_TIMEOUT
from fluxredux.errors import StoreUnavailable, WouldWait

# Set (on a thread) inside ``without_waiting``.
_no_waiting = threading.local()


def connect(path: Path | str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> sqlite3.Connection:
    """A connection tuned for many short transactions from several processes."""
    connection = sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a power cut may lose the last transactions, never corrupt the
    # file; a process crash (kill -9) loses nothing.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return connection


@contextmanager
def without_waiting() -> Iterator[None]:
    """In this block (on this thread), a read that would wait for a lock raises WouldWait
    at once. In WAL mode a read waits for nothing but rare moments (the file's recovery
    after a crash, a reset of its log), so on the event loop it costs a few microseconds
    where the thread hop it saves costs far more; when it would wait, the caller reads
    in a thread. Writes are not meant for this block: one fails as soon as another
    process writes at the same time."""
    outer = getattr(_no_waiting, "on", False)
    _no_waiting.on = True
    try:
        yield
    finally:
        _no_waiting.on = outer


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """SQLite's operational failures as StoreUnavailable: callers answer 503 and retry."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(_no_waiting, "on", False) and "locked" in str(exc):  # "database is locked"
            raise WouldWait(f"the database is locked ({exc})") from exc
        raise StoreUnavailable(f"the database cannot be {what} right now ({exc}); retry shortly") from exc


class Database:
    def __init__(self, path: Path | str, schema: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        # Every thread's connections (its usual one, and its one that never waits).
        self._connections: dict[threading.Thread, list[sqlite3.Connection]] = {}
        self._connections_lock = threading.Lock()
        with store_errors("opened"):
            self.connection().executescript(schema)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (inside ``without_waiting``: its one that never waits)."""
        no_wait = getattr(_no_waiting, "on", False)
        name = "no_wait_db" if no_wait else "db"
        db: sqlite3.Connection | None = getattr(self._local, name, None)
        if db is None:
            db = connect(self.path, 0 if no_wait else self.busy_timeout)
            setattr(self._local, name, db)
            with self._connections_lock:
                for thread in [t for t in self._connections if not t.is_alive()]:
                    for ended in self._connections.pop(thread):
                        ended.close()
                self._connections.setdefault(threading.current_thread(), []).append(db)
        return db

    @contextmanager
    def transaction(self, what: str = "written") -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: writers of every process serialise on the lock."""
        with store_errors(what):
            db = self.connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with store_errors("read"):
            return self.connection().execute(sql, tuple(params)).fetchall()

    def write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement in its own transaction; how many rows it changed."""
        with self.transaction() as db:
            return db.execute(sql, tuple(params)).rowcount

    def close(self) -> None:
        with self._connections_lock:
            for connections in self._connections.values():
                for db in connections:
                    db.close()
            self._connections.clear()


class ClockedTables:
    """Base of the SQLite implementations of the seams whose records carry times (job
    store, worker registry, webhook outbox): their tables in the database file, and the
    clock that stamps them. One file on one machine: its clock is every process's clock."""

    SCHEMA: ClassVar[str]

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = Database(path, self.SCHEMA, busy_timeout=busy_timeout)
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def close(self) -> None:
        self._db.close()

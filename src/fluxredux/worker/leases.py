"""One thread that renews the leases of the jobs a worker holds.

A worker holds one job at a time, two with overlap (one in its post stage, the next in its
model stage). Each held job's lease is renewed every ``every`` seconds from the moment it
was claimed, until it is released (its end recorded) or its renewal says the job is no
longer this worker's. One long-lived thread does it for all of them rather than a thread
per job: starting a thread is a hand-over between threads on every claim, on the path of
every prediction. The thread ends by itself after ``idle_seconds`` with nothing held
(and starts again with the next hold), so a worker that is gone leaves no thread behind.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fluxredux.jobs.job import Job

# Renew ``job``'s lease; False: it is no longer ours (stop renewing it).
Renew = Callable[[Job], bool]


@dataclass
class _Held:
    job: Job
    due: float  # monotonic: its next renewal


class LeaseKeeper:
    def __init__(
        self, renew: Renew, every: float, *, idle_seconds: float = 30.0, name: str = "leases"
    ) -> None:
        self._renew = renew
        self._every = every
        self._idle_seconds = idle_seconds
        self._name = name
        self._held: dict[int, _Held] = {}
        self._renewing: set[int] = set()
        self._tokens = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, job: Job) -> Callable[[], None]:
        """Renew ``job``'s lease until the returned function is called. That function
        returns once no renewal of it is under way: after it, none is made."""
        token = next(self._tokens)
        with self._changed:
            self._held[token] = _Held(job, time.monotonic() + self._every)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify_all()

        def release() -> None:
            with self._changed:
                self._held.pop(token, None)
                while token in self._renewing:
                    self._changed.wait()
                self._changed.notify_all()

        return release

    @property
    def held(self) -> int:
        with self._changed:
            return len(self._held)

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._wait_for_due()
                if due is None:
                    return
                self._renewing.update(token for token, _ in due)
            try:
                for token, held in due:
                    kept = True
                    try:
                        kept = self._renew(held.job)
                    finally:
                        with self._changed:
                            self._renewing.discard(token)
                            if not kept:
                                self._held.pop(token, None)
                            self._changed.notify_all()
            except BaseException:
                with self._changed:  # never leave a release waiting on a renewal that died
                    self._renewing.clear()
                    self._thread = None
                    self._changed.notify_all()
                raise

    def _wait_for_due(self) -> list[tuple[int, _Held]] | None:
        """(Under the lock.) The held jobs due for renewal, their next renewal set; None:
        nothing was held for ``idle_seconds`` and this thread is to end."""
        idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            if not self._held:
                if now - idle_since >= self._idle_seconds:
                    self._thread = None
                    return None
                self._changed.wait(self._idle_seconds - (now - idle_since))
                continue
            idle_since = now
            due = [(token, held) for token, held in self._held.items() if held.due <= now]
            if due:
                for _, held in due:
                    held.due = now + self._every
                return due
            self._changed.wait(min(held.due for held in self._held.values()) - now)

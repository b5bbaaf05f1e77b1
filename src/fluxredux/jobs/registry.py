"""The registry of live workers: who is running, where, with which model, last seen when.

Every worker registers itself when it starts, heartbeats while it lives and leaves when it
stops. Recovery asks it whose jobs are really orphaned: a job is taken back before its
lease ends only when its worker is certainly dead (on this very machine, its process no
longer exists), never merely because some server restarted; with many machines, a
restarting API node must not take jobs away from healthy workers elsewhere.
``/ready`` and ``fluxredux workers`` read it too.

A small protocol (SQLite and memory today; Redis for many machines), one contract suite.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from fluxredux.jobs.job import Job, Status
from fluxredux.jobs.lifecycle import Lifecycle

WorkerState = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    model: str  # what it runs (the settings' choice while loading, then the model's description)
    device: str
    state: WorkerState
    started_at: float
    last_seen: float = 0.0  # stamped by the registry's clock
    # What a monitor shows of it: {"demo", "notice"}, {"error": {...}} when its model failed
    # to load, {"storage_error": "..."} while its outputs cannot be written; and
    # "process_space" (see ``process_space``), which tells whose pids it can check.
    details: dict[str, Any] = field(default_factory=dict)


class WorkerRegistry(Protocol):
    def register(self, worker: WorkerInfo) -> None:
        """Add or replace ``worker``, seen now."""

    def heartbeat(
        self, worker_id: str, *, state: WorkerState | None = None, model: str | None = None
    ) -> bool:
        """Seen now (and its state/model changed, if given); False when it is not registered."""

    def unregister(self, worker_id: str, *, seen_before: float | None = None) -> None:
        """Remove it; with ``seen_before``, only if it has not been seen after that time
        (one atomic check, so a heartbeat landing meanwhile keeps it registered)."""

    def workers(self) -> list[WorkerInfo]:
        """Every registered worker, oldest first, alive or not (see ``is_gone``)."""

    def now(self) -> float: ...

    def close(self) -> None: ...


def this_host() -> str:
    return socket.gethostname()


def new_worker_id() -> str:
    """A worker's name in the registry: where it runs, and a random part of its own."""
    return f"{this_host()}-{secrets.token_hex(4)}"


@functools.cache  # fixed for the life of the process; asked per worker, every second
def process_space() -> str | None:
    """Which set of process ids this process sees: the boot and the pid namespace, so that
    two containers (or a pod's containers) sharing a host name never read each other's
    pids as their own. None where /proc cannot tell (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` runs here. A zombie does not: a worker whose server was killed is
    re-parented, and in a container nobody may ever reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): the signal's answer stands
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_gone(worker: WorkerInfo, now: float, ttl: float) -> bool:
    """No heartbeat for ``ttl`` seconds, or its process has ended (known on its own host
    only): what ``fluxredux workers`` and ``/ready`` count as not live."""
    return now - worker.last_seen > ttl or is_dead(worker)


def is_dead(worker: WorkerInfo) -> bool:
    """Certainly dead: in this very process space (same host, same boot, same pid
    namespace), its process no longer exists.

    Silence alone is not death: a worker whose store was unreachable for a while may be
    running its job still, and keeps it until its lease runs out, as before there was a
    registry. Only a certain death takes a job back before its lease ends."""
    return (
        worker.host == this_host()
        and worker.details.get("process_space") == process_space()
        and not _process_exists(worker.pid)
    )


def dead_owners(registry: WorkerRegistry, owners: set[str]) -> set[str]:
    """Those of ``owners`` (lease owners of running jobs) whose worker is certainly dead."""
    known = {worker.id: worker for worker in registry.workers()}
    return {owner for owner in owners if owner in known and is_dead(known[owner])}


def recover_orphans(
    lifecycle: Lifecycle, registry: WorkerRegistry, *, max_attempts: int, ttl: float
) -> list[Job]:
    """Take back the running jobs whose lease ran out, or whose worker is certainly dead:
    re-run once, or fail as "worker lost". Jobs of live workers, wherever they run, stay
    theirs. Workers gone for ``ttl`` (or dead) leave the registry, unless they spoke since."""
    owners = {job.lease_owner for job in lifecycle.store.find([Status.PROCESSING]) if job.lease_owner}
    recovered = lifecycle.reap(max_attempts=max_attempts, dead_owners=dead_owners(registry, owners))
    now = registry.now()
    for worker in registry.workers():
        if is_gone(worker, now, ttl):
            # Only if not heard from since we looked: a worker that just came back stays.
            registry.unregister(worker.id, seen_before=worker.last_seen)
    return recovered

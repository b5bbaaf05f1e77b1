"""The worker registry contract (every implementation), and recovery built on it: a job
is taken back only from a worker that is gone, never from a live one on another machine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fluxredux.config import Settings
from fluxredux.jobs import Job, Lifecycle, SQLiteJobStore, Status, new_id
from fluxredux.jobs.registry import (
    MemoryWorkerRegistry,
    SQLiteWorkerRegistry,
    WorkerInfo,
    WorkerRegistry,
    is_gone,
    recover_orphans,
    this_host,
)
from tests.test_jobs import FakeClock

REGISTRIES: dict[str, Callable[[Path, Callable[[], float]], WorkerRegistry]] = {
    "sqlite": lambda tmp, clock: SQLiteWorkerRegistry(tmp / "jobs.db", clock=clock),
    "memory": lambda tmp, clock: MemoryWorkerRegistry(clock=clock),
}
TTL = 15.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(REGISTRIES))
def registry(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[WorkerRegistry]:
    backend = REGISTRIES[request.param](tmp_path, clock)
    yield backend
    backend.close()


def ended_pid() -> int:
    """The pid of a process that has just ended (on this host)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def worker(worker_id: str, *, host: str = "gpu-7", pid: int = 4242, state: str = "ready") -> WorkerInfo:
    return WorkerInfo(worker_id, host, pid, "FLUX.1 Redux [schnell]", "cuda:0", state, 1.0)  # type: ignore[arg-type]


def test_register_heartbeat_unregister(registry: WorkerRegistry, clock: FakeClock) -> None:
    registry.register(worker("w1", state="loading"))
    assert [(w.id, w.state, w.last_seen) for w in registry.workers()] == [("w1", "loading", clock.now)]
    clock.now += 5
    assert registry.heartbeat("w1", state="ready", model="demo") is True
    [seen] = registry.workers()
    assert (seen.state, seen.model, seen.last_seen, seen.host) == ("ready", "demo", clock.now, "gpu-7")
    assert registry.heartbeat("nobody") is False
    registry.unregister("w1")
    registry.unregister("w1")  # idempotent
    assert registry.workers() == []


def test_silence_past_the_ttl_means_gone(registry: WorkerRegistry, clock: FakeClock) -> None:
    registry.register(worker("w1"))
    [seen] = registry.workers()
    assert not is_gone(seen, clock.now + TTL, TTL)
    assert is_gone(seen, clock.now + TTL + 0.1, TTL)


def test_on_this_host_a_dead_process_is_gone_at_once(registry: WorkerRegistry, clock: FakeClock) -> None:
    dead_pid = ended_pid()
    registry.register(worker("dead-here", host=this_host(), pid=dead_pid))
    registry.register(worker("alive-here", host=this_host(), pid=os.getpid()))
    now = clock.now
    assert {w.id: is_gone(w, now, TTL) for w in registry.workers()} == {
        "dead-here": True,
        "alive-here": False,
    }


def running(store: SQLiteJobStore, owner: str, lease_left: float = 3600) -> Job:
    job = Job(id=new_id(), owner="k", input={"num_outputs": 1}, created_at=store.now())
    job.status, job.attempt, job.lease_owner = Status.PROCESSING, 1, owner
    job.lease_expires_at = store.now() + lease_left
    store.insert(job)
    return job


def test_a_restart_takes_back_only_the_jobs_of_gone_workers(tmp_path: Path) -> None:
    """Bug: at start, every processing job was treated as lost, so a restarting API node
    took jobs away from healthy workers on other machines (and they ran twice)."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    registry = SQLiteWorkerRegistry(tmp_path / "jobs.db")
    registry.register(worker("elsewhere", host="gpu-7", pid=1))  # alive: it heartbeats
    registry.register(worker("died-here", host=this_host(), pid=ended_pid()))
    jobs = {owner: running(store, owner) for owner in ("elsewhere", "died-here", "never-registered")}

    recovered = recover_orphans(Lifecycle(store), registry, max_attempts=2, ttl=TTL)

    assert {job.id for job in recovered} == {jobs["died-here"].id, jobs["never-registered"].id}
    after = {owner: store.get(job.id) for owner, job in jobs.items()}
    assert after["elsewhere"] is not None and after["elsewhere"].status == Status.PROCESSING
    assert after["elsewhere"].lease_owner == "elsewhere"
    assert all(
        after[o] is not None and after[o].status == Status.STARTING for o in ("died-here", "never-registered")
    )
    assert [w.id for w in registry.workers()] == ["elsewhere"]  # the gone one left the registry


def test_the_server_start_uses_the_registry(tmp_path: Path) -> None:
    """`fluxredux serve`'s start-up recovery goes through the same rule."""
    from fluxredux.api.server import recover_after_restart
    from fluxredux.api.services import build_services
    from tests.harness import ThreadWorkers

    settings = Settings(data_dir=tmp_path, model="fake")
    services = build_services(settings, lambda *_: ThreadWorkers())
    try:
        services.registry.register(worker("elsewhere"))
        kept = running(services.store, "elsewhere")  # type: ignore[arg-type]
        lost = running(services.store, "old-run-worker")  # type: ignore[arg-type]
        assert recover_after_restart(services) == 1
        assert services.store.get(kept.id).status == Status.PROCESSING  # type: ignore[union-attr]
        assert services.store.get(lost.id).status == Status.STARTING  # type: ignore[union-attr]
    finally:
        services.close()


def test_fluxredux_workers_lists_the_live_worker_of_a_server(tmp_path: Path) -> None:
    from tests.test_faults import FLUXREDUX, serve

    with serve(tmp_path) as server:
        pid = server.health()["model"]["pid"]
        assert server.ready().status_code == 200
        listed = subprocess.run(
            [FLUXREDUX, "workers", "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert listed.returncode == 0, listed.stderr
        assert str(pid) in listed.stdout and "ready" in listed.stdout and this_host() in listed.stdout
        assert "FAKE model" in listed.stdout
    # The server stopped its worker: nothing is listed as live any more.
    after = subprocess.run(
        [FLUXREDUX, "workers", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True
    )
    assert "no live workers" in after.stdout

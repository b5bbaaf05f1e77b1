"""The worker registry contract (every implementation), and recovery built on it: a job
is taken back only from a worker that is gone, never from a live one on another machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry
from fluxredux.config import Settings
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.registry import (
    WorkerInfo,
    WorkerRegistry,
    is_gone,
    process_space,
    recover_orphans,
    this_host,
)
from tests.backends import Engine
from tests.helpers import FakeClock

SEAM = "registry"
TTL = 15.0


@pytest.fixture
def registry(engine: Engine) -> WorkerRegistry:
    return engine.open()


def ended_pid() -> int:
    """The pid of a process that has just ended (on this host)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def worker(
    worker_id: str, *, host: str = "gpu-7", pid: int = 4242, state: str = "ready", space: str | None = None
) -> WorkerInfo:
    """A worker entry as Registration writes it; on this host, in this process space
    unless ``space`` names another (a container sharing the host name)."""
    details = {"process_space": space or (process_space() if host == this_host() else "elsewhere")}
    return WorkerInfo(worker_id, host, pid, "FLUX.1 Redux [schnell]", "cuda:0", state, 1.0, details=details)  # type: ignore[arg-type]


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


def test_a_same_named_host_with_other_pids_is_never_certainly_dead(
    registry: WorkerRegistry, clock: FakeClock
) -> None:
    """Two containers may share a host name but not their pids: a pid missing here says
    nothing of a worker in another pid namespace (or before a reboot); only silence does."""
    registry.register(worker("next-door", host=this_host(), pid=ended_pid(), space="another-boot:4026531836"))
    [seen] = registry.workers()
    assert not is_gone(seen, clock.now, TTL)
    assert is_gone(seen, clock.now + TTL + 0.1, TTL)


def running(store: SQLiteJobStore, owner: str, lease_left: float = 3600) -> Job:
    job = Job(id=new_id(), owner="k", input={"num_outputs": 1}, created_at=store.now())
    job.status, job.attempt, job.lease_owner = Status.PROCESSING, 1, owner
    job.lease_expires_at = store.now() + lease_left
    store.insert(job)
    return job


def test_a_restart_takes_back_only_the_jobs_of_dead_workers(tmp_path: Path) -> None:
    """Bug: at start, every processing job was treated as lost, so a restarting API node
    took jobs away from healthy workers on other machines (and they ran twice)."""
    clock = FakeClock()
    store = SQLiteJobStore(tmp_path / "jobs.db", clock=clock)
    registry = SQLiteWorkerRegistry(tmp_path / "jobs.db", clock=clock)
    registry.register(worker("elsewhere", host="gpu-7", pid=1))  # alive: it heartbeats
    registry.register(worker("died-here", host=this_host(), pid=ended_pid()))
    jobs = {owner: running(store, owner) for owner in ("elsewhere", "died-here", "unknown")}

    recovered = recover_orphans(Lifecycle(store), registry, max_attempts=2, ttl=TTL)

    assert [job.id for job in recovered] == [jobs["died-here"].id]
    statuses = {owner: store.get(job.id).status for owner, job in jobs.items()}  # type: ignore[union-attr]
    assert statuses == {
        "elsewhere": Status.PROCESSING,
        "died-here": Status.STARTING,
        "unknown": Status.PROCESSING,
    }
    assert [w.id for w in registry.workers()] == ["elsewhere"]  # the dead one left the registry


def test_a_silent_worker_keeps_its_job_until_its_lease_runs_out(tmp_path: Path) -> None:
    """Silence is not death: a worker elsewhere whose store was unreachable for longer than
    the registry's TTL may still be running its job; only the lease decides then."""
    clock = FakeClock()
    store = SQLiteJobStore(tmp_path / "jobs.db", clock=clock)
    registry = SQLiteWorkerRegistry(tmp_path / "jobs.db", clock=clock)
    lifecycle = Lifecycle(store)
    registry.register(worker("elsewhere"))
    job = running(store, "elsewhere", lease_left=30)
    clock.now += TTL + 5  # silent past the TTL, lease still running
    assert recover_orphans(lifecycle, registry, max_attempts=2, ttl=TTL) == []
    assert store.get(job.id).status == Status.PROCESSING  # type: ignore[union-attr]
    clock.now += 30  # now the lease ran out too
    assert [j.id for j in recover_orphans(lifecycle, registry, max_attempts=2, ttl=TTL)] == [job.id]


def test_unregistering_a_silent_worker_spares_one_that_just_spoke(
    registry: WorkerRegistry, clock: FakeClock
) -> None:
    registry.register(worker("w1"))
    [looked_at] = registry.workers()
    clock.now += 1
    registry.heartbeat("w1")  # lands between the look and the removal
    registry.unregister("w1", seen_before=looked_at.last_seen)
    assert [w.id for w in registry.workers()] == ["w1"]
    registry.unregister("w1", seen_before=clock.now)
    assert registry.workers() == []


def test_the_server_start_uses_the_registry(tmp_path: Path) -> None:
    """`fluxredux serve`'s start-up recovery goes through the same rule."""
    from fluxredux.api.server import recover_after_restart
    from fluxredux.api.services import build_services
    from tests.harness import ThreadWorkers

    settings = Settings(data_dir=tmp_path, model="fake")
    services = build_services(settings, lambda *_: ThreadWorkers())
    try:
        services.registry.register(worker("elsewhere"))
        services.registry.register(worker("old-run-worker", host=this_host(), pid=ended_pid()))
        kept = running(services.store, "elsewhere")  # type: ignore[arg-type]
        lost = running(services.store, "old-run-worker")  # type: ignore[arg-type]
        assert recover_after_restart(services) == 1
        assert services.store.get(kept.id).status == Status.PROCESSING  # type: ignore[union-attr]
        assert services.store.get(lost.id).status == Status.STARTING  # type: ignore[union-attr]
    finally:
        services.close()


def test_fluxredux_workers_lists_the_live_worker_of_a_server(tmp_path: Path) -> None:
    from tests.helpers import FLUXREDUX
    from tests.test_faults import serve

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


def test_heartbeats_must_fit_well_inside_the_lease_and_the_ttl() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at most half of lease_seconds"):
        Settings(heartbeat_seconds=20)
    with pytest.raises(ValidationError, match="at most half of worker_ttl_seconds"):
        Settings(heartbeat_seconds=5, worker_ttl_seconds=8)
    assert Settings(heartbeat_seconds=5).heartbeat_seconds == 5


@pytest.mark.engines("redis")
def test_redis_registry_on_redis_time_keeps_deployments_apart(engine: Engine) -> None:
    """Without an injected clock, last_seen is Redis TIME; another prefix is another deployment."""
    from dataclasses import replace

    registry, other = engine.open(clock=None), engine.open("other", clock=None)
    before = registry.now()
    registry.register(replace(worker("w1"), details={"demo": True, "error": {"code": "oom", "at": 1.25}}))
    [seen] = registry.workers()
    assert before <= seen.last_seen <= registry.now()
    assert seen.details == {"demo": True, "error": {"code": "oom", "at": 1.25}}
    assert other.workers() == [] and other.heartbeat("w1") is False


def test_a_stop_that_lands_while_the_worker_registers_still_leaves_the_registry(tmp_path: Path) -> None:
    """SIGTERM raises out of whatever the main thread is doing while the model loads; if
    that is the first registry write, the worker must still leave (it did not, once in CI:
    the entry stayed "loading" until its TTL)."""
    from fluxredux.backends import backends_for
    from fluxredux.worker.process import WorkerProcess

    settings = Settings(data_dir=tmp_path, model="fake")
    process = WorkerProcess(settings, worker_id="w")
    registry = process.backends.registry

    class SignalledWhileRegistering:
        """The registry, with SIGTERM's handler running right after the first write lands."""

        def __getattr__(self, name: str) -> object:
            return getattr(registry, name)

        def register(self, info: WorkerInfo) -> None:
            registry.register(info)
            process.request_stop()  # what the SIGTERM handler calls: raises SystemExit(0)

    process.registration.registry = SignalledWhileRegistering()  # type: ignore[assignment]
    with pytest.raises(SystemExit):
        process.run()
    after = backends_for(settings)
    try:
        assert after.registry.workers() == []
    finally:
        after.close()

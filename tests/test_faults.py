"""Faults injected for real, as an operator meets them: a database write lock held by
another process while the worker is killed, a locked database during creates and health
checks, a full or read-only output disk, a worker that dies at every start.

Each test runs `fluxredux serve` (or the supervisor) as real processes and ends with
every accepted prediction terminal, the server and its supervisor alive, and /ready
telling the truth, then recovering by itself once the fault is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxredux.backends.sqlite.events import PipeEventBus
from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry
from fluxredux.config import Settings
from fluxredux.errors import NoWorker
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.worker.supervisor import WorkerSupervisor
from tests.cluster import Node, wait_for
from tests.helpers import FLUXREDUX
from tests.services import free_port


@dataclass
class Server(Node):
    """`fluxredux serve` on one machine: an API node (tests/cluster.py) with its workers."""

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/health", timeout=5).json())

    def wait_for(self, what: Callable[[], bool], timeout: float, message: str) -> None:
        wait_for(what, timeout, lambda: f"{message}\n--- server log ---\n{self.text()[-3000:]}")


@contextmanager
def serve(
    tmp_path: Path, *, model: str = "fake", env: dict[str, str] | None = None, wait_ready: bool = True
) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model", model],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                if health["model"]["ready"] or not wait_ready:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        match = re.search(r"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", log.read_text())
        assert match, log.read_text()
        yield Server("serve", process, log, url=url, key=match.group(1))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def write_lock(database: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the database's write lock (BEGIN IMMEDIATE) for ``seconds``,
    as a long migration or a stuck tool would; leaving the block releases it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "db.execute('BEGIN IMMEDIATE')\n"
         "print('locked', flush=True)\n"
         "time.sleep(float(sys.argv[2]))\n",
         str(database), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    try:
        yield holder
    finally:
        holder.kill()  # a killed holder's lock is released by the OS
        holder.wait()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_a_held_write_lock_while_the_worker_is_killed_loses_nothing(tmp_path: Path) -> None:
    """Defects 1, 2 and 4: the supervisor survives a store it cannot write at the moment its
    worker dies, requests neither stall nor 500 while the lock is held, /ready tells why
    it is not ready, and everything recovers by itself when the lock goes."""
    with serve(tmp_path, env={"FLUXREDUX_FAKE_STEP_SECONDS": "0.5"}) as server:
        running = server.create(num_outputs=2).json()["predictionID"]
        server.wait_for(lambda: server.get(running)["status"] == "processing", 20, "never started")
        queued = server.create().json()["predictionID"]
        worker_pid = server.health()["model"]["pid"]

        with write_lock(tmp_path / "data" / "fluxredux.db", seconds=30):
            os.kill(worker_pid, signal.SIGKILL)
            health, took = timed(lambda: httpx.get(server.url + "/health", timeout=10))
            assert health.status_code == 200 and took < 1.5, took  # liveness never waits on the store

            refused, took = timed(lambda: server.create())
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "store_unavailable" and took < 4.0, took
            assert int(refused.headers["Retry-After"]) >= 1

            reads, took = timed(
                lambda: httpx.get(f"{server.url}/v1/prediction/{queued}", headers=server.headers())
            )
            assert reads.status_code == 200 and took < 1.5, took  # WAL: reads go on under a write lock

            ready, took = timed(server.ready)
            assert ready.status_code == 503 and took < 4.0, took
            assert ready.json()["ready"] is False
            reasons = ready.json()["reasons"]
            # The probe's write waits for the lock up to the busy timeout (2 s), as long as
            # /ready's own budget: the job store is named as locked, or as not answering.
            assert any(
                "database cannot be written" in reason or reason == "job store: no answer within 2 s"
                for reason in reasons
            ), reasons
            # The supervisor meets the locked store while recovering the dead worker's job.
            server.wait_for(lambda: "will retry" in server.log.read_text(), 10, "no recovery was tried")

        server.wait_for(lambda: server.ready().status_code == 200, 30, "/ready never recovered")
        for prediction_id in (running, queued):
            result = server.get(prediction_id, wait=40)
            assert result["status"] == "success", result
        after = server.create()
        assert after.status_code == 200, after.text
        assert server.get(after.json()["predictionID"], wait=30)["status"] == "success"
        health = server.health()["model"]
        assert health["restarts"] >= 1 and health["pid"] != worker_pid and health["ready"] is True
        assert "Traceback" not in server.log.read_text()  # every fault here was expected and handled


def test_a_locked_database_gives_503_quickly_and_stalls_nothing(tmp_path: Path) -> None:
    """Defect 4: with the write lock held elsewhere, creates answer 503 within a couple of
    seconds while other requests keep being served at once (the event loop never blocks)."""
    files = tmp_path / "data" / "files"

    def references() -> set[str]:  # the blobs stored (a temp file's name starts with ".")
        return {path.name for path in files.iterdir() if not path.name.startswith(".")}

    with serve(tmp_path) as server:
        done = server.create().json()["predictionID"]
        assert server.get(done, wait=20)["status"] == "success"
        with write_lock(tmp_path / "data" / "fluxredux.db", seconds=30):
            results: list[tuple[int, float]] = []

            def create() -> None:
                response, took = timed(lambda: server.create())
                results.append((response.status_code, took))

            before = references()
            seen: set[str] = set()

            def waiting() -> bool:
                # A create stores its reference image, then inserts its job (the write that
                # waits for the lock), and deletes the image when refused: a new file is a
                # create waiting for the lock.
                now = references() - before
                seen.update(now)
                return len(seen) == 4 and bool(now)

            creators = [threading.Thread(target=create) for _ in range(4)]
            for thread in creators:
                thread.start()
            # Every create has reached the lock, and some still wait for it, in threads.
            server.wait_for(waiting, 10, "the four creates never all reached the locked write")
            for _ in range(5):
                response, took = timed(lambda: httpx.get(server.url + "/health", timeout=10))
                assert response.status_code == 200 and took < 1.5, took
                response, took = timed(
                    lambda: httpx.get(f"{server.url}/v1/prediction/{done}", headers=server.headers())
                )
                assert response.status_code == 200 and took < 1.5, took
            for thread in creators:
                thread.join()
            assert [status for status, _ in results] == [503] * 4
            assert max(took for _, took in results) < 5.0, results
        server.wait_for(lambda: server.ready().status_code == 200, 10, "/ready never recovered")
        again = server.create()
        assert (
            again.status_code == 200
            and server.get(again.json()["predictionID"], wait=20)["status"] == "success"
        )


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/fluxredux-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)]).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root to mount a small tmpfs (CI runs as root)"
)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A real tmpfs of ``size`` mounted at ``path``; yields remount(options)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@needs_mount
def test_a_full_then_read_only_output_disk_fails_jobs_cleanly_and_recovers(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    """Defect 3: outputs that cannot be written fail that job as storage_error; the worker
    stays up (same process, no restart), /ready says the storage cannot be written, and
    once there is room again everything works without anyone touching the server."""
    with (
        small_disk(tmp_path / "data" / "files", "256k") as remount,
        serve(tmp_path, model="demo", env={"FLUXREDUX_CACHE_DIR": str(model_cache_dir)}) as server,
    ):
        worker_pid = server.health()["model"]["pid"]
        # Noise from the demo model: a 512x512 PNG is ~0.8 MB, more than the disk holds.
        created = server.create(megapixels="0.25", output_format="png", seed=1)
        assert created.status_code == 200, created.text
        result = server.get(created.json()["predictionID"], wait=60)
        assert result["status"] == "error", result
        assert result["error_code"] == "storage_error" and "could not be stored" in result["error"]
        health = server.health()["model"]
        assert health["pid"] == worker_pid and health["restarts"] == 0 and health["ready"] is True
        # The worker says so in the registry; the server reads it there within a moment.
        server.wait_for(lambda: server.ready().status_code == 503, 5, "/ready never noticed")
        assert any("store outputs" in r for r in server.ready().json()["reasons"])
        reference = result["input"]["redux_image"].rsplit("/", 1)[-1]
        kept = sorted(p.name for p in (tmp_path / "data" / "files").iterdir() if not p.name.startswith("."))
        assert kept == [reference]  # no output and no temp file half-written and left behind

        remount("size=64m")
        server.wait_for(lambda: server.ready().status_code == 200, 20, "/ready never recovered")
        result = server.get(
            server.create(megapixels="0.25", output_format="png", seed=1).json()["predictionID"], wait=60
        )
        assert result["status"] == "success", result
        assert httpx.get(result["output"]).content[:8] == b"\x89PNG\r\n\x1a\n"

        remount("ro")
        ready = server.ready()
        assert ready.status_code == 503
        assert any("file storage cannot be written" in r for r in ready.json()["reasons"]), ready.json()
        refused = server.create()  # the reference image cannot be stored: 503, not 500
        assert refused.status_code == 503 and refused.json()["code"] == "storage_error", refused.text
        remount("rw")
        server.wait_for(lambda: server.ready().status_code == 200, 20, "/ready never recovered")
        assert server.health()["model"]["pid"] == worker_pid


def test_a_worker_that_dies_at_every_start_gets_creates_refused(tmp_path: Path) -> None:
    """Defect 2: while no worker can be started, creates answer 503 no_worker with a
    Retry-After instead of accepting jobs that never run; /health stays 200 (liveness)
    and /ready says why. The worker here dies as it starts, as one killed by the OOM
    killer while loading would (a sitecustomize in its environment exits at once)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif 'FLUXREDUX_EVENT_FD' in os.environ:  # only the worker child has it\n    os._exit(1)\n"
    )
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with serve(tmp_path, env=env, wait_ready=False) as server:

        def refused() -> bool:
            time.sleep(1.5)  # a few creates, well under the in-flight limit
            response = server.create(timeout=10)
            assert response.status_code in (200, 503), response.text
            return response.status_code == 503

        server.wait_for(refused, 30, "creates were never refused")
        response = server.create()
        assert response.json()["code"] == "no_worker" and int(response.headers["Retry-After"]) >= 1
        assert "see the server log" in response.json()["error"]
        assert httpx.get(server.url + "/health").status_code == 200
        ready = server.ready()
        assert ready.status_code == 503 and ready.json()["reasons"], ready.json()
        assert server.process.poll() is None
        accepted = [
            p["id"]
            for p in httpx.get(f"{server.url}/v1/prediction/", headers=server.headers()).json()["items"]
        ]
    # Whatever was accepted before the refusals runs once a worker can start again.
    with serve(tmp_path) as server:
        for prediction_id in accepted:
            assert server.get(prediction_id, wait=30)["status"] == "success"


# --- the supervisor alone, with real child processes ----------------------------------

# A stand-in worker: the first one takes the job (as a claim would), then dies when told
# to; every later one dies at once, as a worker crashing at start would.
TAKE_JOB_THEN_DIE = (
    "import os, pathlib, sqlite3, sys, time\n"
    "me, here = os.environ['FLUXREDUX_WORKER_ID'], pathlib.Path(sys.argv[1])\n"
    "if not (here / 'claimed').exists():\n"
    "    db = sqlite3.connect(str(here / 'jobs.db'), isolation_level=None)\n"
    "    db.execute(\"UPDATE jobs SET data = json_set(data, '$.lease_owner', ?)\", (me,))\n"
    "    (here / 'claimed').touch()\n"
    "    while not (here / 'die').exists():\n"
    "        time.sleep(0.05)\n"
    "raise SystemExit(1)\n"
)


def supervisor_for(
    tmp_path: Path, store: SQLiteJobStore, command: list[str], **options: Any
) -> WorkerSupervisor:
    registry = SQLiteWorkerRegistry(tmp_path / "jobs.db")
    return WorkerSupervisor(
        Settings(data_dir=tmp_path), Lifecycle(store), PipeEventBus(), registry, command=command, **options
    )


def processing_job(store: SQLiteJobStore, owner: str) -> Job:
    job = Job(id=new_id(), owner="k", input={"num_outputs": 1}, created_at=time.time())
    job.status, job.attempt, job.lease_owner = Status.PROCESSING, 1, owner
    job.lease_expires_at = time.time() + 3600  # only "its worker is dead" can recover it
    store.insert(job)
    return job


def test_the_supervisor_survives_a_store_it_cannot_write_when_its_worker_dies(tmp_path: Path) -> None:
    """Defect 1 at its root: the recovery of a dead worker's job fails (locked store); the
    supervisor keeps restarting workers and recovers the job once the store is back."""
    database = tmp_path / "jobs.db"
    store = SQLiteJobStore(database, busy_timeout=0.2)
    job = processing_job(store, owner="nobody-yet")
    supervisor = supervisor_for(tmp_path, store, [sys.executable, "-c", TAKE_JOB_THEN_DIE, str(tmp_path)])
    supervisor.start()
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "claimed").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with write_lock(database, seconds=30):
            (tmp_path / "die").touch()
            while supervisor.state.restarts < 2:
                assert time.monotonic() < deadline + 15
                time.sleep(0.05)
            assert supervisor.state.supervisor_error and "locked" in supervisor.state.supervisor_error
            assert store.get(job.id).status == Status.PROCESSING  # type: ignore[union-attr]
        deadline = time.monotonic() + 15
        while store.get(job.id).status != Status.STARTING:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the dead worker's job was never recovered"
            time.sleep(0.05)
        assert supervisor.state.exits_before_ready >= 2  # it keeps dying, and the supervisor keeps going
    finally:
        supervisor.stop()
        store.close()


def test_a_failed_spawn_is_retried_and_reported(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteJobStore(tmp_path / "jobs.db")
    supervisor = supervisor_for(tmp_path, store, [str(tmp_path / "no-such-python")], clock=lambda: now[0])
    supervisor.start()
    try:
        deadline = time.monotonic() + 10
        while supervisor.state.restarts < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "FileNotFoundError" in (supervisor.state.supervisor_error or "")
        problems = supervisor.problems()
        assert any("no worker process is running" in p for p in problems), problems
        assert not any("supervisor is not running" in p for p in problems), problems
        now[0] += 120  # longer than any restart backoff: nobody will run what is accepted
        refusal = supervisor.refusal()
        assert isinstance(refusal, NoWorker) and refusal.retry_after >= 1
    finally:
        supervisor.stop()


def test_a_new_worker_starts_without_its_predecessors_storage_error(tmp_path: Path) -> None:
    """Only the worker that saw a storage failure can clear it: its successor must not
    inherit it, or /ready would stay 503 for good after a restart."""
    marker = tmp_path / "second-run"
    script = (
        "import os, pathlib, time\n"
        "from fluxredux.backends.sqlite.registry import SQLiteWorkerRegistry\n"
        "from fluxredux.jobs.registry import WorkerInfo\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if marker.exists():\n"
        "    time.sleep(60)\n"
        "marker.touch()\n"
        f"registry = SQLiteWorkerRegistry({str(tmp_path / 'jobs.db')!r})\n"
        "me = os.environ['FLUXREDUX_WORKER_ID']\n"
        "details = {'storage_error': 'outputs could not be written: disk full'}\n"
        "registry.register(WorkerInfo(me, 'h', os.getpid(), 'm', 'cpu', 'ready', 0.0, details=details))\n"
        "time.sleep(1.5)\n"
        "raise SystemExit(1)\n"
    )
    supervisor = supervisor_for(
        tmp_path, SQLiteJobStore(tmp_path / "jobs.db"), [sys.executable, "-c", script]
    )
    supervisor.start()
    try:
        deadline = time.monotonic() + 15
        while supervisor.state.storage_error is None:  # the first worker's report arrives...
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert any("store outputs" in problem for problem in supervisor.problems())
        while not (supervisor.state.restarts >= 1 and supervisor.state.alive):  # ...then it dies
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert marker.exists() and supervisor.state.storage_error is None
        assert not any("store outputs" in problem for problem in supervisor.problems())
    finally:
        supervisor.stop()


def test_short_lived_threads_leave_no_open_connections(tmp_path: Path) -> None:
    """The worker starts a heartbeat thread per job: a connection per thread that is never
    closed would run the worker out of file descriptors after a few hundred jobs."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    job = Job(id=new_id(), owner="k", input={}, created_at=time.time())
    store.insert(job)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(60):
        thread = threading.Thread(target=lambda: store.update(job.id, lambda current: current))
        thread.start()
        thread.join()
    assert open_fds() - before < 10  # each connection holds ~3 (db, wal, shm)
    store.close()


def test_sigterm_lets_the_running_job_finish_before_the_server_exits(tmp_path: Path) -> None:
    """systemd, Docker and Kubernetes stop a server with SIGTERM: its worker finishes the
    job at hand and records it, leaves the registry, and the server exits cleanly."""
    with serve(tmp_path, env={"FLUXREDUX_FAKE_STEP_SECONDS": "0.5"}) as server:
        running = server.create().json()["predictionID"]
        server.wait_for(lambda: server.get(running)["status"] == "processing", 20, "never started")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0, server.log.read_text()[-3000:]
    store = SQLiteJobStore(tmp_path / "data" / "fluxredux.db")
    registry = SQLiteWorkerRegistry(tmp_path / "data" / "fluxredux.db")
    try:
        job = store.get(running)
        assert job is not None and (job.status, job.attempt) == (Status.SUCCEEDED, 1)
        assert registry.workers() == []  # it left: nobody has to wait for its silence
    finally:
        store.close()
        registry.close()

"""Faults of a scale-out deployment, with real processes (tests/cluster.py): workers killed,
frozen past their lease, drained; Redis stopped and restarted; an API node killed under a
long-poll; a job that kills every worker that runs it.

Every test ends the same way (``settle``): each accepted prediction is terminal, none ran
to success twice (the workers' logs say "succeeded" at most once per prediction), and the
shared file storage holds exactly the input copies and the recorded outputs: nothing that
a fenced (taken back) run wrote is left behind. No process logs a stack trace: every fault
here is expected and handled (the one that does is a product bug, see the Redis test).

Leases are short (3 s, heartbeat 1 s, so API maintenance runs every second) and the fake
model's steps slow (0.4 s), so that a job is caught mid-run and recovered within seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.cluster import TERMINAL, Cluster, Node, Proc, cluster, wait_for
from tests.services import free_port, redis_server

STEPS = 4  # the most the API allows
STEP_SECONDS = 0.4
ENV = {
    "FLUXREDUX_LEASE_SECONDS": "3",
    "FLUXREDUX_HEARTBEAT_SECONDS": "1",
    "FLUXREDUX_WORKER_TTL_SECONDS": "3",
    "FLUXREDUX_MAX_ATTEMPTS": "2",
    "FLUXREDUX_FAKE_STEP_SECONDS": str(STEP_SECONDS),
}
JOB = {"num_inference_steps": STEPS, "megapixels": "0.25"}

POISON_SEED = 666_000
HELD_SEED = 424_242

# A worker of the test's own: the real WorkerProcess (claim, lease, heartbeat, fencing,
# drain on SIGTERM), around the fake model with two test behaviours chosen by variables:
# TEST_POISON_SEED: a job with this seed kills the process (as a GPU fault or an OOM kill
# would), every time; TEST_HOLD_SECONDS: after the last denoising step (past every cancel
# check, so nothing but the final record can fence the run), say so and pause, so that the
# test can freeze the process at a known point of its run.
LAUNCHER = """
import logging
import os
import signal
import sys
import time

from fluxredux.config import Settings
from fluxredux.pipeline.fake import FakeModel
from fluxredux.worker.process import WorkerProcess, configure_logging

POISON = int(os.environ.get("TEST_POISON_SEED", "-1"))
HOLD = float(os.environ.get("TEST_HOLD_SECONDS", "0"))
log = logging.getLogger("test-model")


class FaultyModel:
    def __init__(self, settings):
        self.inner = FakeModel(step_seconds=settings.fake_step_seconds)
        self.info = self.inner.info

    def generate(self, request, **kwargs):
        if request.seed == POISON:
            log.warning("seed %d: poisoned, exiting", request.seed)
            logging.shutdown()
            os._exit(137)
        result = self.inner.generate(request, **kwargs)
        if HOLD:
            log.warning("seed %d: every step done, holding", request.seed)
            time.sleep(HOLD)
        return result


configure_logging()
process = WorkerProcess(Settings(), model_factory=FaultyModel)
process.drain_on(signal.SIGTERM)
sys.exit(process.run())
"""


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    script = tmp_path / "launch_worker.py"
    script.write_text(LAUNCHER)
    return script


def storage_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'storage'}"


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Cluster]:
    with cluster(tmp_path, redis_url, redis_prefix, storage_url(tmp_path), **ENV) as deployed:
        yield deployed


def workers_of(c: Cluster) -> list[Proc]:
    return [p for p in c.procs if not isinstance(p, Node)]


def worker_logs(c: Cluster) -> str:
    return "\n".join(p.text() for p in workers_of(c))


def name_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def outputs_of(prediction: dict[str, Any]) -> list[str]:
    output = prediction["output"]
    if output is None:
        return []
    return [name_of(url) for url in ([output] if isinstance(output, str) else output)]


def stored_files(c: Cluster) -> set[str]:
    """The blobs in the shared storage dir (not the temp files of a write in progress)."""
    root = Path(c.storage.removeprefix("file://"))
    return {name for name in os.listdir(root) if not name.startswith(".")}


def attempts_started(c: Cluster, prediction_id: str) -> list[int]:
    pattern = rf"prediction {re.escape(prediction_id)}: started \(attempt (\d+)\)"
    return sorted(int(n) for n in re.findall(pattern, worker_logs(c)))


def runner_of(c: Cluster, prediction_id: str, attempt: int) -> Proc:
    line = f"prediction {prediction_id}: started (attempt {attempt})"
    found = [p for p in workers_of(c) if line in p.text()]
    assert len(found) == 1, f"{line!r} logged by {[p.name for p in found]}:\n{c.logs()}"
    return found[0]


def stored_job(c: Cluster, prediction_id: str) -> dict[str, Any]:
    """The job as Redis holds it: what no API shows (its attempt)."""
    client = redis.Redis.from_url(c.redis_url, decode_responses=True)
    try:
        data = client.get(f"{c.prefix}jobs:job:{prediction_id}")
    finally:
        client.close()
    assert data is not None, prediction_id
    return dict(json.loads(data))


def worker_id(proc: Proc) -> str:
    found = re.search(r"worker (\S+) ready:", proc.text())
    assert found, proc.text()
    return found.group(1)


def wait_log(proc: Proc, text: str, timeout: float = 30) -> None:
    def logged() -> bool:
        return text in proc.text()

    wait_for(logged, timeout, lambda: f"{proc.name} never logged {text!r}:\n{proc.text()}")


def wait_running(node: Node, prediction_id: str, step: int = 1, timeout: float = 30) -> dict[str, Any]:
    """Until the prediction runs and has done at least ``step`` denoising steps."""
    found: dict[str, Any] = {}

    def running() -> bool:
        found.update(node.get(prediction_id))
        assert found["status"] in ("starting", "processing"), found
        return bool(found["status"] == "processing" and found["progress"]["step"] >= step)

    wait_for(running, timeout, lambda: f"{prediction_id} never ran step {step}: {found}")
    return found


def settle(
    c: Cluster, node: Node, prediction_ids: list[str], timeout: float = 60
) -> dict[str, dict[str, Any]]:
    """Wait until every prediction is terminal; then check that none ran to success twice
    and that the storage holds exactly their input copies and recorded outputs."""
    ended = {pid: node.wait_status(pid, TERMINAL, timeout) for pid in prediction_ids}

    def succeeded(pid: str) -> int:
        return worker_logs(c).count(f"prediction {pid}: succeeded in")

    def logged_every_success() -> bool:
        return all(succeeded(pid) >= 1 for pid, p in ended.items() if p["status"] == "success")

    # A worker logs its success just after recording it: wait for the lines.
    wait_for(logged_every_success, 10, lambda: worker_logs(c))
    for pid, prediction in ended.items():
        expected = 1 if prediction["status"] == "success" else 0
        assert succeeded(pid) == expected, f"{pid} ({prediction['status']}):\n{worker_logs(c)}"
    inputs = {name_of(p["input"]["redux_image"]) for p in ended.values()}
    outputs = {name for p in ended.values() for name in outputs_of(p)}
    assert all(len(outputs_of(p)) == 1 for p in ended.values() if p["status"] == "success"), ended
    assert stored_files(c) == inputs | outputs, (
        f"storage: {sorted(stored_files(c))}\ninputs: {sorted(inputs)}\noutputs: {sorted(outputs)}"
    )
    return ended


def assert_no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.text(), f"{proc.name}:\n{proc.text()}"


# --- the faults --------------------------------------------------------------------------


def test_sigkill_mid_job_another_worker_finishes_it(deployment: Cluster) -> None:
    c = deployment
    api = c.node("api")
    c.worker("w1")
    c.worker("w2")
    ids = [api.create_id(**JOB) for _ in range(3)]
    victim_job = ids[0]
    wait_running(api, victim_job, step=1)
    victim = runner_of(c, victim_job, 1)
    victim.signal(signal.SIGKILL)
    victim.process.wait(10)

    ended = settle(c, api, ids)
    assert all(p["status"] == "success" for p in ended.values()), ended
    # The second run, by the survivor; the killed worker never recorded anything.
    assert attempts_started(c, victim_job) == [1, 2]
    survivor = runner_of(c, victim_job, 2)
    assert survivor is not victim
    assert f"prediction {victim_job}: succeeded in" in survivor.text()
    assert stored_job(c, victim_job)["attempt"] == 2
    assert_no_traceback(*c.procs)


def test_frozen_worker_past_its_lease_is_fenced_off(deployment: Cluster, launcher: Path) -> None:
    c = deployment
    api = c.node("api")
    # The job's first run pauses after its last step (see LAUNCHER): frozen there, nothing
    # but the final compare-and-set can stop its outputs from being recorded.
    frozen = c.script_worker("frozen", launcher, env={"TEST_HOLD_SECONDS": "2"})
    job = api.create_id(seed=HELD_SEED, **JOB)
    wait_log(frozen, f"seed {HELD_SEED}: every step done, holding")
    frozen.signal(signal.SIGSTOP)
    assert api.get(job)["status"] == "processing", "the held run ended before it could be frozen"

    # Its lease runs out (the process exists, so only the lease tells): taken back, re-run.
    other = c.worker("other")
    done = api.wait_status(job, TERMINAL, 30)
    assert done["status"] == "success", done
    assert f"prediction {job}: started (attempt 2)" in other.text()
    assert f"prediction {job}: succeeded in" in other.text()
    recorded = outputs_of(done)

    # Woken, the first run finds the job taken back (before its writes, or at the final
    # compare-and-set) and drops its outputs.
    frozen.signal(signal.SIGCONT)
    wait_log(frozen, f"prediction {job}: no longer this worker's (taken back); its outputs were dropped")
    assert f"prediction {job}: succeeded in" not in frozen.text()
    after = api.get(job)
    assert after["status"] == "success" and outputs_of(after) == recorded, after
    settle(c, api, [job])
    assert frozen.alive(), frozen.text()  # a fenced run is no reason to die
    assert_no_traceback(*c.procs)


def test_sigterm_drains_the_running_job_then_leaves(deployment: Cluster) -> None:
    c = deployment
    api = c.node("api")
    draining = c.worker("draining")
    draining_id = worker_id(draining)
    listed = c.cli("workers")
    assert listed.returncode == 0 and draining_id in listed.stdout, listed

    running = api.create_id(**JOB)
    queued = [api.create_id(**JOB) for _ in range(2)]
    step = wait_running(api, running, step=1)["progress"]["step"]
    remaining = (STEPS - step) * STEP_SECONDS
    sent = time.monotonic()
    draining.signal(signal.SIGTERM)
    try:
        code = draining.process.wait(remaining + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the draining worker did not exit:\n{draining.text()}")
    took = time.monotonic() - sent
    assert code == 0, draining.text()
    assert took <= remaining + 5, f"exited {took:.1f} s after SIGTERM, its job had {remaining:.1f} s left"

    finished = api.get(running)
    assert finished["status"] == "success", finished
    assert f"prediction {running}: succeeded in" in draining.text()
    assert stored_job(c, running)["attempt"] == 1
    # It took nothing more on its way out, and left the registry.
    assert [api.get(pid)["status"] for pid in queued] == ["starting", "starting"]
    assert all(f"prediction {pid}:" not in draining.text() for pid in queued)
    listed = c.cli("workers")
    assert listed.returncode == 0 and draining_id not in listed.stdout, listed
    assert "no live workers" in listed.stdout, listed

    successor = c.worker("successor")
    ended = settle(c, api, [running, *queued])
    assert all(p["status"] == "success" for p in ended.values()), ended
    assert all(f"prediction {pid}: started (attempt 1)" in successor.text() for pid in queued)
    assert_no_traceback(*c.procs)


def test_long_poll_survives_its_api_node_dying(deployment: Cluster) -> None:
    c = deployment
    doomed = c.node("doomed")
    other = c.node("other")
    c.worker("w1")
    job = doomed.create_id(**JOB)
    outcome: dict[str, Any] = {}

    def long_poll() -> None:
        try:
            outcome["response"] = httpx.get(
                f"{doomed.url}/v1/prediction/{job}", params={"wait": 30}, headers=doomed.headers(), timeout=40
            )
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    poller = threading.Thread(target=long_poll, daemon=True)
    poller.start()
    wait_running(other, job, step=1)
    assert poller.is_alive() and not outcome, outcome
    doomed.signal(signal.SIGKILL)
    doomed.process.wait(10)
    poller.join(10)
    assert not poller.is_alive(), "the long-poll hung after its node died"
    # The connection broke mid-request (it was held there), not refused before it.
    assert isinstance(outcome.get("error"), httpx.TransportError), outcome
    assert not isinstance(outcome["error"], httpx.ConnectError), outcome

    answer = other.get(job, wait=30)  # the client's retry, on the other node
    assert answer["id"] == job and answer["status"] == "success", answer
    names = outputs_of(answer)
    assert names and names == outputs_of(other.get(job)), answer
    for name in names:
        served = httpx.get(f"{other.url}/files/{name}", headers=other.headers(), timeout=10)
        assert served.status_code == 200, served.text
    settle(c, other, [job])
    assert_no_traceback(*c.procs)


@contextmanager
def restarting(c: Cluster, launcher: Path, slots: int, max_starts: int) -> Iterator[list[int]]:
    """Worker slots restarted whenever their process exits, as systemd's Restart=always
    does (each run its own log), at most ``max_starts`` starts in all. Yields the exit
    codes of the runs that ended."""
    exits: list[int] = []
    stop = threading.Event()
    starts = 0
    lock = threading.Lock()

    def launch(slot: int) -> Proc | None:
        nonlocal starts
        with lock:
            if starts >= max_starts:
                return None
            starts += 1
            name = f"slot{slot}-run{starts}"
        return c.script_worker(name, launcher, env={"TEST_POISON_SEED": str(POISON_SEED)}, wait_ready=False)

    def watch(slot: int, proc: Proc | None) -> None:
        while proc is not None and not stop.is_set():
            code = proc.process.poll()
            if code is None:
                stop.wait(0.05)
                continue
            exits.append(code)
            proc = launch(slot)

    current = [launch(slot) for slot in range(slots)]
    for proc in current:
        assert proc is not None
        wait_log(proc, "ready:", 60)
    watchers = [threading.Thread(target=watch, args=(i, p), daemon=True) for i, p in enumerate(current)]
    for watcher in watchers:
        watcher.start()
    try:
        yield exits
    finally:
        stop.set()
        for watcher in watchers:
            watcher.join(5)


def test_a_job_that_kills_every_worker_fails_as_worker_lost(deployment: Cluster, launcher: Path) -> None:
    c = deployment
    api = c.node("api")
    with restarting(c, launcher, slots=2, max_starts=6) as exits:
        before = [api.create_id(seed=n, **JOB) for n in (1, 2)]
        poison = api.create_id(seed=POISON_SEED, **JOB)
        after = [api.create_id(seed=n, **JOB) for n in (3, 4)]
        ended = settle(c, api, [*before, poison, *after])

        assert ended[poison]["status"] == "error", ended[poison]
        assert ended[poison]["error_code"] == "worker_lost", ended[poison]
        assert attempts_started(c, poison) == [1, 2]  # max_attempts runs, no more
        assert stored_job(c, poison)["attempt"] == 2
        wait_for(lambda: len(exits) >= 2, 10, lambda: f"exits: {exits}\n{c.logs()}")
        assert sorted(exits) == [137, 137], exits
        healthy = [*before, *after]
        assert all(ended[pid]["status"] == "success" for pid in healthy), ended
        # With overlap a healthy job may be in its post stage when the poisoned one kills
        # the process: it is re-run once, never failed (worker/loop.py keeps its last
        # attempt out of the background, and runs a job that lost a worker before alone).
        assert all(attempts_started(c, pid) in ([1], [1, 2]) for pid in healthy), worker_logs(c)
    assert_no_traceback(*c.procs)


class RestartableRedis:
    """A dedicated redis-server (AOF, every write fsynced) that a test stops and starts
    again on the same port with the same dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self._running: ExitStack | None = None

    def start(self) -> str:
        assert self._running is None
        self._running = ExitStack()
        return self._running.enter_context(redis_server(self.data_dir, appendonly=True, port=self.port))

    def stop(self) -> None:
        assert self._running is not None
        running, self._running = self._running, None
        running.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis-data")
    try:
        yield server
    finally:
        if server._running is not None:
            server.stop()


def test_redis_outage_loses_nothing_acknowledged(
    tmp_path: Path, redis_prefix: str, own_redis: RestartableRedis
) -> None:
    url = own_redis.start()
    with cluster(tmp_path, url, redis_prefix, storage_url(tmp_path), **ENV) as c:
        api = c.node("api")
        worker = c.worker("w1")
        # The node reads the worker registry once a second: it sees the worker ready soon.
        wait_for(lambda: api.ready().status_code == 200, 10, lambda: api.ready().text)
        acknowledged = [api.create_id(**JOB) for _ in range(3)]  # one runs, two wait
        wait_running(api, acknowledged[0], step=1)

        own_redis.stop()
        # Down until the running job is done and its worker cannot record the end.
        wait_log(worker, f"prediction {acknowledged[0]}: recording its end failed")
        began = time.monotonic()
        refused = api.create(timeout=15, **JOB)
        took = time.monotonic() - began
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "store_unavailable", refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert took < 3.5, f"a create during the outage took {took:.1f} s"
        began = time.monotonic()
        ready = api.ready()
        took = time.monotonic() - began
        assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
        assert took < 3.5, f"/ready during the outage took {took:.1f} s"

        assert own_redis.start() == url  # the same port, the same AOF
        ended = settle(c, api, acknowledged, timeout=90)
        assert all(p["status"] == "success" for p in ended.values()), ended
        wait_for(lambda: api.ready().status_code == 200, 30, lambda: api.ready().text)
        after = api.create_id(**JOB)
        ended = settle(c, api, [*acknowledged, after])
        assert ended[after]["status"] == "success", ended[after]

        # An outage of the store is an expected fault: logged as a warning, like the
        # worker loop and the webhook sweeper do, not with a stack trace.
        assert "maintenance failed" not in api.text(), api.text()
        assert_no_traceback(*c.procs)

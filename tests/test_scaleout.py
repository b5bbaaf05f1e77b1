"""Scale-out, from outside: API nodes and workers as real processes (each with its own
data dir, as on its own machine) sharing one real redis-server and one storage URL.

What a user of a load-balanced deployment notices: a prediction made through one node
is read, long-polled, cancelled and downloaded through another; limits and queue
positions are exact whichever node counts; a finished job wakes a long-poll on another
node at once; keys made with the command line work everywhere and die everywhere.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
from PIL import Image

from fluxredux.backends.redis.outbox import RedisWebhookOutbox
from tests.cluster import FLUXREDUX, Cluster, Node, cluster, wait_for
from tests.helpers import png_data_uri
from tests.services import free_port, redis_server

FAST = {
    "FLUXREDUX_LEASE_SECONDS": "4",
    "FLUXREDUX_HEARTBEAT_SECONDS": "1",
    "FLUXREDUX_WORKER_TTL_SECONDS": "4",
}


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Cluster]:
    """Processes sharing the session's redis-server (this test's own prefix) and a shared dir."""
    with cluster(tmp_path, redis_url, redis_prefix, f"file://{tmp_path}/shared", **FAST) as deployment:
        yield deployment


def unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_two_nodes_and_two_workers_share_everything_through_redis_and_s3(
    tmp_path: Path, redis_url: str, redis_prefix: str, s3_env: str
) -> None:
    """Separate data dirs, one Redis, one S3 bucket: a prediction created on node A is read,
    long-polled, cancelled and downloaded through node B, and both workers take work."""
    boto3.client("s3").create_bucket(Bucket="scaleout-test")
    with cluster(
        tmp_path,
        redis_url,
        redis_prefix,
        "s3://scaleout-test/outputs",
        FLUXREDUX_FAKE_STEP_SECONDS="0.5",
        **FAST,
    ) as deployment:
        a, b = deployment.node("api-a"), deployment.node("api-b")
        workers = [deployment.worker("worker-1"), deployment.worker("worker-2")]

        made = a.create_id(num_outputs=2, seed=11)
        done = b.get(made, wait=30)  # long-polled through the other node
        assert done["status"] == "success", done
        assert done["id"] == made and done["seed"] == 11 and len(done["output"]) == 2
        on_a = a.get(made)  # the same record through either node; only links name the node
        for field in ("status", "seed", "metrics", "created_at", "completed_at", "logs"):
            assert on_a[field] == done[field]
        assert [u.rsplit("/", 1)[1] for u in on_a["output"]] == [u.rsplit("/", 1)[1] for u in done["output"]]
        for url in done["output"]:  # links name node B; the file comes from S3 through it
            assert url.startswith(b.url)
            image = Image.open(io.BytesIO(httpx.get(url, timeout=10).content))
            assert image.size == (1024, 1024)
        names = {url.rsplit("/", 1)[1] for url in done["output"]}
        stored = {
            o["Key"].rsplit("/", 1)[1]
            for o in boto3.client("s3").list_objects_v2(Bucket="scaleout-test")["Contents"]
        }
        assert names <= stored

        # Cancelled through node B while running on a worker: stops within a step or two.
        long = a.create_id(num_inference_steps=4, num_outputs=1)
        running = b.wait_status(long, {"processing"})
        assert running["status"] == "processing"
        cancelled_at = time.monotonic()
        b.cancel(long)
        ended = a.get(long, wait=10)
        assert ended["status"] == "cancelled", ended
        assert time.monotonic() - cancelled_at < 1.5  # a step is 0.5 s, the job 2 s

        # Both workers take work when there is enough of it.
        jobs = [(a if i % 2 else b).create_id() for i in range(6)]
        assert all(b.get(job, wait=30)["status"] == "success" for job in jobs)
        runners = [w for w in workers if "succeeded in" in w.text()]
        assert len(runners) == 2, deployment.logs()
        assert "Traceback" not in deployment.logs()


def test_limits_and_queue_positions_are_exact_across_nodes(deployment: Cluster) -> None:
    """No worker runs: 12 racing creates over two nodes leave exactly 10 in flight (the
    per-key limit), and each node reports the same exact place in the one queue."""
    a = deployment.node("api-a")
    b = deployment.node("api-b")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: (a, b)[i % 2].create(), range(12)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 10 + [429] * 2, [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 429)
    assert "in flight" in refused.json()["error"] and int(refused.headers["Retry-After"]) >= 1

    accepted = [r.json()["predictionID"] for r in answers if r.status_code == 200]
    by_a = {p: a.get(p)["queue_position"] for p in accepted}
    by_b = {p: b.get(p)["queue_position"] for p in accepted}
    assert by_a == by_b and sorted(by_a.values()) == list(range(10))
    first = min(accepted, key=lambda p: by_a[p])
    b.cancel(first)  # the queue moves up for everyone, whichever node is asked
    assert sorted(a.get(p)["queue_position"] for p in accepted if p != first) == list(range(9))


def test_the_creation_rate_is_one_budget_across_nodes(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with cluster(
        tmp_path,
        redis_url,
        redis_prefix,
        f"file://{tmp_path}/shared",
        FLUXREDUX_RATE_LIMIT_PER_MINUTE="5",
        **FAST,
    ) as deployment:
        nodes = [deployment.node("api-a"), deployment.node("api-b")]
        codes = [nodes[i % 2].create().status_code for i in range(8)]
        assert sorted(codes) == [200] * 5 + [429] * 3, codes


def test_a_long_poll_on_another_node_answers_within_100_ms_of_the_end(deployment: Cluster) -> None:
    """The worker finishes on its machine; the node holding the long-poll is woken by
    Redis pub/sub, not by re-reading on a timer (which would take up to 5 s)."""
    a, b = deployment.node("api-a"), deployment.node("api-b")
    deployment.worker("worker-1", env={"FLUXREDUX_FAKE_STEP_SECONDS": "0.2"})
    delays = []
    for _ in range(5):
        made = a.create_id()
        done = b.get(made, wait=30)
        answered = time.time()  # one machine: the same clock as Redis's TIME
        assert done["status"] == "success"
        delays.append(answered - unix(done["completed_at"]))
    assert statistics.median(delays) < 0.1, delays


def test_an_idle_worker_starts_a_new_job_at_once(deployment: Cluster) -> None:
    """Workers hear "queued" over Redis: no one-second poll between create and start."""
    a = deployment.node("api-a")
    deployment.worker("worker-1")
    waits = []
    for _ in range(5):
        time.sleep(1.2)  # the worker is idle, waiting for news (its poll is 1 s)
        done = a.get(a.create_id(), wait=30)
        waits.append(done["metrics"]["queue_time"])
    assert statistics.median(waits) < 0.2, waits


def test_keys_made_with_the_command_line_work_on_every_node_until_revoked(deployment: Cluster) -> None:
    a, b = deployment.node("api-a"), deployment.node("api-b")
    key = deployment.cli("keys", "create", "--name", "alice").stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    listed = deployment.cli("keys", "list").stdout
    assert key_id in listed and "alice" in listed and key not in listed

    for node in (a, b):
        response = httpx.get(f"{node.url}/v1/prediction/", headers={"X-API-Key": key}, timeout=10)
        assert response.status_code == 200, response.text
    assert deployment.cli("keys", "revoke", key_id).returncode == 0
    for node in (a, b):
        response = httpx.get(f"{node.url}/v1/prediction/", headers={"X-API-Key": key}, timeout=10)
        assert response.status_code == 401


def test_fluxredux_workers_lists_the_deployments_workers(deployment: Cluster) -> None:
    deployment.worker("worker-1")
    deployment.worker("worker-2")
    listed = deployment.cli("workers").stdout
    assert listed.count("ready") == 2, listed
    for proc in deployment.procs:
        assert str(proc.pid) in listed


def test_a_node_without_workers_is_not_ready_but_queues(deployment: Cluster) -> None:
    """No worker yet (they are still coming up): /ready says so, creates wait in the queue
    and run as soon as a worker registers."""
    a = deployment.node("api-a")
    ready = a.ready()
    assert ready.status_code == 503 and any("no live worker" in r for r in ready.json()["reasons"])
    made = a.create_id()
    assert a.get(made)["status"] == "starting"
    deployment.worker("worker-1")
    wait_for(lambda: a.ready().status_code == 200, 10, "never ready")
    assert a.get(made, wait=20)["status"] == "success"


def test_a_worker_needs_redis(tmp_path: Path) -> None:
    done = subprocess.run(
        [FLUXREDUX, "worker", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--redis" in done.stderr


def test_a_bad_redis_url_is_a_plain_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [FLUXREDUX, "keys", "list", "--redis", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "store_unavailable" in done.stderr or "Redis" in done.stderr


def test_serve_with_two_local_workers_runs_two_jobs_at_once(tmp_path: Path) -> None:
    """One machine, two GPUs: `serve --workers 2` (SQLite, no Redis) runs a child per GPU."""
    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [FLUXREDUX, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model", "fake",
         "--workers", "2"],
        stdout=log.open("a"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FLUXREDUX_FAKE_STEP_SECONDS": "0.5", "COLUMNS": "200"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def two_ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/health", timeout=1).json()["model"].get("workers_ready") == 2
            except httpx.HTTPError:
                return False

        wait_for(two_ready, 60, lambda: log.read_text())
        key = re.search(r"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", log.read_text())
        assert key
        node = Node("serve", process, log, url=url, key=key.group(1))
        first, second = node.create_id(), node.create_id()
        wait_for(
            lambda: {node.get(first)["status"], node.get(second)["status"]} == {"processing"},
            10,
            "the two jobs never ran at the same time",
        )
        assert node.get(first, wait=20)["status"] == node.get(second, wait=20)["status"] == "success"
        pids = {w["pid"] for w in httpx.get(url + "/health").json()["model"]["local"]}
        assert len(pids) == 2
    finally:
        process.terminate()
        process.wait(20)


def test_a_node_started_before_redis_answers_503_then_recovers_by_itself(tmp_path: Path) -> None:
    """Machines boot in any order: an API node whose Redis is not up yet still starts, is
    alive but not ready, answers 503 store_unavailable within seconds (never a hang or a
    500), and works as soon as Redis and a worker are there, without a restart."""
    port = free_port()
    with cluster(
        tmp_path, f"redis://127.0.0.1:{port}/0", "late:", f"file://{tmp_path}/shared", **FAST
    ) as deployment:
        deployment.key = "fr_000000000000_no-key-can-be-made-yet"
        node = deployment.node("api-a")
        assert httpx.get(node.url + "/health", timeout=5).status_code == 200
        started = time.monotonic()
        refused = node.create()
        assert refused.status_code == 503 and refused.json()["code"] == "store_unavailable", refused.text
        assert time.monotonic() - started < 4 and int(refused.headers["Retry-After"]) >= 1
        assert node.ready().status_code == 503

        with redis_server(tmp_path / "redis", port=port):
            node.key = deployment.create_key()
            deployment.worker("worker-1")
            wait_for(lambda: node.ready().status_code == 200, 30, deployment.logs)
            assert node.get(node.create_id(), wait=20)["status"] == "success"
            deployment.stop()  # while Redis is still there to say goodbye to
        assert node.alive() is False


def test_workers_recover_a_dead_workers_job_even_with_no_api_node_running(deployment: Cluster) -> None:
    """Leases are reclaimed by the workers themselves, not only by API nodes' maintenance:
    with every API node gone, a killed worker's job is still re-run by another worker."""
    from fluxredux.backends.redis.jobs import RedisJobStore
    from fluxredux.jobs.job import Status

    node = deployment.node("api-a")
    doomed = deployment.worker("worker-1", env={"FLUXREDUX_FAKE_STEP_SECONDS": "10"})  # never done
    made = node.create_id()
    node.wait_status(made, {"processing"})
    node.kill()  # no API node from here on
    deployment.worker("worker-2")
    doomed.kill()
    store = RedisJobStore(deployment.redis_url, prefix=deployment.prefix)
    try:
        wait_for(
            lambda: (job := store.get(made)) is not None and job.status == Status.SUCCEEDED,
            30,
            deployment.logs,
        )
        job = store.get(made)
        assert job is not None and job.attempt == 2
    finally:
        store.close()


def test_a_webhook_is_delivered_once_though_every_node_hears_the_end(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Each API node hears every prediction's end (pub/sub); the stored outbox lets only
    one of them make each try."""
    received: list[tuple[str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["X-FluxRedux-Delivery"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    try:
        with cluster(
            tmp_path,
            redis_url,
            redis_prefix,
            f"file://{tmp_path}/shared",
            FLUXREDUX_ALLOW_PRIVATE_URLS="true",
            **FAST,
        ) as deployment:
            nodes = [deployment.node("api-a"), deployment.node("api-b"), deployment.node("api-c")]
            deployment.worker("worker-1")
            body = {**nodes[0].body(), "webhook_url": hook}
            made = httpx.post(
                f"{nodes[0].url}/v1/prediction/", json=body, headers=nodes[0].headers(), timeout=30
            )
            assert made.status_code == 200, made.text
            prediction_id = made.json()["predictionID"]
            assert nodes[1].get(prediction_id, wait=20)["status"] == "success"
            wait_for(lambda: len(received) >= 1, 10, "no webhook arrived")
            # Its record is final after one try: no node will ever send it again.
            outbox = RedisWebhookOutbox(deployment.redis_url, prefix=deployment.prefix)
            try:
                wait_for(
                    lambda: (d := outbox.get(prediction_id)) is not None and d.state == "delivered", 10, "x"
                )
                delivery = outbox.get(prediction_id)
                assert delivery is not None and delivery.attempts == 1
            finally:
                outbox.close()
            assert [delivery for delivery, _ in received] == [prediction_id]
            assert json.loads(received[0][1])["status"] == "success"
    finally:
        receiver.shutdown()


def test_a_slow_redis_never_stalls_the_event_loop(deployment: Cluster) -> None:
    """Reads are counted against the read limit in Redis: with Redis writes paused, polls
    wait in threads while liveness and everything else on the node still answers."""
    import redis

    node = deployment.node("api-a")
    made = node.create_id()
    client = redis.Redis.from_url(deployment.redis_url)

    def blocked() -> int:  # clients whose command waits for the pause to end
        return int(client.info("clients")["blocked_clients"])

    try:
        # A round whose pause is nearly over before all three polls wait (a slow machine)
        # proves nothing: it is run again.
        for _ in range(5):
            client.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # under the 2 s timeout
            paused, others = time.monotonic(), blocked()
            with ThreadPoolExecutor(3) as pool:
                polls = [pool.submit(node.get, made) for _ in range(3)]
                while not (waiting := blocked() - others >= 3) and time.monotonic() - paused < 1.0:
                    time.sleep(0.01)
                if waiting:  # the polls are now waiting on Redis
                    started = time.monotonic()
                    assert httpx.get(node.url + "/health", timeout=10).status_code == 200
                    assert time.monotonic() - started < 1.0
                assert all(poll.result()["id"] == made for poll in polls)
            if waiting:
                break
        else:
            raise AssertionError("the three polls never waited on Redis at once (a blocked event loop?)")
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()


def test_a_node_with_no_key_yet_says_how_to_make_one(deployment: Cluster) -> None:
    """Nodes starting together must not each invent a key: with Redis none is made."""
    deployment.key = "fr_000000000000_none-yet"
    node = deployment.node("api-a")
    wait_for(lambda: "no API key exists yet" in node.text(), 10, node.text)
    assert "fluxredux keys create" in node.text()
    listed = deployment.cli("keys", "list")
    assert listed.returncode == 0 and listed.stdout.strip() == ""


def test_sigterm_while_the_model_loads_exits_at_once_and_leaves(deployment: Cluster) -> None:
    """The real model takes minutes to load: a worker told to stop meanwhile goes now."""
    from fluxredux.backends.redis.registry import RedisWorkerRegistry

    registry = RedisWorkerRegistry(deployment.redis_url, prefix=deployment.prefix)
    try:
        loading = deployment.worker("worker-1", env={"FLUXREDUX_MODEL": "demo"}, wait_ready=False)
        wait_for(lambda: [w.state for w in registry.workers()] == ["loading"], 30, loading.text)
        stopped = time.monotonic()
        loading.signal(signal.SIGTERM)
        assert loading.process.wait(10) == 0
        assert time.monotonic() - stopped < 3, loading.text()
        assert "ready:" not in loading.text()
        assert registry.workers() == []
    finally:
        registry.close()


def test_settings_that_cannot_work_are_refused_plainly(tmp_path: Path) -> None:
    for args, expected in [
        (["serve", "--workers", "0"], "workers=0 needs redis_url"),  # nobody would run the jobs
        (["keys", "list", "--redis", "localhost:6379"], "must be redis://HOST:PORT/DB"),
        (["worker", "--redis", "http://redis:6379"], "must be redis://HOST:PORT/DB"),
    ]:
        done = subprocess.run(
            [FLUXREDUX, *args, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_uploads_and_share_links_work_through_any_node(deployment: Cluster) -> None:
    """An upload made through one node is a valid reference on another; a share link made
    on one opens on every node, and revoking it anywhere closes it everywhere."""
    a, b = deployment.node("api-a"), deployment.node("api-b")
    deployment.worker("worker-1")
    image = base64.b64decode(png_data_uri().split(",", 1)[1])
    uploaded = httpx.post(
        f"{a.url}/v1/files", files={"file": ("ref.png", image, "image/png")}, headers=a.headers(), timeout=10
    )
    assert uploaded.status_code == 200, uploaded.text
    made = httpx.post(
        f"{b.url}/v1/prediction/",
        json={"model": "flux-redux-schnell", "input": {"redux_image": uploaded.json()["id"]}},
        headers=b.headers(),
        timeout=30,
    )
    assert made.status_code == 200, made.text
    prediction_id = made.json()["predictionID"]
    assert a.get(prediction_id, wait=20)["status"] == "success"

    shared = httpx.post(f"{b.url}/v1/prediction/{prediction_id}/share", headers=b.headers(), timeout=10)
    assert shared.status_code == 200, shared.text
    token = shared.json()["token"]
    for node in (a, b):
        assert httpx.get(f"{node.url}/v1/share/{token}", timeout=10).json()["status"] == "success"
        assert httpx.get(f"{node.url}/p/{token}", timeout=10).status_code == 200
    assert httpx.delete(f"{a.url}/v1/share/{token}", headers=a.headers(), timeout=10).status_code == 204
    for node in (a, b):
        assert httpx.get(f"{node.url}/v1/share/{token}", timeout=10).status_code == 404


def test_the_demo_model_runs_behind_redis_and_s3(
    tmp_path: Path, redis_url: str, redis_prefix: str, s3_env: str, model_cache_dir: Path
) -> None:
    """The real model code path (the demo model, loaded by the real loader) on a worker of
    a scale-out deployment: inputs and outputs through S3, state through Redis."""
    boto3.client("s3").create_bucket(Bucket="scaleout-demo")
    with cluster(
        tmp_path,
        redis_url,
        redis_prefix,
        "s3://scaleout-demo/files",
        FLUXREDUX_MODEL="demo",
        FLUXREDUX_CACHE_DIR=str(model_cache_dir),
        **FAST,
    ) as deployment:
        node = deployment.node("api-a")
        deployment.worker("worker-1")
        made = node.create_id(megapixels="0.25", aspect_ratio="16:9", num_outputs=2, seed=5)
        done = node.get(made, wait=60)
        assert done["status"] == "success" and done["demo"] is True, done
        sizes = [Image.open(io.BytesIO(httpx.get(url, timeout=10).content)).size for url in done["output"]]
        assert sizes == [(672, 384), (672, 384)]
        again = node.get(
            node.create_id(megapixels="0.25", aspect_ratio="16:9", num_outputs=2, seed=5), wait=60
        )
        assert [httpx.get(u).content for u in again["output"]] == [
            httpx.get(u).content for u in done["output"]
        ]


def test_a_stream_on_one_node_follows_a_job_that_a_worker_anywhere_runs(deployment: Cluster) -> None:
    """Created on node A, streamed from node B, run by a worker of neither: each step's
    event reaches B over Redis as it happens, not when the job is over."""
    a, b = deployment.node("api-a"), deployment.node("api-b")
    deployment.worker("worker-1", env={"FLUXREDUX_FAKE_STEP_SECONDS": "0.5"})
    made = a.create_id(num_inference_steps=4)
    received: list[tuple[str, dict[str, object], float]] = []
    with httpx.stream(
        "GET", f"{b.url}/v1/prediction/{made}/stream", headers=b.headers(), timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        name = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                received.append((name, json.loads(line.partition(":")[2]), time.time()))
                if name in ("done", "failed", "canceled"):
                    break
    names = [name for name, _, _ in received]
    assert names[-1] == "done" and received[-1][1]["status"] == "success", names
    steps = [(data["step"], at) for name, data, at in received if name == "step"]
    assert [step for step, _ in steps] == [1, 2, 3, 4]
    # One machine: the same clock as Redis's TIME, which stamped completed_at.
    ended = unix(str(received[-1][1]["completed_at"]))
    assert steps[0][1] < ended, "the first step was told only after the job had ended"

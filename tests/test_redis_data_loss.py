"""A Redis that restarts empty, for real: a redis-server with neither AOF nor RDB snapshots
killed with SIGKILL and started again on the same port. Every queued prediction and every
API key is gone; the deployment must say so (/ready 503 naming the loss, the worker's log)
rather than report itself ready and answer every caller 401.

And the other side: a Redis with an AOF restarted the same way keeps everything, the
deployment's marker included, and stays ready; a fresh empty Redis at first start is not
a loss; a Redis whose CONFIG command is disabled (as managed services do) is no obstacle.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.cluster import Cluster, Node, Proc, cluster, wait_for
from tests.services import RedisProcess

ENV = {
    "FLUXREDUX_LEASE_SECONDS": "3",
    "FLUXREDUX_HEARTBEAT_SECONDS": "1",
    "FLUXREDUX_WORKER_TTL_SECONDS": "3",
    # Slow enough that the job below is still queued or running when Redis dies.
    "FLUXREDUX_FAKE_STEP_SECONDS": "0.5",
}
JOB = {"num_inference_steps": 4, "megapixels": "0.25"}


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisProcess]:
    """A redis-server of this test's own: ``appendonly`` from the test's parameter, or off."""
    options: dict[str, Any] = getattr(request, "param", {})
    server = RedisProcess(tmp_path / "redis-data", **{"appendonly": False, **options})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployment(tmp_path: Path, redis_prefix: str, own_redis: RedisProcess) -> Iterator[Cluster]:
    url = own_redis.start()
    with cluster(tmp_path, url, redis_prefix, f"file://{tmp_path / 'storage'}", **ENV) as deployed:
        yield deployed


def ready_json(node: Node) -> tuple[int, dict[str, Any]]:
    response = httpx.get(node.url + "/ready", timeout=10)
    return response.status_code, dict(response.json())


def wait_ready(node: Node, timeout: float = 30) -> None:
    wait_for(lambda: ready_json(node)[0] == 200, timeout, lambda: str(ready_json(node)))


def health_store(node: Node) -> dict[str, Any]:
    return dict(httpx.get(node.url + "/health", timeout=10).json()["store"])


def wait_log(proc: Proc, text: str, timeout: float = 30) -> None:
    wait_for(
        lambda: text in proc.text(), timeout, lambda: f"{proc.name} never logged {text!r}:\n{proc.text()}"
    )


def start(c: Cluster) -> tuple[Node, Proc]:
    api = c.node("api")
    worker = c.worker("w1")
    wait_ready(api)  # a fresh, empty Redis at first start is no loss: the marker is written then
    return api, worker


def test_a_redis_without_persistence_that_restarts_empty_is_reported_as_data_loss(
    deployment: Cluster, own_redis: RedisProcess
) -> None:
    c = deployment
    api, worker = start(c)
    queued = api.create_id(**JOB)

    own_redis.kill()
    own_redis.start()  # the same port, nothing kept

    def says_lost() -> bool:
        status, body = ready_json(api)
        return status == 503 and any("Redis lost its data" in reason for reason in body["reasons"])

    wait_for(says_lost, 30, lambda: f"{ready_json(api)}\n{c.logs()}")
    # The key is gone with the rest: the caller hears why, not a 401 for a key that was valid.
    answer = httpx.get(f"{api.url}/v1/prediction/{queued}", headers=api.headers(), timeout=10)
    assert answer.status_code == 503, answer.text
    assert "Redis lost its data" in answer.json()["error"] and int(answer.headers["Retry-After"]) >= 1
    # The worker says so in its log, loudly, and keeps running.
    wait_log(worker, "Redis lost its data")
    assert worker.alive(), worker.text()
    assert ready_json(api)[0] == 503  # it stays said: nothing brings the lost data back

    # Said at start too: this Redis keeps nothing across a restart.
    store = health_store(api)
    assert store["engine"] == "redis" and store["persistence"] == "none", store
    assert "appendonly" in store["warning"], store
    assert (
        "neither an AOF nor RDB snapshots" in api.text()
        and "neither an AOF nor RDB snapshots" in worker.text()
    )
    assert "Traceback" not in c.logs(), c.logs()


@pytest.mark.parametrize("own_redis", [{"appendonly": True}], indirect=True)
def test_a_redis_with_an_aof_that_restarts_keeps_its_marker_and_stays_ready(
    deployment: Cluster, own_redis: RedisProcess
) -> None:
    c = deployment
    api, _worker = start(c)
    store = health_store(api)
    assert store["persistence"] == "aof" and store["warning"] is None, store
    made = api.create_id(**JOB)
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        assert client.exists(f"{c.prefix}deployment") == 1
        own_redis.kill()  # every write was fsynced to the AOF (appendfsync always)
        own_redis.start()
        assert client.exists(f"{c.prefix}deployment") == 1
    finally:
        client.close()

    wait_ready(api)
    assert api.get(made, wait=30)["status"] == "success"  # the same key, the same job
    assert all(ready_json(api)[0] == 200 for _ in range(3))
    assert "lost its data" not in c.logs(), c.logs()
    assert "Traceback" not in c.logs(), c.logs()


@pytest.mark.parametrize("own_redis", [{"extra_args": ["--rename-command", "CONFIG", ""]}], indirect=True)
def test_a_redis_whose_config_command_is_disabled_is_no_obstacle(deployment: Cluster) -> None:
    api, _worker = start(deployment)
    store = health_store(api)
    assert store["engine"] == "redis" and store["persistence"] == "unknown", store
    assert api.get(api.create_id(**JOB), wait=30)["status"] == "success"
    assert "Traceback" not in deployment.logs(), deployment.logs()


@pytest.mark.parametrize(
    "own_redis", [{"extra_args": ["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]}], indirect=True
)
def test_a_redis_that_may_evict_keys_is_warned_about(deployment: Cluster) -> None:
    """Under memory pressure an evicting Redis deletes whatever it likes: a queued job, a
    result, an API key, the deployment's marker. Each process says so at start, and
    /health shows it (a Redis that never evicts, as in the AOF test above, gets no warning)."""
    api, worker = start(deployment)
    store = health_store(api)
    assert "maxmemory-policy allkeys-lru" in str(store["warning"]), store
    assert "noeviction" in str(store["warning"]), store
    assert "maxmemory-policy allkeys-lru" in api.text() and "maxmemory-policy allkeys-lru" in worker.text()
    assert api.get(api.create_id(**JOB), wait=30)["status"] == "success"  # a warning, no refusal

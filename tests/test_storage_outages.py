"""An object store that hangs, for real: moto's S3 server frozen with SIGSTOP. It still
accepts connections (the kernel completes them) and then answers nothing, as a wedged or
partitioned endpoint does; which is worse than one that is down, where a connection is
refused at once.

A scale-out deployment of real processes (tests/cluster.py: an API node and a worker,
Redis, the frozen bucket). Readiness answers within its own budget and names what is slow;
creates, which must store their reference image, are a quick 503 with Retry-After; and a
freeze shorter than the lease fails no prediction that was accepted before it: the worker
rides it out (it still holds the images it made) and every one succeeds exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.cluster import TERMINAL, Cluster, Node, cluster, wait_for
from tests.conftest import point_aws_at
from tests.services import s3_server_process

STEPS = 4
JOB = {"num_inference_steps": STEPS, "megapixels": "0.25"}
ENV = {
    # A storage call gives up after two tries of 1.5 s: the outage is seen quickly, and a
    # readiness probe of the storage always outlasts /ready's 2 s budget while it lasts.
    "FLUXREDUX_STORAGE_TIMEOUT_SECONDS": "1.5",
    "FLUXREDUX_FAKE_STEP_SECONDS": "0.3",
    "FLUXREDUX_LEASE_SECONDS": "30",
    "FLUXREDUX_HEARTBEAT_SECONDS": "2",
    "FLUXREDUX_WORKER_TTL_SECONDS": "6",
}
# Longer than a storage call takes to give up even with the old, long timeouts (3 tries of
# 5 s): an accepted prediction must survive it by being retried, not by a patient socket.
# Shorter than the lease, so the job stays this worker's throughout.
FREEZE_SECONDS = 24.0


@dataclass
class FreezableS3:
    endpoint: str
    process: subprocess.Popen[bytes]
    bucket: str

    @contextmanager
    def frozen(self) -> Iterator[None]:
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def keys(self) -> set[str]:
        listed = boto3.client("s3").list_objects_v2(Bucket=self.bucket, Prefix="files/")
        return {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}


@pytest.fixture
def freezable_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FreezableS3]:
    """An S3 server of this test's own (freezing the session's would stall other tests),
    with the standard AWS variables pointed at it for this test and its processes."""
    nothing = tmp_path / "no-aws-config"
    with s3_server_process() as (endpoint, process):
        point_aws_at(monkeypatch, endpoint, nothing)
        boto3.client("s3").create_bucket(Bucket="outage-test")
        yield FreezableS3(endpoint, process, "outage-test")


@pytest.fixture
def deployment(
    tmp_path: Path, redis_url: str, redis_prefix: str, freezable_s3: FreezableS3
) -> Iterator[Cluster]:
    with cluster(tmp_path, redis_url, redis_prefix, f"s3://{freezable_s3.bucket}/files", **ENV) as deployed:
        yield deployed


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def ready_now(node: Node) -> httpx.Response:
    # A generous client timeout: the server's own budget is what is under test.
    return httpx.get(node.url + "/ready", timeout=60)


def outputs_of(prediction: dict[str, Any]) -> list[str]:
    output = prediction["output"] or []
    return [url.rsplit("/", 1)[1] for url in ([output] if isinstance(output, str) else output)]


def test_a_frozen_object_store_costs_ready_and_creates_seconds_not_a_hang(
    deployment: Cluster, freezable_s3: FreezableS3
) -> None:
    c = deployment
    api = c.node("api")
    c.worker("w1")
    wait_for(lambda: ready_now(api).status_code == 200, 30, lambda: ready_now(api).text)

    with freezable_s3.frozen():
        # /ready answers within its budget (2 s; the bound leaves room for a loaded
        # machine) and says which check did not answer, while the others still report.
        ready, took = timed(lambda: ready_now(api))
        assert ready.status_code == 503, ready.text
        assert took < 5, f"/ready took {took:.1f} s with the object store frozen"
        assert ready.json()["reasons"] == ["storage: no answer within 2 s"], ready.json()
        assert int(ready.headers["Retry-After"]) >= 1
        # Asked again, it waits on the probe still running (no second one piles up): that
        # one has not answered yet, or has failed by its own timeouts by now.
        ready, took = timed(lambda: ready_now(api))
        assert ready.status_code == 503 and took < 5, (took, ready.text)
        [reason] = ready.json()["reasons"]
        assert reason == "storage: no answer within 2 s" or "object storage cannot be written" in reason

        # A create must store its reference image first: a quick 503 to retry, not a hold.
        refused, took = timed(lambda: api.create(timeout=60, **JOB))
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "storage_error", refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        # Two tries of 1.5 s (FLUXREDUX_STORAGE_TIMEOUT_SECONDS) and a backoff of at most 1 s.
        assert took < 10, f"a create took {took:.1f} s with the object store frozen"

    wait_for(lambda: ready_now(api).status_code == 200, 30, lambda: ready_now(api).text)
    done = api.get(api.create_id(**JOB), wait=30)
    assert done["status"] == "success", done
    assert "Traceback" not in c.logs(), c.logs()


def test_a_short_object_store_freeze_fails_no_accepted_prediction(
    deployment: Cluster, freezable_s3: FreezableS3
) -> None:
    c = deployment
    api = c.node("api")
    worker = c.worker("w1")
    accepted = [api.create_id(seed=n, **JOB) for n in range(6)]
    # The first is running: its outputs, and the next jobs' reference images, meet the freeze.
    wait_for(lambda: api.get(accepted[0])["status"] == "processing", 30, lambda: str(api.get(accepted[0])))
    with freezable_s3.frozen():
        time.sleep(FREEZE_SECONDS)

    ended = {pid: api.wait_status(pid, TERMINAL, 120) for pid in accepted}
    outcomes = {pid: (p["status"], p.get("error")) for pid, p in ended.items()}
    assert all(status == "success" for status, _error in outcomes.values()), f"{outcomes}\n{worker.text()}"
    for pid in accepted:  # exactly once: one run recorded its success, no second one
        assert worker.text().count(f"prediction {pid}: succeeded in") == 1, worker.text()
        assert f"prediction {pid}: started (attempt 2)" not in worker.text(), worker.text()
    assert "retrying" in worker.text(), worker.text()  # it did meet the freeze, and said so
    # Every output the predictions name is stored (under the key the worker chose once).
    names = {name for p in ended.values() for name in outputs_of(p)}
    assert len(names) == len(accepted) and names <= freezable_s3.keys()
    wait_for(lambda: ready_now(api).status_code == 200, 30, lambda: ready_now(api).text)
    assert worker.alive() and "Traceback" not in c.logs(), c.logs()

"""Adapter affinity: with several workers, a job that wants a LoRA goes to an idle worker
that has it loaded, and never waits for one while another worker is free.

The claims run on every engine (the store and the registry of one deployment, as two
workers on two machines see them); the last tests run ``serve --workers 2`` on the demo
model, with real adapters, and freeze its workers (SIGSTOP) to fix who claims first.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fluxredux.jobs import JobStore, Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.registry import WorkerInfo, WorkerRegistry
from fluxredux.worker.affinity import PATIENCE_SECONDS, Affinity, pick
from tests.backends import Engine
from tests.helpers import FakeClock
from tests.loras import tiny_lora
from tests.test_faults import Server, serve

SEAM = "jobs"
TTL = 15.0


def job_wanting(clock: FakeClock, *adapters: str) -> Job:
    clock.now += 0.01
    uses = [{"name": name, "scale": 1.0} for name in adapters]
    job_input: dict[str, object] = {"num_outputs": 1, **({"loras": uses} if uses else {})}
    return Job(id=new_id(), owner="k1", input=job_input, created_at=clock.now)


# --- the choice itself ------------------------------------------------------------------


def test_a_job_is_left_to_the_idle_peer_that_has_its_adapter(clock: FakeClock) -> None:
    ink = job_wanting(clock, "ink")
    assert pick([ink], mine=frozenset(), idle_peers=[frozenset({"ink"})], now=clock.now) is None
    assert pick([ink], mine=frozenset({"ink"}), idle_peers=[frozenset()], now=clock.now) is ink
    # No idle peer (the one with "ink" is busy): this worker takes it at once.
    assert pick([ink], mine=frozenset(), idle_peers=[], now=clock.now) is ink


def test_each_idle_peer_is_left_one_job_and_the_rest_are_taken(clock: FakeClock) -> None:
    first, second = job_wanting(clock, "ink"), job_wanting(clock, "ink")
    assert pick([first, second], mine=frozenset(), idle_peers=[frozenset({"ink"})], now=clock.now) is second


def test_the_adapter_holder_takes_its_job_and_leaves_an_older_plain_one_to_its_peer(
    clock: FakeClock,
) -> None:
    plain, ink = job_wanting(clock), job_wanting(clock, "ink")
    holder, other = frozenset({"ink"}), frozenset[str]()
    assert pick([plain, ink], mine=holder, idle_peers=[other], now=clock.now) is ink
    assert pick([plain, ink], mine=other, idle_peers=[holder], now=clock.now) is plain


def test_the_better_fit_wins_by_adapters_loaded_for_the_job(clock: FakeClock) -> None:
    both = job_wanting(clock, "ink", "moss")
    assert (
        pick([both], mine=frozenset({"ink"}), idle_peers=[frozenset({"ink", "moss"})], now=clock.now) is None
    )
    assert (
        pick([both], mine=frozenset({"ink", "moss"}), idle_peers=[frozenset({"ink"})], now=clock.now) is both
    )


def test_a_job_that_waited_its_patience_is_taken_by_whoever_comes(clock: FakeClock) -> None:
    ink = job_wanting(clock, "ink")
    later = ink.created_at + PATIENCE_SECONDS
    assert pick([ink], mine=frozenset(), idle_peers=[frozenset({"ink"})], now=later) is ink


# --- claims on every engine ---------------------------------------------------------------


class Fleet:
    """One deployment's job store and registry, and workers claiming from them."""

    def __init__(
        self, engine: Engine, request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
    ) -> None:
        self.clock = clock
        self.store: JobStore = engine.open()
        registries = Engine(engine.name, "registry", request, tmp_path, clock)
        engine.later(registries.close)
        self.registry: WorkerRegistry = registries.open()
        self.lifecycle = Lifecycle(self.store)
        self.loaded: dict[str, list[str]] = {}

    def worker(self, worker_id: str, *adapters: str) -> Affinity:
        """A ready worker with ``adapters`` loaded, registered as its process does it."""
        self.loaded[worker_id] = list(adapters)
        affinity = Affinity(
            worker_id,
            self.store,
            self.registry,
            loaded=lambda: self.loaded[worker_id],
            announce=lambda: self.register(worker_id),
            ttl=TTL,
        )
        self.register(worker_id)
        return affinity

    def register(self, worker_id: str) -> None:
        details = {"loras": {"loaded": self.loaded[worker_id]}}
        self.registry.register(WorkerInfo(worker_id, "gpu", 1, "demo", "cpu", "ready", 1.0, details=details))

    def queue(self, *adapters: str) -> Job:
        job = job_wanting(self.clock, *adapters)
        self.lifecycle.create(job)
        return job

    def claim(self, worker: Affinity) -> Job | None:
        return self.lifecycle.claim(worker.worker_id, 30, worker.choose)


@pytest.fixture
def fleet(engine: Engine, request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Fleet:
    return Fleet(engine, request, tmp_path, clock)


def test_the_worker_without_the_adapter_leaves_the_job_to_the_idle_one_with_it(fleet: Fleet) -> None:
    holder, other = fleet.worker("w-ink", "ink"), fleet.worker("w-plain")
    ink = fleet.queue("ink")
    assert fleet.claim(other) is None  # first to look, and it leaves the job
    claimed = fleet.claim(holder)
    assert claimed is not None and (claimed.id, claimed.lease_owner) == (ink.id, "w-ink")


def test_a_job_never_waits_for_a_busy_adapter_holder_while_another_worker_is_free(fleet: Fleet) -> None:
    holder, other = fleet.worker("w-ink", "ink"), fleet.worker("w-plain")
    fleet.queue()
    assert fleet.claim(holder) is not None  # the holder is busy now: its lease says so
    ink = fleet.queue("ink")
    claimed = fleet.claim(other)
    assert claimed is not None and (claimed.id, claimed.status) == (ink.id, Status.PROCESSING)


def test_two_workers_idle_each_take_the_job_that_fits_it(fleet: Fleet) -> None:
    holder, other = fleet.worker("w-ink", "ink"), fleet.worker("w-plain")
    plain, ink = fleet.queue(), fleet.queue("ink")
    # The holder claims first, yet takes the younger job: the older one is its peer's.
    claimed = [fleet.claim(holder), fleet.claim(other)]
    assert [(job.id, job.lease_owner) for job in claimed if job] == [(ink.id, "w-ink"), (plain.id, "w-plain")]


def test_a_peer_that_stopped_heartbeating_is_not_waited_for(fleet: Fleet) -> None:
    fleet.worker("w-ink", "ink")
    fleet.clock.now += TTL + 1  # its entry is older than the ttl: gone
    other = fleet.worker("w-plain")
    ink = fleet.queue("ink")
    claimed = fleet.claim(other)
    assert claimed is not None and claimed.id == ink.id


def test_a_job_left_to_a_peer_that_never_claims_is_taken_after_the_patience(fleet: Fleet) -> None:
    fleet.worker("w-ink", "ink")  # idle in the registry, but it never comes
    other = fleet.worker("w-plain")
    ink = fleet.queue("ink")
    assert fleet.claim(other) is None
    fleet.clock.now += PATIENCE_SECONDS
    claimed = fleet.claim(other)
    assert claimed is not None and claimed.id == ink.id


def test_a_worker_announces_a_newly_loaded_adapter_at_its_next_claim(fleet: Fleet) -> None:
    holder, other = fleet.worker("w-ink"), fleet.worker("w-plain")
    fleet.loaded["w-ink"] = ["ink"]  # it ran a job with "ink": the registry does not know yet
    assert fleet.claim(holder) is None  # nothing queued, but the claim announces it
    ink = fleet.queue("ink")
    assert fleet.claim(other) is None
    claimed = fleet.claim(holder)
    assert claimed is not None and claimed.id == ink.id


class UnreadableRegistry:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the registry was asked for {name}")


def test_plain_jobs_are_claimed_oldest_first_with_no_reads_of_the_registry(fleet: Fleet) -> None:
    worker = Affinity(
        "w-ink",
        fleet.store,
        UnreadableRegistry(),
        loaded=list,
        announce=lambda: None,
        ttl=TTL,  # type: ignore[arg-type]
    )
    first, second = fleet.queue(), fleet.queue()
    claimed = [fleet.claim(worker), fleet.claim(worker)]
    assert [job.id for job in claimed if job] == [first.id, second.id]


# --- two real workers -----------------------------------------------------------------------

INK = [{"name": "ink", "scale": 1.0}]


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Server]:
    """``serve --workers 2`` on the demo model, with the adapter "ink", both workers ready."""
    loras = tmp_path / "loras"
    loras.mkdir()
    tiny_lora(loras / "ink.safetensors", seed=1)
    env = {"FLUXREDUX_WORKERS": "2", "FLUXREDUX_LORA_DIR": str(loras), "FLUXREDUX_HEARTBEAT_SECONDS": "0.5"}
    with serve(tmp_path, model="demo", env=env) as server:
        server.wait_for(lambda: server.health()["model"]["workers_ready"] == 2, 120, "2 workers never ready")
        yield server


def succeeded(server: Server, prediction_id: str) -> None:
    deadline = time.monotonic() + 120
    while (status := server.get(prediction_id, wait=10)["status"]) != "success":
        assert status not in ("error", "canceled") and time.monotonic() < deadline, server.get(prediction_id)


def adapter_holder(server: Server) -> tuple[int, int]:
    """(the pid of the worker that has "ink" loaded, the other's), once the registry says so."""
    server.wait_for(
        lambda: sum(w["loras"] == ["ink"] for w in server.health()["model"]["local"]) == 1,
        30,
        "no worker ever said it had ink loaded",
    )
    local = server.health()["model"]["local"]
    [holder] = [w["pid"] for w in local if w["loras"] == ["ink"]]
    [other] = [w["pid"] for w in local if w["loras"] != ["ink"]]
    return holder, other


def adapter_counts(server: Server, runs: int) -> tuple[float, float]:
    """The fleet's adapter (loads, cache hits), once they count all ``runs`` adapter uses
    (each worker's counters reach /metrics through the registry, within a heartbeat)."""

    def total(name: str) -> float:
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{")
        )

    server.wait_for(
        lambda: total("fluxredux_lora_loads_total") + total("fluxredux_lora_cache_hits_total") == runs,
        30,
        f"the metrics never counted {runs} adapter uses",
    )
    return total("fluxredux_lora_loads_total"), total("fluxredux_lora_cache_hits_total")


def test_the_worker_with_the_adapter_takes_its_job_though_it_claims_first_and_an_older_job_waits(
    two_workers: Server,
) -> None:
    server = two_workers
    succeeded(server, server.create_id(loras=INK))
    holder, other = adapter_holder(server)
    # Both frozen while two jobs queue, then the holder resumes first: the oldest job
    # (no adapter) is its idle peer's, and it takes the one it has the adapter for.
    os.kill(holder, signal.SIGSTOP)
    os.kill(other, signal.SIGSTOP)
    try:
        plain, inked = server.create_id(), server.create_id(loras=INK)
    finally:
        os.kill(holder, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(other, signal.SIGCONT)
    succeeded(server, plain)
    succeeded(server, inked)
    assert adapter_counts(server, runs=2) == (1, 1)  # no second load: it ran where "ink" was
    assert sorted(w["loras"] for w in server.health()["model"]["local"]) == [[], ["ink"]]


def test_a_frozen_adapter_holder_does_not_keep_its_job_waiting_for_long(two_workers: Server) -> None:
    server = two_workers
    succeeded(server, server.create_id(loras=INK))
    holder, _ = adapter_holder(server)
    os.kill(holder, signal.SIGSTOP)  # idle in the registry, but it will not come
    try:
        started = time.monotonic()
        succeeded(server, server.create_id(loras=INK))
        waited = time.monotonic() - started
    finally:
        os.kill(holder, signal.SIGCONT)
    assert adapter_counts(server, runs=2) == (2, 0)  # the other worker loaded it and ran the job
    assert waited < 60  # generous: patience (2 s) and a poll; the point is that it ran

"""What an API node says about workers it does not run (the registry's view), and how
local workers are spread over this machine's GPUs."""

from __future__ import annotations

import pytest

from fluxredux.backends.memory.registry import MemoryWorkerRegistry
from fluxredux.errors import ModelUnavailable
from fluxredux.jobs.registry import WorkerInfo
from fluxredux.worker.monitor import WorkerFleet
from fluxredux.worker.supervisor import gpu_of


def register(registry: MemoryWorkerRegistry, worker_id: str, state: str, **details: object) -> None:
    registry.register(
        WorkerInfo(worker_id, "gpu-host", 1, "FLUX", "cuda:0", state, 0.0, details=dict(details))  # type: ignore[arg-type]
    )


def fleet_of(registry: MemoryWorkerRegistry) -> WorkerFleet:
    fleet = WorkerFleet(registry, ttl=15)
    fleet.refresh()
    return fleet


def test_no_worker_yet_queues_but_is_not_ready() -> None:
    fleet = fleet_of(MemoryWorkerRegistry())
    assert fleet.refusal() is None  # workers may still be coming up: jobs wait in the queue
    assert fleet.status()["ready"] is False


def test_a_ready_worker_makes_the_fleet_ready() -> None:
    registry = MemoryWorkerRegistry()
    register(registry, "w1", "ready", demo=True, notice="demo")
    register(registry, "w2", "loading")
    fleet = fleet_of(registry)
    assert fleet.problems() == [] and fleet.refusal() is None
    assert fleet.status() | {"description": None} == {
        "ready": True, "workers": 2, "workers_ready": 1, "description": None, "demo": True, "notice": "demo",
        "loras": [],
        "previews": False,
    }  # fmt: skip


def test_the_fleet_lists_the_adapters_its_ready_workers_have_loaded() -> None:
    registry = MemoryWorkerRegistry()
    register(registry, "w1", "ready", loras={"loaded": ["ink"], "loads": 1, "hits": 0})
    register(registry, "w2", "ready", loras={"loaded": ["moss", "ink"], "loads": 2, "hits": 5})
    register(registry, "w3", "loading", loras={"loaded": ["rust"]})  # not ready: runs nothing yet
    register(registry, "w4", "ready", loras={"loaded": "garbled"})  # another machine's bad entry
    assert fleet_of(registry).status()["loras"] == ["ink", "moss"]


def test_a_worker_that_cannot_store_outputs_does_not_count_as_ready() -> None:
    registry = MemoryWorkerRegistry()
    register(registry, "w1", "ready", storage_error="outputs could not be written: disk full")
    fleet = fleet_of(registry)
    assert fleet.status()["ready"] is False
    assert any("w1 cannot store outputs: outputs could not be written" in p for p in fleet.problems())
    assert fleet.refusal() is None  # its jobs fail with storage_error, named; nothing is hidden


def test_when_every_live_worker_failed_to_load_creates_are_refused() -> None:
    registry = MemoryWorkerRegistry()
    register(registry, "w1", "failed", error={"error": "weights not found in /models"})
    fleet = fleet_of(registry)
    refusal = fleet.refusal()
    assert isinstance(refusal, ModelUnavailable) and "weights not found" in refusal.message
    register(registry, "w2", "loading")
    fleet.refresh()
    assert fleet.refusal() is None  # another may still come up


@pytest.mark.parametrize(
    ("index", "visible", "gpu"),
    [
        (0, None, "0"),  # all GPUs: one each, in order
        (3, None, "3"),
        (1, "4,5,6", "5"),  # the index-th of those allowed
        (1, " 4, 5 ", "5"),
        (3, "4,5", "5"),  # more workers than GPUs: handed out again (serve warns)
        (0, "", None),  # explicitly none: left alone, no worker gets a GPU
    ],
)
def test_each_local_worker_gets_its_own_gpu(index: int, visible: str | None, gpu: str | None) -> None:
    assert gpu_of(index, visible) == gpu

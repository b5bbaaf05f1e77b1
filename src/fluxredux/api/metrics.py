"""Prometheus metrics, in a registry of this app's own (no process-wide globals)."""

from __future__ import annotations

from collections import Counter as CollectionsCounter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fluxredux.jobs.job import Status
from fluxredux.jobs.registry import WorkerRegistry, is_gone
from fluxredux.jobs.store import JobStore


class _StoreCollector(Collector):
    """Read at scrape time from the job store, so every process's work is counted."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts_by_status()
        by_status = GaugeMetricFamily(
            "fluxredux_predictions", "Predictions stored, by status", labels=["status"]
        )
        for status, count in counts.items():
            by_status.add_metric([status.value], count)
        yield by_status
        yield GaugeMetricFamily(
            "fluxredux_queue_depth", "Predictions waiting for a worker", value=counts[Status.STARTING]
        )
        # What an autoscaler wants beside the depth: how long the oldest has waited, and
        # what each worker holds (one read each; a scrape comes every few seconds at most).
        oldest = self.store.find([Status.STARTING], limit=1) if counts[Status.STARTING] else []
        yield GaugeMetricFamily(
            "fluxredux_oldest_queued_age_seconds",
            "How long the oldest waiting prediction has waited (0: none waits)",
            value=max(0.0, self.store.now() - oldest[0].created_at) if oldest else 0.0,
        )
        in_flight = GaugeMetricFamily(
            "fluxredux_worker_in_flight", "Running predictions each worker holds", labels=["worker"]
        )
        held = CollectionsCounter(
            job.lease_owner for job in self.store.find([Status.PROCESSING]) if job.lease_owner
        )
        for worker, count in sorted(held.items()):
            in_flight.add_metric([worker], count)
        yield in_flight


class _WorkerCollector(Collector):
    """What each live worker reports in its registry entry, read at scrape time: so the
    workers of every machine are counted, by every API node.

    The conditioning cache's counters are cumulative for the life of a worker; a worker
    that restarts comes back under a new id, so each series only ever grows (a new one
    starts at 0, as a restarted process's counters do)."""

    def __init__(self, registry: WorkerRegistry, ttl: float) -> None:
        self.registry = registry
        self.ttl = ttl

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily(
            "fluxredux_conditioning_cache_hits",
            "References whose Redux conditioning a worker had cached (the image encoder was skipped)",
            labels=["worker"],
        )
        misses = CounterMetricFamily(
            "fluxredux_conditioning_cache_misses",
            "References a worker's conditioning cache did not hold (the image encoder ran)",
            labels=["worker"],
        )
        lora_loads = CounterMetricFamily(
            "fluxredux_lora_loads",
            "LoRA adapters a worker loaded from their files (a first use, or one the cache had let go)",
            labels=["worker"],
        )
        lora_hits = CounterMetricFamily(
            "fluxredux_lora_cache_hits",
            "LoRA adapters a worker had loaded already when a prediction asked for them",
            labels=["worker"],
        )
        by_state = GaugeMetricFamily("fluxredux_workers", "Live workers, by state", labels=["state"])
        states: CollectionsCounter[str] = CollectionsCounter(
            {state: 0 for state in ("loading", "ready", "failed")}
        )
        now = self.registry.now()
        for worker in self.registry.workers():
            if is_gone(worker, now, self.ttl):
                continue
            states[worker.state] += 1
            counts = worker.details.get("conditioning_cache")
            # None: no cache (the fake model, or the cache turned off)
            if isinstance(counts, dict) and _is_count(counts.get("hits")) and _is_count(counts.get("misses")):
                hits.add_metric([worker.id], counts["hits"])
                misses.add_metric([worker.id], counts["misses"])
            adapters = worker.details.get("loras")
            if isinstance(adapters, dict) and all(_is_count(adapters.get(n)) for n in ("loads", "hits")):
                lora_loads.add_metric([worker.id], adapters["loads"])
                lora_hits.add_metric([worker.id], adapters["hits"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        yield by_state
        yield hits
        yield misses
        yield lora_loads
        yield lora_hits


def _is_count(value: Any) -> bool:
    # Another machine wrote it: a malformed entry is left out, not a failed scrape.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Metrics:
    def __init__(self, store: JobStore, registry: WorkerRegistry, worker_ttl: float) -> None:
        """``worker_ttl``: silent this long, a worker is gone (its series are dropped)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fluxredux_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.finished = Counter(
            "fluxredux_predictions_finished",
            "Predictions that ended, by status (with Redis: every node counts the whole deployment's)",
            ["status"],
            registry=self.registry,
        )
        self.predict_time = Histogram(
            "fluxredux_predict_time_seconds",
            "Time a worker spent on a successful prediction (with Redis: the whole deployment's)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.step_time = Histogram(
            "fluxredux_step_seconds",
            "Time of one denoising step (a successful prediction's denoise time over its steps)",
            buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8),
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(store))
        self.registry.register(_WorkerCollector(registry, worker_ttl))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics, in a registry of this app's own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fluxredux.jobs.model import Status
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


class Metrics:
    def __init__(self, store: JobStore) -> None:
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
        self.registry.register(_StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)

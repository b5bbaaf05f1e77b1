"""Bus listeners are scoped: whoever adds one removes it, so nothing keeps hearing events
after it stopped caring (the worker's wake-up, the HTTP app's metrics and webhooks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxredux.api.app import create_app
from fluxredux.api.services import build_services
from fluxredux.backends.sqlite.events import PipeEventBus
from fluxredux.config import Settings
from fluxredux.jobs.events import JobEvent, LocalEventBus, listening
from tests.harness import ThreadWorkers


def test_an_unsubscribed_listener_hears_nothing_more() -> None:
    bus = LocalEventBus()
    heard: list[str] = []
    unsubscribe = bus.add_listener(lambda event: heard.append(event.job_id))
    bus.publish(JobEvent("a", "starting"))
    unsubscribe()
    unsubscribe()  # idempotent
    bus.publish(JobEvent("b", "starting"))
    assert heard == ["a"]
    assert bus.listener_count == 0


def test_one_listener_added_twice_is_removed_once_per_unsubscribe() -> None:
    bus = PipeEventBus()
    heard: list[str] = []

    def listener(event: JobEvent) -> None:
        heard.append(event.job_id)

    first = bus.add_listener(listener)
    bus.add_listener(listener)
    bus.publish(JobEvent("a", "starting"))
    first()
    bus.publish(JobEvent("b", "starting"))
    assert heard == ["a", "a", "b"]


def test_listening_removes_the_listener_even_when_the_block_fails() -> None:
    bus = LocalEventBus()
    heard: list[str] = []
    with pytest.raises(RuntimeError), listening(bus, lambda event: heard.append(event.job_id)):
        bus.publish(JobEvent("inside", "starting"))
        raise RuntimeError("the worker loop died")
    bus.publish(JobEvent("after", "starting"))
    assert heard == ["inside"]
    assert bus.listener_count == 0


def test_an_app_started_twice_counts_each_prediction_once(tmp_path: Path) -> None:
    """The app's lifespan listens to the notifier; before listeners were scoped, a second
    start on the same services added a second listener and every ended prediction was
    counted twice in /metrics."""
    settings = Settings(data_dir=tmp_path, metrics_access="open")
    services = build_services(settings, lambda *_: ThreadWorkers())
    try:
        app = create_app(services)
        with TestClient(app):
            pass
        with TestClient(app) as client:
            # Published on this process's bus, as a worker's pipe would: heard on the loop.
            services.bus.publish(JobEvent("p1", "succeeded"))

            async def settle() -> None:
                await asyncio.sleep(0)

            client.portal.call(settle)  # type: ignore[union-attr]
            metrics = client.get("/metrics").text
        line = next(
            line for line in metrics.splitlines() if line.startswith("fluxredux_predictions_finished_total{")
        )
        assert 'status="succeeded"' in line
        assert line.endswith(" 1.0"), line
    finally:
        services.close()
    assert services.bus.listener_count == 0  # type: ignore[attr-defined]

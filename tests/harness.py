"""A real HTTP server on a loopback port, in this process, with a worker thread.

The worker runs the same loop as the worker process, on the fake model (flat colours,
no torch) unless a test passes another; the safety detector is a stub that finds
nothing, so no test image is ever withheld by accident.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from fluxredux.api.app import create_app
from fluxredux.api.services import Services, build_services
from fluxredux.api.timeouts import timeout_protocol
from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.config import Settings
from fluxredux.errors import FluxReduxError, ModelUnavailable
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.events import JobEvent
from fluxredux.loras.catalog import LoraCatalog
from fluxredux.loras.fetch import AdapterFiles
from fluxredux.net import SafeFetcher
from fluxredux.pipeline.fake import FakeModel
from fluxredux.pipeline.protocol import ImageModel
from fluxredux.safety import Detection, SafetyChecker
from fluxredux.storage import BlobStore, blob_store
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor
from fluxredux.worker.registration import Registration
from tests.helpers import png_data_uri
from tests.services import free_port

__all__ = ["Harness", "ThreadWorkers", "free_port", "png_data_uri", "running_server"]


class NothingFound:
    def detect(self, pixels: np.ndarray) -> list[Detection]:
        return []


@dataclass
class ThreadWorkers:
    """The worker monitor of a harness whose worker (if any) is a thread of this process.

    ``error`` plays a model that failed to load; ``problem`` a worker that is down."""

    worker: Worker | None = None
    error: dict[str, Any] | None = None
    problem: str | None = None

    def status(self) -> dict[str, Any]:
        ready = self.worker is not None and self.error is None
        # As a worker process describes its model (ModelInfo.describe: the memory profile too).
        description = "FAKE model (test worker thread)" if self.worker is not None else None
        model = self.worker.predictor.model if self.worker is not None else None
        previews = bool(getattr(model, "previews_available", False))
        return {
            "ready": ready,
            "demo": True,
            "error": self.error,
            "description": description,
            "previews": previews,
        }

    def problems(self) -> list[str]:
        return [self.problem] if self.problem else []

    def refusal(self) -> FluxReduxError | None:
        if self.error is not None:
            return ModelUnavailable(f"the model is not available: {self.error['error']}")
        return None

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wakeup.set()


@dataclass
class Harness:
    url: str
    key: str
    services: Services
    http: httpx.Client
    worker: Worker | None
    workers: ThreadWorkers

    def body(self, **inputs: Any) -> dict[str, Any]:
        return {
            "model": "flux-redux-schnell",
            "version": "0.0.1",
            "input": {"redux_image": png_data_uri(), **inputs},
        }

    def create(self, **inputs: Any) -> httpx.Response:
        return self.http.post("/v1/prediction/", json=self.body(**inputs))

    def create_id(self, **inputs: Any) -> str:
        response = self.create(**inputs)
        assert response.status_code == 200, response.text
        return str(response.json()["predictionID"])

    def get(self, prediction_id: str, **params: Any) -> dict[str, Any]:
        response = self.http.get(f"/v1/prediction/{prediction_id}", params=params)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_status(self, prediction_id: str, statuses: set[str], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            prediction = self.get(prediction_id)
            if prediction["status"] in statuses or time.monotonic() > deadline:
                return prediction
            time.sleep(0.02)


@contextmanager
def running_server(
    tmp_path: Path,
    *,
    model: ImageModel | None = None,
    run_worker: bool = True,
    fetcher: SafeFetcher | None = None,
    worker_blobs: BlobStore | None = None,
    **overrides: Any,
) -> Iterator[Harness]:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        host="127.0.0.1",
        port=port,
        model="fake",
        heartbeat_seconds=0.5,
        **overrides,
    )
    workers = ThreadWorkers()
    services = build_services(settings, lambda *_: workers, fetcher=fetcher)
    _key, secret = services.keys.create("tests")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(services),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            http=timeout_protocol(settings),  # as `fluxredux serve` runs it
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)

    worker = None
    registration: Registration | None = None
    stop = threading.Event()
    if run_worker:
        # Its own store connection, as the worker process has; events go to the server's bus.
        lifecycle = Lifecycle(
            SQLiteJobStore(settings.database_path),
            publish=lambda job: services.bus.publish(JobEvent(job.id, job.status.value)),
        )
        worker = Worker(
            lifecycle,
            Predictor(
                model or FakeModel(),
                SafetyChecker(NothingFound()),
                adapters=AdapterFiles(LoraCatalog.from_settings(settings)),
            ),
            # The same storage as the server, as a worker process does (or a test's own view of it).
            worker_blobs or blob_store(settings),
            WorkerConfig(
                worker_id="test-worker", lease_seconds=5, heartbeat_seconds=0.5, overlap=settings.overlap
            ),
        )
        workers.worker = worker
        # As a worker process registers itself, and keeps its entry fresh.
        registration = Registration(
            services.registry, "test-worker", model="fake", device="cpu", every=settings.heartbeat_seconds
        )
        registration.start()
        registration.update("ready")
        threading.Thread(target=worker.run_forever, args=(stop,), daemon=True).start()

    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": secret}, timeout=30)
    try:
        yield Harness(
            url=f"http://127.0.0.1:{port}",
            key=secret,
            services=services,
            http=http,
            worker=worker,
            workers=workers,
        )
    finally:
        stop.set()
        if registration is not None:
            registration.stop()
        if worker is not None:
            worker.wakeup.set()
        http.close()
        server.should_exit = True
        thread.join(10)
        services.close()

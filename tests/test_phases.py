"""What a running prediction says it does after its last step: "decoding" (the model's VAE
decode), then the post stage's "safety check", "encoding" and "storing"; nothing while it
denoises, waits in the queue or once it has ended.

Each phase is one fenced store write (a few per job, never one per image) that a store
briefly unavailable may lose without failing the job; the Eachlabs surface shows it as
``progress.phase``, the Replicate one as a log line above the tqdm-style bar, which the
official client still reads as the progress.
"""

from __future__ import annotations

import copy
import io
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from fluxredux.api.eachlabs.render import render
from fluxredux.api.replicate.render import render_replicate
from fluxredux.backends.memory.jobs import MemoryJobStore
from fluxredux.errors import StoreUnavailable
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.jobs.store import Change
from fluxredux.pipeline.fake import FakeGeneration, FakeModel
from fluxredux.pipeline.protocol import CancelCheck, GenerationRequest, PhaseCallback, ProgressCallback
from fluxredux.safety import SafetyChecker
from fluxredux.schema import PredictionInput
from fluxredux.storage import BlobInfo, LocalBlobStore, new_key
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor
from tests.harness import Harness, NothingFound, running_server
from tests.helpers import FakeClock
from tests.test_faults import Server, serve

replicate = pytest.importorskip("replicate")

PHASES = ["decoding", "safety check", "encoding", "storing"]
TERMINAL = {"success", "error", "cancelled"}


# --- a worker that takes long enough in every phase to be seen --------------------------


class NoisyFake(FakeModel):
    """Noise instead of flat colours: its PNG files take a while to encode (about 0.4 s a
    megapixel on these machines), so that "encoding" lasts long enough to be polled."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,
    ) -> FakeGeneration:
        made = super().generate(request, on_step=on_step, is_cancelled=is_cancelled, on_phase=on_phase)
        noise = np.random.default_rng(request.seed)
        made.images = [noise.integers(0, 256, image.shape, dtype=np.uint8) for image in made.images]
        return made


class SlowWrites(LocalBlobStore):
    """A disk that takes its time over each output ("storing" can be seen)."""

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        time.sleep(0.4)
        return super().put(key, data, content_type)


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[Harness]:
    """Every phase lasts long enough to be polled: the decode 0.4 s (a fifth of 4 x 0.5 s),
    the safety check 0.4 s (the fake's CPU time), encoding a noise PNG, storing 0.4 s."""
    model = NoisyFake(step_seconds=0.5, cpu_seconds=0.4)
    with running_server(tmp_path, model=model, worker_blobs=SlowWrites(tmp_path / "data" / "files")) as api:
        yield api


State = tuple[str, int, str | None]  # (status, step, phase) as a poll saw it


def poll_until_ended(get: Any, prediction_id: str, timeout: float = 30) -> list[State]:
    """Every distinct (status, step, phase) that polls saw, in order, until it ended."""
    seen: list[State] = []
    deadline = time.monotonic() + timeout
    while True:
        prediction = get(prediction_id)
        state = (prediction["status"], prediction["progress"]["step"], prediction["progress"]["phase"])
        if not seen or seen[-1] != state:
            seen.append(state)
        if prediction["status"] in TERMINAL:
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)  # a poll interval, not a wait for anything


def phases_of(seen: list[State]) -> list[str]:
    return [phase for phase, _ in itertools.groupby(p for _, _, p in seen if p is not None)]


def test_polls_see_each_phase_in_order_after_the_last_step(slow_api: Harness) -> None:
    prediction_id = slow_api.create_id(num_inference_steps=4, num_outputs=2, output_format="png")
    seen = poll_until_ended(slow_api.get, prediction_id)

    assert phases_of(seen) == PHASES, seen
    # Only after the last step, and only while it runs.
    assert all(status == "processing" and step == 4 for status, step, phase in seen if phase), seen
    first_phase = next(i for i, (_, _, phase) in enumerate(seen) if phase)
    assert any(status == "processing" and step < 4 for status, step, _ in seen[:first_phase]), seen
    assert all(phase is not None for _, _, phase in seen[first_phase:-1]), seen
    assert seen[-1] == ("success", 4, None)
    assert all(phase is None for status, _, phase in seen if status == "starting")


def test_a_cancel_during_a_phase_ends_the_prediction_cancelled_and_phaseless(slow_api: Harness) -> None:
    prediction_id = slow_api.create_id(num_inference_steps=4, output_format="png")
    deadline = time.monotonic() + 30
    while slow_api.get(prediction_id)["progress"]["phase"] != "safety check":
        assert time.monotonic() < deadline, slow_api.get(prediction_id)
        time.sleep(0.02)
    assert slow_api.http.post(f"/v1/prediction/{prediction_id}/cancel").status_code == 200
    ended = slow_api.wait_status(prediction_id, TERMINAL)
    assert ended["status"] == "cancelled", ended
    assert ended["progress"]["phase"] is None and ended["output"] is None


def test_the_replicate_surface_logs_the_phase_above_the_bar_the_official_client_reads(
    slow_api: Harness,
) -> None:
    prediction_id = slow_api.create_id(num_inference_steps=4, output_format="png")
    headers = {"Authorization": f"Bearer {slow_api.key}"}

    def read() -> dict[str, Any]:
        response = slow_api.http.get(f"/v1/predictions/{prediction_id}", headers=headers)
        assert response.status_code == 200, response.text
        return dict(response.json())

    deadline = time.monotonic() + 30
    while "safety check" not in (running := read())["logs"]:
        assert running["status"] in {"starting", "processing"} and time.monotonic() < deadline, running
        time.sleep(0.02)
    lines = running["logs"].splitlines()
    assert lines[-2:] == ["safety check…", "100%|██████████| 4/4"], lines
    progress = replicate.prediction.Prediction.Progress.parse(running["logs"])
    assert progress is not None and (progress.current, progress.total) == (4, 4)

    ended = slow_api.wait_status(prediction_id, TERMINAL)
    assert ended["status"] == "success"
    logs = read()["logs"]
    assert not any(phase in logs for phase in PHASES), logs  # an ended run is doing nothing


# --- the models: "decoding" through the model protocol, once, after the last step --------


def events_of_a_run(model: Any, reference: Image.Image) -> list[str]:
    """Steps and phases as one prediction (both stages) reports them, in order."""
    events: list[str] = []
    inputs = PredictionInput(redux_image="data:,x", megapixels="0.25", num_outputs=2, num_inference_steps=2)
    Predictor(model, SafetyChecker(NothingFound())).predict(
        inputs,
        [reference],
        on_step=lambda done, total: events.append(f"step {done}/{total}"),
        on_phase=events.append,
    )
    return events


def test_the_fake_and_the_real_model_report_decoding_after_their_last_step(demo_model: Any) -> None:
    """The demo model is the real model code (tiny random weights)."""
    reference = Image.new("RGB", (64, 48), (30, 140, 220))
    expected = ["step 1/2", "step 2/2", "decoding", "safety check", "encoding"]
    assert events_of_a_run(FakeModel(), reference) == expected
    assert events_of_a_run(demo_model, reference) == expected


# --- the writes: fenced, a few per job, each job's own ---------------------------------


class RecordingStore(MemoryJobStore):
    """Remembers every job as each update left it: all that any poll could have seen."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[Job] = []

    def update(self, job_id: str, change: Change) -> Job | None:
        updated = super().update(job_id, change)
        if updated is not None:
            self.writes.append(copy.deepcopy(updated))
        return updated

    def of(self, job_id: str) -> list[Job]:
        return [job for job in self.writes if job.id == job_id]


class PhaseWritesFail(RecordingStore):
    """A store that is unavailable (locked, unreachable) whenever a phase would be written."""

    def update(self, job_id: str, change: Change) -> Job | None:
        def refused_for_phases(job: Job) -> Job | None:
            before = job.progress_phase
            changed = change(job)
            if changed is not None and changed.progress_phase not in (None, before):
                raise StoreUnavailable("the job store is locked; retry shortly")
            return changed

        return super().update(job_id, refused_for_phases)


def a_worker(store: MemoryJobStore, tmp_path: Path, model: FakeModel, *, overlap: bool = True) -> Worker:
    return Worker(
        Lifecycle(store),
        Predictor(model, SafetyChecker(NothingFound())),
        LocalBlobStore(tmp_path / "files"),
        WorkerConfig(worker_id="w1", lease_seconds=30, heartbeat_seconds=5, overlap=overlap),
    )


def queue(store: MemoryJobStore, worker: Worker, **inputs: Any) -> str:
    """A queued job with its reference stored, as the API leaves one."""
    name = new_key("png")
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 30, 200)).save(image, "PNG")
    worker.blobs.put(name, image.getvalue(), "image/png")
    recorded = PredictionInput.model_validate(
        {"redux_image": "https://example.com/reference.png", "megapixels": "0.25", **inputs}
    ).model_dump(mode="json")
    job = Job(id=new_id(), owner="k", input=recorded, created_at=store.now(), input_files=[name])
    worker.lifecycle.create(job)
    return job.id


def phase_changes(writes: list[Job]) -> list[str | None]:
    """The phase each write left, each change once (the job as created: None)."""
    return [phase for phase, _ in itertools.groupby([None, *(job.progress_phase for job in writes)])]


def test_each_phase_is_one_write_whatever_the_number_of_images(tmp_path: Path) -> None:
    store = RecordingStore()
    worker = a_worker(store, tmp_path, FakeModel(), overlap=False)
    four = queue(store, worker, num_outputs=4, num_inference_steps=2)
    unchecked = queue(store, worker, num_outputs=4, disable_safety_checker=True)
    assert worker.run_once() and worker.run_once()
    worker.wait_for_post_stage()

    assert phase_changes(store.of(four)) == [None, *PHASES, None]
    # Written once each: the writes that set a phase are one per phase, not per image.
    assert [job.progress_phase for job in store.of(four) if job.progress_phase] == PHASES
    assert [job.progress_phase for job in store.of(unchecked) if job.progress_phase] == [
        "decoding",
        "encoding",
        "storing",
    ]
    ended = store.get(four)
    assert ended is not None and ended.status == Status.SUCCEEDED and ended.progress_phase is None
    assert len(ended.output) == 4


def test_in_overlap_each_job_s_phases_are_its_own(tmp_path: Path) -> None:
    """Job 1's post stage writes its phases while job 2's model steps: neither job ever
    shows the other's."""
    store = RecordingStore()
    worker = a_worker(store, tmp_path, FakeModel(step_seconds=0.05, cpu_seconds=0.5))
    first, second = queue(store, worker, seed=1), queue(store, worker, seed=2)
    assert worker.run_once() and worker.run_once()
    worker.wait_for_post_stage()

    for job_id in (first, second):
        writes = store.of(job_id)
        assert phase_changes(writes) == [None, *PHASES, None], job_id
        assert all(job.progress_phase is None for job in writes if job.progress_step < 4)
    # It did overlap: job 2 stepped while job 1 was in its safety check.
    order = [(job.id, job.progress_step, job.progress_phase) for job in store.writes]
    checking = order.index((first, 4, "safety check"))
    ended = next(i for i, job in enumerate(store.writes) if job.id == first and job.is_terminal)
    assert any(job_id == second and phase is None for job_id, _, phase in order[checking:ended]), order


def test_a_phase_write_that_fails_does_not_fail_the_job(tmp_path: Path) -> None:
    store = PhaseWritesFail()
    worker = a_worker(store, tmp_path, FakeModel(), overlap=False)
    prediction_id = queue(store, worker, num_outputs=2)
    assert worker.run_once()
    worker.wait_for_post_stage()
    ended = store.get(prediction_id)
    assert ended is not None and ended.status == Status.SUCCEEDED, ended
    assert len(ended.output) == 2 and ended.progress_phase is None


def test_a_job_no_longer_this_worker_s_gets_no_phase_written(clock: FakeClock) -> None:
    store = MemoryJobStore(clock=clock)
    lifecycle = Lifecycle(store)
    lifecycle.create(Job(id="j", owner="k", input={}, created_at=clock.now))
    claimed = lifecycle.claim("w1", 30)
    assert claimed is not None
    assert lifecycle.record_phase(claimed, "w2", 30, "decoding") is None  # another worker's
    clock.now += 31  # w1's lease ran out: the job is taken back, then claimed again
    assert [job.status for job in lifecycle.reap(max_attempts=2)] == [Status.STARTING]
    again = lifecycle.claim("w2", 30)
    assert again is not None and again.attempt == 2
    assert lifecycle.record_phase(claimed, "w1", 30, "storing") is None  # the old attempt
    current = store.get("j")
    assert current is not None and current.progress_phase is None


def test_a_lost_run_s_phase_is_not_shown_once_it_is_queued_again(clock: FakeClock) -> None:
    store = MemoryJobStore(clock=clock)
    lifecycle = Lifecycle(store)
    lifecycle.create(Job(id="j", owner="k", input={"num_inference_steps": 4}, created_at=clock.now))
    claimed = lifecycle.claim("w1", 30)
    assert claimed is not None
    running = lifecycle.record_phase(claimed, "w1", 30, "encoding")
    assert running is not None and render(running, "http://x").progress.phase == "encoding"
    clock.now += 31
    [queued] = lifecycle.reap(max_attempts=2)
    assert queued.status == Status.STARTING and queued.progress_phase is None
    # Whatever was stored, a queued or ended prediction shows no phase on either surface.
    for status in (Status.STARTING, Status.SUCCEEDED, Status.CANCELED):
        stale = Job(id="s", owner="k", input={}, created_at=0, status=status, progress_phase="storing")
        assert render(stale, "http://x").progress.phase is None
        assert "storing" not in render_replicate(stale, "http://x").logs


# --- the real processes: `fluxredux serve`, its worker slowed by the env ------------------


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[Server]:
    # A step of 0.5 s (the decode takes a fifth of 4 x 0.5 s) and 1.5 s of post-stage CPU.
    env = {"FLUXREDUX_FAKE_STEP_SECONDS": "0.5", "FLUXREDUX_FAKE_CPU_SECONDS": "1.5"}
    with serve(tmp_path, env=env) as server:
        yield server


def test_the_served_worker_reports_its_phases_in_order(slow_server: Server) -> None:
    prediction_id = slow_server.create_id(num_inference_steps=4)
    seen = poll_until_ended(slow_server.get, prediction_id)
    phases = phases_of(seen)
    # The fast phases (a flat-colour image's encoding, a local write) may pass between two
    # polls; the slowed ones are seen, and whatever is seen comes in order.
    assert {"decoding", "safety check"} <= set(phases), seen
    assert phases == [phase for phase in PHASES if phase in phases], seen
    assert all(status == "processing" and step == 4 for status, step, phase in seen if phase), seen
    assert seen[-1] == ("success", 4, None)
    response = httpx.get(
        f"{slow_server.url}/v1/predictions/{prediction_id}",
        headers={"Authorization": f"Bearer {slow_server.key}"},
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["status"] == "succeeded"

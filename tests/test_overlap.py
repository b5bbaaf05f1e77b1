"""Overlap: one job's post stage (safety check, encode, store, record) runs while the next
job's model runs, one at a time, and every job still ends exactly once as it would alone.

The fake model is given a fixed model time (steps x step_seconds) and CPU time per job
(cpu_seconds, in the post stage); the assertions are on the order of the timestamps the
store records, never on how long anything took.
"""

from __future__ import annotations

import itertools
import signal
import threading
from pathlib import Path

from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status
from fluxredux.pipeline.fake import FakeModel
from fluxredux.safety import SafetyChecker
from fluxredux.storage import LocalBlobStore, blob_store
from fluxredux.storage.blobs import BlobInfo, BlobStoreError
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor
from tests.harness import Harness, NothingFound, running_server
from tests.test_faults import serve


def finished(api: Harness, prediction_ids: list[str]) -> list[Job]:
    """Each prediction once it has ended, in the order they were created (and claimed);
    each run once, by the one worker."""
    jobs = ended(api, prediction_ids)
    assert all(job.attempt == 1 for job in jobs), [job.attempt for job in jobs]
    return jobs


def ended(api: Harness, prediction_ids: list[str]) -> list[Job]:
    jobs = []
    for prediction_id in prediction_ids:
        assert api.get(prediction_id, wait=30)["status"] in {"success", "error", "cancelled"}
        job = api.services.lifecycle.store.get(prediction_id)
        assert job is not None and job.is_terminal
        jobs.append(job)
    return jobs


def started_before_the_last_one_ended(jobs: list[Job]) -> list[bool]:
    """For each job after the first: did its run start before the previous job was recorded?"""
    spans = []
    for job in jobs:
        assert job.started_at is not None and job.completed_at is not None
        spans.append((job.started_at, job.completed_at))
    return [later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)]


def test_the_next_job_s_model_runs_while_the_last_one_is_encoded_and_stored(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.1, cpu_seconds=0.3)) as api:
        ids = [api.create_id(num_inference_steps=4, seed=i) for i in range(4)]
        jobs = finished(api, ids)
    assert [job.status for job in jobs] == [Status.SUCCEEDED] * 4
    assert all(len(job.output) == 1 for job in jobs)
    assert started_before_the_last_one_ended(jobs) == [True, True, True]


def test_with_overlap_off_each_job_starts_after_the_last_one_ended(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.1, cpu_seconds=0.3), overlap=False) as api:
        ids = [api.create_id(num_inference_steps=4, seed=i) for i in range(4)]
        jobs = finished(api, ids)
    assert [job.status for job in jobs] == [Status.SUCCEEDED] * 4
    assert started_before_the_last_one_ended(jobs) == [False, False, False]


def test_when_the_cpu_is_slower_than_the_model_the_worker_does_not_run_ahead(tmp_path: Path) -> None:
    """One post stage at a time, and one finished model stage waiting for it at most: the
    decoded images of a slow CPU's backlog never pile up in memory."""
    cpu_seconds = 0.5  # more than the model's 4 x 0.05 s
    with running_server(tmp_path, model=FakeModel(step_seconds=0.05, cpu_seconds=cpu_seconds)) as api:
        ids = [api.create_id(num_inference_steps=4, seed=i) for i in range(5)]
        jobs = finished(api, ids)
    assert [job.status for job in jobs] == [Status.SUCCEEDED] * 5
    ends = [job.completed_at or 0.0 for job in jobs]
    # Post stages one after the other: each takes cpu_seconds once the one before has ended.
    assert all(later - earlier >= cpu_seconds for earlier, later in itertools.pairwise(ends))
    # Job N+2 is claimed only once job N has been recorded (N+1 then holds the slot).
    claimed = [job.started_at or 0.0 for job in jobs]
    assert all(claimed[n + 2] >= ends[n] for n in range(len(jobs) - 2))


class NoRoomForPng(LocalBlobStore):
    """A disk that refuses PNG outputs (too big for it), as a full disk refuses big files."""

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        if key.endswith(".png"):
            raise BlobStoreError("the file cannot be written", "No space left on device")
        return super().put(key, data, content_type)


class FailsSecondPostStage(FakeModel):
    """Its second job's post stage fails with a bug (an internal error)."""

    def __init__(self) -> None:
        super().__init__(step_seconds=0.05, cpu_seconds=0.2)
        self.post_stages = 0

    def post_stage_work(self) -> None:
        self.post_stages += 1
        super().post_stage_work()
        if self.post_stages == 2:
            raise RuntimeError("a bug in the post stage")


def test_a_post_stage_that_fails_fails_only_its_own_job(tmp_path: Path) -> None:
    blobs = NoRoomForPng(tmp_path / "data" / "files")
    with running_server(
        tmp_path, model=FailsSecondPostStage(), worker_blobs=blobs, storage_retry_seconds=0.1
    ) as api:
        ids = [
            api.create_id(seed=1),
            api.create_id(seed=2),  # the internal error
            api.create_id(seed=3, output_format="png"),  # cannot be stored
            api.create_id(seed=4),
        ]
        jobs = finished(api, ids)
        results = [api.get(prediction_id) for prediction_id in ids]
    assert [job.status for job in jobs] == [Status.SUCCEEDED, Status.FAILED, Status.FAILED, Status.SUCCEEDED]
    assert [job.error_code for job in jobs] == [None, "internal", "storage_error", None]
    assert "internal error" in str(results[1]["error"]) and "could not be stored" in str(results[2]["error"])
    assert started_before_the_last_one_ended(jobs) == [True, True, True]  # it did overlap
    stored = {p.name for p in (tmp_path / "data" / "files").iterdir() if not p.name.startswith(".")}
    inputs = {name for job in jobs for name in job.input_files}
    assert stored - inputs == {*jobs[0].output, *jobs[3].output}  # nothing of the failed ones


def test_a_cancel_during_the_post_stage_ends_the_job_canceled_with_nothing_stored(tmp_path: Path) -> None:
    with running_server(tmp_path, model=FakeModel(step_seconds=0.05, cpu_seconds=2.5)) as api:
        first = api.create_id(num_inference_steps=4, seed=1)
        second = api.create_id(num_inference_steps=4, seed=2)
        # The first job's model is done (4 of 4 steps) and the second one's has started
        # (2.5 s of post stage: room for a slow machine between these lines and the cancel).
        api.wait_status(second, {"processing"})
        in_post_stage = api.get(first)
        assert in_post_stage["status"] == "processing" and in_post_stage["progress"]["step"] == 4
        api.http.post(f"/v1/prediction/{first}/cancel")
        jobs = finished(api, [first, second])
    assert [job.status for job in jobs] == [Status.CANCELED, Status.SUCCEEDED]
    assert jobs[0].output == [] and len(jobs[1].output) == 1
    stored = {p.name for p in (tmp_path / "data" / "files").iterdir() if not p.name.startswith(".")}
    assert stored == {*jobs[0].input_files, *jobs[1].input_files, *jobs[1].output}


def test_sigterm_during_a_post_stage_records_it_and_the_next_job_before_exiting(tmp_path: Path) -> None:
    """The drain waits for the job in its post stage too: none is left processing."""
    env = {"FLUXREDUX_FAKE_STEP_SECONDS": "0.1", "FLUXREDUX_FAKE_CPU_SECONDS": "1.5"}
    with serve(tmp_path, env=env) as server:
        first, second, third = (server.create().json()["predictionID"] for _ in range(3))
        # The first job's model is done and its post stage runs; the second one's model runs.
        server.wait_for(lambda: server.get(second)["status"] == "processing", 20, "never started")
        assert server.get(first)["status"] == "processing"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log.read_text()[-3000:]
    store = SQLiteJobStore(tmp_path / "data" / "fluxredux.db")
    try:
        jobs = [store.get(prediction_id) for prediction_id in (first, second, third)]
    finally:
        store.close()
    assert [(job.status, job.attempt) for job in jobs if job is not None] == [
        (Status.SUCCEEDED, 1),
        (Status.SUCCEEDED, 1),
        (Status.STARTING, 0),  # never claimed: left queued for the next worker
    ]


def test_a_job_that_lost_a_worker_before_runs_alone(tmp_path: Path) -> None:
    """A re-run may be the job that kills workers: the job in its post stage is recorded
    before its model starts, and as its last attempt (of 2) its own post stage is done
    before the next claim, so a crash would take no other job's result along."""
    step_seconds, cpu_seconds = 0.1, 0.3
    with running_server(tmp_path, run_worker=False) as api:
        ids = [api.create_id(num_inference_steps=4, seed=i) for i in range(4)]

        def lost_a_worker(job: Job) -> Job:
            job.attempt = 1  # queued again after its first worker was lost, as the reaper leaves it
            return job

        api.services.lifecycle.store.update(ids[1], lost_a_worker)
        settings = api.services.settings
        worker = Worker(
            Lifecycle(SQLiteJobStore(settings.database_path)),
            Predictor(FakeModel(step_seconds, cpu_seconds), SafetyChecker(NothingFound())),
            blob_store(settings),
            WorkerConfig(worker_id="test-worker", lease_seconds=5, heartbeat_seconds=0.5, max_attempts=2),
        )
        stop = threading.Event()
        loop = threading.Thread(target=worker.run_forever, args=(stop,))
        loop.start()
        try:
            first, rerun, third, fourth = ended(api, ids)
        finally:
            stop.set()
            worker.wakeup.set()
            loop.join(10)
    assert [job.status for job in (first, rerun, third, fourth)] == [Status.SUCCEEDED] * 4
    assert rerun.attempt == 2
    assert first.completed_at is not None and rerun.completed_at is not None
    # Its model ran only after the first job was recorded: both its stages came after.
    assert rerun.completed_at - first.completed_at >= 4 * step_seconds + cpu_seconds
    # Its last attempt's post stage ended before the next job was claimed.
    assert third.started_at is not None and third.started_at >= rerun.completed_at
    # First runs overlap as usual.
    assert started_before_the_last_one_ended([third, fourth]) == [True]


class FullThenTimingOut(LocalBlobStore):
    """Outputs: a full disk at the first write, then a timeout at its one retry."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failures = iter(
            [
                BlobStoreError("the file cannot be written", "No space left on device"),
                BlobStoreError("the file cannot be written", "timed out", transient=True),
            ]
        )

    def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        if key.endswith(".webp") and (failure := next(self.failures, None)) is not None:
            raise failure
        return super().put(key, data, content_type)


def test_a_full_disk_whose_retry_times_out_is_not_called_an_outage_ridden_out(tmp_path: Path) -> None:
    """The job's error says what happened: a full disk, retried once; not that the storage
    "kept failing for 60 s" (the outage retries never ran: a full disk is not waited out)."""
    blobs = FullThenTimingOut(tmp_path / "data" / "files")
    with running_server(tmp_path, worker_blobs=blobs, storage_retry_seconds=0.1) as api:
        failed = api.get(api.create_id(output_format="webp"), wait=30)
    assert failed["status"] == "error" and "could not be stored" in failed["error"], failed
    assert "kept failing" not in failed["error"], failed["error"]
    assert "full or not writable" in failed["error"], failed["error"]

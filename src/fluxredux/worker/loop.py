"""The worker loop: claim a job, run it, finish it. Leased, not popped.

A claimed job carries this worker's id and a lease that a heartbeat thread extends (one
thread for every job this worker holds: worker/leases.py); if this process dies, the
lease runs out (or the supervisor sees the exit) and the job is re-run once or failed as
"worker lost". Every step of a run re-checks the job's cancel flag (as the step's progress
write read it, when that write came just before; else with a read of its own), so a cancel
stops a running prediction within one denoising step.

Faults of the store or the disk never end this process: a locked or unreachable store
is retried, and outputs that cannot be written fail that one job as ``storage_error``.
A storage outage that may pass by itself (an object store timing out or unreachable, a
network mount failing over) does not fail a job at once: reading its reference image and
writing the images it made (which the worker still holds) are retried with a growing pause
for up to ``storage_outage_seconds``, while the heartbeat keeps the job's lease. A full or
read-only disk fails the job after one retry: waiting would not make room.

Overlap (``WorkerConfig.overlap``, on by default): a run has two stages, the model stage
(the GPU's part) and the post stage (safety check, encode, store outputs, record the end:
CPU work). Once job N's model stage is done, its post stage runs on a background thread
(worker/overlap.py) while this loop claims job N+1 and runs its model, so the GPU does not
wait for the CPU. At most one post stage runs at a time: N+1's waits for N's. Job N keeps
its lease heartbeat until its end is recorded, and the loop waits for the post stage
before it idles or returns (a SIGTERM drain included), so every claimed job is recorded.

A job that lost a worker before runs alone (the post stage in flight is recorded before its
model starts), and a job's last attempt finishes its post stage before the next claim: if
a job kills the process, it takes no neighbour's result with it. A job in its post stage
when the process dies is re-run like the one that killed it (its attempt had a re-run left).

After its last step a run says what it does (``Job.progress_phase``): "decoding" (the
model reports it, inside the model stage), then the post stage's "safety check", "encoding"
and "storing"; its end clears it. Each is one write, fenced like a heartbeat (and renewing
the lease with it), a few per job, never one per image; one that fails (the store briefly
unavailable) costs the job nothing but that write. In overlap each job's phases are its
own: job N's post stage and job N+1's model stage write to their own jobs.

A cancel is honoured until the outputs are written: the post stage checks for one when it
starts and again just before the writes (the job ends canceled, nothing stored); one that
arrives after that loses the race, as one arriving after the end would, and the job
succeeds. The lifecycle's fencing makes either end happen exactly once.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from fluxredux.errors import FluxReduxError, PredictionCancelled, StorageError, StoreUnavailable
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.images.formats import PNG
from fluxredux.jobs.job import Job, Status
from fluxredux.jobs.lifecycle import Choose, Lifecycle
from fluxredux.pipeline.protocol import STORING, Phase
from fluxredux.schema import PredictionInput
from fluxredux.storage import BlobNotFound, BlobStore, BlobStoreError, new_key
from fluxredux.worker.leases import LeaseKeeper
from fluxredux.worker.overlap import PostStageSlot
from fluxredux.worker.predictor import Generated, PredictionResult, Predictor

log = logging.getLogger(__name__)

INTERNAL_ERROR = "the prediction failed because of an internal error; it was logged on the server"

T = TypeVar("T")

# A cancel check this soon after a progress write uses what that write read of the job.
SEEN_FRESH_SECONDS = 0.05

# Called with a description of a storage failure, or None once storage works again.
StorageReport = Callable[[str | None], None]


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    idle_poll_seconds: float = 1.0  # a safety net: new jobs normally wake the worker at once
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    storage_retry_seconds: float = 1.0  # one retry of a write to a full or read-only disk, after this pause
    # How long a job rides out a storage outage (reading its reference, writing its outputs).
    storage_outage_seconds: float = 60.0
    storage_probe_seconds: float = 5.0  # while writes fail: how often to try a write again
    finish_retry_seconds: float = 60.0  # how long to keep trying to record a finished run
    max_backoff_seconds: float = 10.0  # after an unexpected error in the loop itself
    # While idle, take back jobs whose lease ran out (their worker died or froze), as the
    # API nodes' maintenance does: jobs are recovered even where no API node runs.
    reap_seconds: float = 10.0
    max_attempts: int = 2  # runs of a job whose worker was lost (then "worker lost")
    # One job's post stage (CPU) under the next job's model stage; False: one after the other.
    overlap: bool = True


class Worker:
    def __init__(
        self,
        lifecycle: Lifecycle,
        predictor: Predictor,
        blobs: BlobStore,
        config: WorkerConfig,
        report_storage: StorageReport = lambda problem: None,
        choose: Choose | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.predictor = predictor
        self.blobs = blobs
        self.config = config
        self.report_storage = report_storage
        # Which waiting job a claim takes (worker/affinity.py); None: the oldest.
        self.choose = choose
        self.wakeup = threading.Event()
        self._storage_problem: str | None = None
        self._failed_write_size = 0
        self._last_probe = 0.0
        self._last_reap = 0.0
        self._post_stage = PostStageSlot()
        # (job id, attempt) -> (when, the job as its last progress write saw it), taken by the
        # cancel check that follows it (one dict: the model stage and the post stage run on
        # two threads, each for its own job).
        self._seen: dict[tuple[str, int], tuple[float, Job | None]] = {}
        self._leases = LeaseKeeper(self._renew, config.heartbeat_seconds)
        # job id -> the preview its model made at the step now ending (see _progress).
        self._previews: dict[str, str] = {}

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and run jobs until ``stop``. Nothing that goes wrong here ends the loop: a
        store that is locked or unreachable is retried with a growing pause. Returns only
        once the last job's post stage has been recorded."""
        try:
            self._loop(stop)
        finally:
            self.wait_for_post_stage()

    def _loop(self, stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                ran = self.run_once()
                backoff = 0.0
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.5), self.config.max_backoff_seconds)
                if isinstance(exc, StoreUnavailable):  # expected, and says all there is to say
                    log.warning("%s; retrying in %.1f s", exc.message, backoff)
                else:
                    log.exception("the worker loop failed; retrying in %.1f s", backoff)
                stop.wait(backoff)
                continue
            if not ran:
                # Nothing queued: finish the last job before idling (and before probing the
                # storage, whose state only one thread at a time may touch).
                self.wait_for_post_stage()
                self._probe_storage()
                self._reap_expired()
                self.wakeup.wait(self.config.idle_poll_seconds)
                self.wakeup.clear()

    def wait_for_post_stage(self) -> None:
        """Block until the job in its post stage (if any) has been recorded."""
        self._post_stage.wait()

    def _reap_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < self.config.reap_seconds:
            return
        self._last_reap = now
        try:
            # Expired leases only: whether a silent worker is dead is not ours to guess.
            self.lifecycle.reap(max_attempts=self.config.max_attempts)
        except StoreUnavailable as exc:
            log.debug("reaping expired leases failed: %s", exc.message)

    def run_once(self) -> bool:
        """Claim one job and run its model stage; then its post stage, in the background
        with overlap (once the previous one has ended), else here. False: queue empty."""
        job = self.lifecycle.claim(self.config.worker_id, self.config.lease_seconds, self.choose)
        if job is None:
            return False
        log.info("prediction %s: started (attempt %d)", job.id, job.attempt)
        if job.attempt > 1:
            # It lost a worker before: it may be what kills workers. The job in its post
            # stage is recorded first, so that if it kills this one too it takes nobody along.
            self.wait_for_post_stage()
        release = self._keep_lease(job)
        try:
            started = time.perf_counter()
            generated = self._model_stage(job)
            model_seconds = time.perf_counter() - started
        except BaseException:
            release()
            raise
        if generated is None:  # already ended (failed, canceled)
            release()
            return True

        def post_stage() -> None:
            try:
                self._post_stage_of(job, generated, model_seconds)
            finally:
                release()  # the lease is kept until the job's end is recorded

        # In the background its run is at risk from the next job's (a crash of this process
        # loses both): only a job that can afford a re-run takes that risk, never its last.
        if self.config.overlap and job.attempt < self.config.max_attempts:
            self._post_stage.start(post_stage)
        else:
            self.wait_for_post_stage()  # one post stage at a time, in either mode
            post_stage()
        return True

    def _keep_lease(self, job: Job) -> Callable[[], None]:
        """Renew ``job``'s lease (on the lease keeper's thread) until the returned function
        is called."""
        return self._leases.hold(job)

    def _renew(self, job: Job) -> bool:
        """One renewal of ``job``'s lease; False: no longer ours (canceled, reaped), and the
        run notices at its next step."""
        try:
            return self.lifecycle.heartbeat(job, self.config.worker_id, self.config.lease_seconds) is not None
        except StoreUnavailable as exc:
            # Keep beating: the lease is only lost if the store stays unwritable past it.
            log.warning("prediction %s: lease not renewed: %s", job.id, exc.message)
        except Exception:  # never the end of the renewals of every job held
            log.exception("prediction %s: renewing its lease failed", job.id)
        return True

    def _model_stage(self, job: Job) -> Generated | None:
        """Reference images -> the model's images. None: the job has ended already."""
        try:
            inputs = PredictionInput.from_record(job.input)
            images = [self._reference(job, name) for name in job.input_files]
            if not images and inputs.prompt is None:
                raise FluxReduxError("the prediction has no stored reference image")
            return self.predictor.generate(
                inputs,
                images,
                on_step=lambda step, total: self._progress(job, step, total),
                is_cancelled=lambda: self._cancel_requested(job),
                on_phase=lambda phase: self._enter_phase(job, phase),
                on_preview=lambda step, jpeg: self._keep_preview(job, jpeg),
            )
        except Exception as exc:
            self._end_with_error(job, exc)
            return None

    def _post_stage_of(self, job: Job, generated: Generated, model_seconds: float) -> None:
        """Safety check, encode, store, record: whatever goes wrong ends this job only."""
        started = time.perf_counter()
        try:
            self._stop_if_cancelled(job)
            result = self.predictor.finish(generated, on_phase=lambda phase: self._enter_phase(job, phase))
            # Written first, the phase's write also tells the cancel check that follows.
            self._enter_phase(job, STORING)
            self._stop_if_cancelled(job)  # the last chance: once written, the job succeeds
            names = self._store_outputs(job, result)
        except Exception as exc:
            if self._end_with_error(job, exc) is None and isinstance(exc, PredictionCancelled):
                self._log_taken_back(job)
            return
        # The job's own work: its model stage and its post stage, not the wait between them.
        self._succeed(job, result, names, model_seconds + time.perf_counter() - started)

    def _stop_if_cancelled(self, job: Job) -> None:
        if self._cancel_requested(job):
            raise PredictionCancelled("the prediction was cancelled")

    def _end_with_error(self, job: Job, exc: Exception) -> Job | None:
        """Record the end a failure means; None if the job is no longer this worker's."""
        if isinstance(exc, PredictionCancelled):
            return self._finish(job, Status.CANCELED, logs="cancelled while running")
        if isinstance(exc, FluxReduxError):  # the user can act on these (unsafe outputs, bad image)
            return self._finish(job, Status.FAILED, error=exc.message, error_code=exc.code)
        log.error("prediction %s failed", job.id, exc_info=exc)
        return self._finish(job, Status.FAILED, error=INTERNAL_ERROR, error_code="internal")

    def _log_taken_back(self, job: Job) -> None:
        log.warning("prediction %s: no longer this worker's (taken back); its outputs were dropped", job.id)

    def _reference(self, job: Job, name: str) -> Image.Image:
        try:
            data = self._riding_out(job, "reading its reference image", lambda: self.blobs.get(name))
        except BlobNotFound:
            raise FluxReduxError(
                "the reference image is no longer stored; create the prediction again"
            ) from None
        except BlobStoreError as exc:
            raise StorageError(f"the reference image could not be read from storage: {exc.reason}") from exc
        return decode_image(data, self.config.decode_limits)

    def _riding_out(self, job: Job, doing: str, call: Callable[[], T]) -> T:
        """``call()``, retried through a storage outage (a transient BlobStoreError) with a
        growing pause, for up to ``storage_outage_seconds``; any other error, or an outage
        that outlasts that, is raised. The job stays this worker's meanwhile: its heartbeat
        thread (``_keep_lease``) renews the lease until its end is recorded. A cancel, or
        the job taken back, stops the retries (PredictionCancelled)."""
        deadline = time.monotonic() + self.config.storage_outage_seconds
        pause = 0.5
        while True:
            try:
                return call()
            except BlobStoreError as exc:
                if not exc.transient or time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "prediction %s: %s failed (%s); retrying in %.1f s", job.id, doing, exc.reason, pause
                )
            time.sleep(pause)
            self._stop_if_cancelled(job)
            pause = min(pause * 2, 5.0)

    def _keep_preview(self, job: Job, jpeg: bytes) -> None:
        """A step's preview, written with that step's progress (``_progress``, called next)."""
        self._previews[job.id] = jpeg_data_uri(jpeg)

    def _progress(self, job: Job, step: int, total: int) -> None:
        # The step's preview, if the model made one just now: recorded in the same write.
        preview = self._previews.pop(job.id, None)
        try:
            current = self.lifecycle.heartbeat(
                job, self.config.worker_id, self.config.lease_seconds, step=step, total=total, preview=preview
            )
        except StoreUnavailable as exc:  # progress is nice to have; the run goes on
            log.warning("prediction %s: progress not recorded: %s", job.id, exc.message)
            return
        # The job as that write saw it (None: no longer ours): the cancel check that follows
        # at once (the next step's, a model calls them back to back) needs no read of its own.
        self._seen[(job.id, job.attempt)] = (time.monotonic(), current)

    def _enter_phase(self, job: Job, phase: Phase) -> None:
        """Record what ``job`` does now that its steps are done. Nice to have, as progress
        is: a store that cannot be written now loses this write, not the job."""
        try:
            current = self.lifecycle.record_phase(
                job, self.config.worker_id, self.config.lease_seconds, phase
            )
        except StoreUnavailable as exc:
            log.warning("prediction %s: phase %r not recorded: %s", job.id, phase, exc.message)
            return
        # As after a progress write: the cancel check that may follow at once needs no read.
        self._seen[(job.id, job.attempt)] = (time.monotonic(), current)

    def _cancel_requested(self, job: Job) -> bool:
        seen = self._seen.pop((job.id, job.attempt), None)
        if seen is not None and time.monotonic() - seen[0] < SEEN_FRESH_SECONDS:
            current = seen[1]
            return current is None or current.cancel_requested  # as Lifecycle.should_stop decides
        try:
            return self.lifecycle.should_stop(job, self.config.worker_id)
        except StoreUnavailable:
            return False  # cannot tell now; asked again at the next step

    def _store_outputs(self, job: Job, result: PredictionResult) -> list[str]:
        """Write every output, or none; StorageError when that cannot be done.

        Through an outage, retried while it may pass (``_riding_out``); a full or read-only
        disk gets one retry after a pause. The keys are chosen once: a retry rewrites the
        same objects, so a try that timed out here but reached the store later (a request
        held in a frozen server's queue) leaves no stray file behind."""
        names = [new_key(output.extension) for output in result.outputs]

        def save_all() -> None:
            try:
                for name, output in zip(names, result.outputs, strict=True):
                    self.blobs.put(name, output.data, output.content_type)
            except BlobStoreError as exc:
                if exc.transient:  # while the outage lasts, /ready says so
                    self._set_storage_problem(f"outputs could not be written: {exc.reason} (retrying)")
                raise

        rode_out = False  # whether an outage was ridden out for storage_outage_seconds
        try:
            try:
                self._riding_out(job, "storing its outputs", save_all)
            except BlobStoreError as first:
                if first.transient:
                    rode_out = True
                    raise  # the outage outlasted storage_outage_seconds
                log.warning("writing outputs failed (%s); retrying once", first.reason)
                time.sleep(self.config.storage_retry_seconds)
                save_all()
        except BlobStoreError as exc:
            self._discard(names)  # no half-stored results
            self._failed_write_size = max(len(o.data) for o in result.outputs)
            self._set_storage_problem(f"outputs could not be written: {exc.reason}")
            # What the first failure was decides (a full disk retried once whose retry
            # timed out is still a full disk, not an outage waited out).
            why = (
                f"the storage kept failing for {self.config.storage_outage_seconds:g} s"
                if rode_out
                else "the server's storage is full or not writable"
            )
            raise StorageError(
                f"the images were generated but could not be stored ({exc.reason}); {why}"
            ) from exc
        except BaseException:  # cancelled while retrying, or the job taken back
            self._discard(names)
            raise
        self._set_storage_problem(None)
        return names

    def _discard(self, names: list[str]) -> None:
        """Delete what a failed or abandoned write may have stored (absent keys are skipped).
        Storage that fails now too leaves them to maintenance's sweep of unreferenced files."""
        try:
            self.blobs.delete(names)
        except BlobStoreError as exc:
            log.warning("could not delete %d unrecorded output(s): %s", len(names), exc.reason)

    def _set_storage_problem(self, problem: str | None) -> None:
        if problem != self._storage_problem:
            self._storage_problem = problem
            if problem:
                log.error("storage: %s", problem)
            else:
                log.info("storage: writable again")
            self.report_storage(problem)

    def _probe_storage(self) -> None:
        """While output writes fail, try a write of the same size now and then, so that
        readiness comes back by itself once space is freed or the mount is writable."""
        now = time.monotonic()
        if self._storage_problem is None or now - self._last_probe < self.config.storage_probe_seconds:
            return
        self._last_probe = now
        try:
            name = new_key(PNG.extension)
            self.blobs.put(name, bytes(self._failed_write_size), PNG.content_type)
            self.blobs.delete([name])
        except BlobStoreError as exc:
            log.debug("storage still failing: %s", exc.reason)
            return
        self._set_storage_problem(None)

    def _finish(self, job: Job, to: Status, **fields: Any) -> Job | None:
        """Record the end of a run. A store that is briefly locked or down must not throw
        away a finished run: retry for a while; the lease keeps others off meanwhile."""
        self._seen.pop((job.id, job.attempt), None)  # its ending: no cancel check follows
        deadline = time.monotonic() + self.config.finish_retry_seconds
        pause = 0.2
        while True:
            try:
                return self.lifecycle.finish(job, self.config.worker_id, to, **fields)
            except StoreUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("prediction %s: could not record its end: %s", job.id, exc.message)
                    return None  # its lease runs out and it is re-run or failed as worker lost
                log.warning("prediction %s: recording its end failed (%s); retrying", job.id, exc.message)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _succeed(self, job: Job, result: PredictionResult, names: list[str], elapsed: float) -> None:
        dropped = [i for i, verdict in enumerate(result.safety) if verdict.unsafe]
        logs = [f"seed: {result.seed}"]
        if result.notice:
            logs.insert(0, result.notice)
        if dropped:
            logs.append(f"safety checker removed {len(dropped)} of {len(result.safety)} images")
        finished = self._finish(
            job,
            Status.SUCCEEDED,
            output=names,
            seed=result.seed,
            logs="\n".join(logs),
            metrics={
                "predict_time": round(elapsed, 4),
                **{k: round(v, 4) for k, v in result.timings.items()},
            },
            extra={
                "safety": [{"unsafe": v.unsafe, "reasons": v.reasons} for v in result.safety],
                "demo": result.notice is not None,
            },
            progress_step=job.input.get("num_inference_steps", 4),
        )
        if finished is None:  # lost the job meanwhile (reaped, canceled): drop our files
            self._log_taken_back(job)
            self._discard(names)
        else:
            log.info("prediction %s: succeeded in %.2f s", job.id, elapsed)


def jpeg_data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")

"""The worker loop: claim a job, run it, finish it. Leased, not popped.

A claimed job carries this worker's id and a lease that a heartbeat thread extends; if
this process dies, the lease runs out (or the supervisor sees the exit) and the job is
re-run once or failed as "worker lost". Every step of a run re-checks the job's cancel
flag, so a cancel stops a running prediction within one denoising step.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from fluxredux.errors import FluxReduxError, PredictionCancelled
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.jobs.lifecycle import Lifecycle
from fluxredux.jobs.model import Job, Status
from fluxredux.schema import PredictionInput
from fluxredux.storage import FileStore
from fluxredux.worker.predictor import PredictionResult, Predictor

log = logging.getLogger(__name__)

INTERNAL_ERROR = "the prediction failed because of an internal error; it was logged on the server"


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    idle_poll_seconds: float = 1.0  # a safety net: new jobs normally wake the worker at once
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)


class Worker:
    def __init__(
        self, lifecycle: Lifecycle, predictor: Predictor, files: FileStore, config: WorkerConfig
    ) -> None:
        self.lifecycle = lifecycle
        self.predictor = predictor
        self.files = files
        self.config = config
        self.wakeup = threading.Event()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.run_once():
                self.wakeup.wait(self.config.idle_poll_seconds)
                self.wakeup.clear()

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.lifecycle.claim(self.config.worker_id, self.config.lease_seconds)
        if job is None:
            return False
        log.info("prediction %s: started (attempt %d)", job.id, job.attempt)
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job, stop_heartbeat), daemon=True)
        heartbeat.start()
        try:
            self._run(job)
        finally:
            stop_heartbeat.set()
            heartbeat.join()
        return True

    def _heartbeat(self, job: Job, stop: threading.Event) -> None:
        while not stop.wait(self.config.heartbeat_seconds):
            if self.lifecycle.heartbeat(job, self.config.worker_id, self.config.lease_seconds) is None:
                return  # no longer ours (canceled, reaped): the run notices at its next step

    def _run(self, job: Job) -> None:
        worker_id = self.config.worker_id
        started = time.perf_counter()
        try:
            inputs = PredictionInput.model_validate(job.input)
            image = self._reference(job)
            result = self.predictor.predict(
                inputs,
                image,
                on_step=lambda step, total: self._progress(job, step, total),
                is_cancelled=lambda: self.lifecycle.is_cancel_requested(job.id),
            )
        except PredictionCancelled:
            self.lifecycle.finish(job, worker_id, Status.CANCELED, logs="cancelled while running")
            return
        except FluxReduxError as exc:  # the user can act on these (unsafe outputs, bad image)
            self.lifecycle.finish(job, worker_id, Status.FAILED, error=exc.message, error_code=exc.code)
            return
        except Exception:
            log.exception("prediction %s failed", job.id)
            self.lifecycle.finish(job, worker_id, Status.FAILED, error=INTERNAL_ERROR, error_code="internal")
            return
        self._succeed(job, result, time.perf_counter() - started)

    def _reference(self, job: Job) -> Image.Image:
        if job.input_file is None:
            raise FluxReduxError("the prediction has no stored reference image")
        return decode_image(self.files.read(job.input_file), self.config.decode_limits)

    def _progress(self, job: Job, step: int, total: int) -> None:
        self.lifecycle.heartbeat(
            job, self.config.worker_id, self.config.lease_seconds, step=step, total=total
        )

    def _succeed(self, job: Job, result: PredictionResult, elapsed: float) -> None:
        names = [self.files.save(output.data, output.extension) for output in result.outputs]
        dropped = [i for i, verdict in enumerate(result.safety) if verdict.unsafe]
        logs = [f"seed: {result.seed}"]
        if result.notice:
            logs.insert(0, result.notice)
        if dropped:
            logs.append(f"safety checker removed {len(dropped)} of {len(result.safety)} images")
        finished = self.lifecycle.finish(
            job,
            self.config.worker_id,
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
            self.files.delete(names)

"""Overlap: does one job's CPU work (safety check, encode, store, record) hide under the
next job's model work? Images/s of a real worker loop at concurrency 4, overlap on and off.

The worker is the real one (worker/loop.py: claim, heartbeats, model stage, post stage on
its background slot, outputs written to a blob store, ends recorded in SQLite), run in this
process against a SQLite store in a temporary directory. Four client threads each keep one
prediction queued or running (create, wait for its end, create the next), so the queue is
never empty. No HTTP server: what is measured is the worker's pipeline, not the API
(benchmarks/service.py measures that), and on a small machine an API process would take
CPU from the very stages being overlapped.

Two models:

- fake: a fixed "GPU time" per job (steps x step seconds, a sleep) and a fixed "CPU time"
  (a sleep in the post stage, as GIL-releasing as a real encoder: see worker/fake.py), for
  several CPU/model ratios. The ideal is 1 / (model time per image) when the CPU work is
  the smaller one: the model never waits.
- demo: the real tiny random-weight FLUX pipeline, the real NudeNet check and real encoding.
  Here both stages run on this machine's CPU cores, so they compete for them: its figures
  say how much overlap buys on a CPU-only machine, not what it buys next to a GPU.

Throughput is the steady state: (jobs - 1) / (time from the first job's end to the last's),
so the pipeline's filling and draining do not count; each figure is the median of --runs
runs in this one process, on and off interleaved (a shared machine is noisy). The demo's
model and CPU time per job are the medians of the jobs' own recorded timings (prior +
denoise + decode; safety + encode) in the runs without overlap. Not a test.

    python benchmarks/overlap.py                 # fake ratios, then the demo model
    python benchmarks/overlap.py --skip-demo     # the fake model only (no torch)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fluxredux.backends.sqlite.jobs import SQLiteJobStore
from fluxredux.jobs import Lifecycle
from fluxredux.jobs.job import Job, Status, new_id
from fluxredux.pipeline.fake import FakeModel
from fluxredux.pipeline.protocol import ImageModel
from fluxredux.safety import SafetyChecker
from fluxredux.schema import PredictionInput
from fluxredux.storage import LocalBlobStore
from fluxredux.storage.blobs import key_id, new_key
from fluxredux.worker.loop import Worker, WorkerConfig
from fluxredux.worker.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = 4
FAKE_STEPS = 4
FAKE_RATIOS = (0.25, 0.5, 0.9, 1.5)  # CPU time / model time per job


@dataclass(frozen=True)
class Scenario:
    name: str
    predictor: Predictor
    inputs: dict[str, Any]  # each job's input, besides its reference image
    images_per_job: int
    # The model's and the post stage's time per job, when fixed (the fake model). None:
    # measured, as the medians of the jobs' own timings in the runs without overlap.
    fixed_seconds: tuple[float, float] | None = None


MODEL_TIMINGS = ("prior", "denoise", "decode")  # what the model reports of its stage
CPU_TIMINGS = ("post_work", "safety", "encode")  # what the predictor's post stage reports


@dataclass(frozen=True)
class Run:
    images_per_s: float  # steady state
    model_seconds: list[float]  # per job, from its recorded timings
    cpu_seconds: list[float]


def run_worker(scenario: Scenario, overlap: bool, jobs: int, data_dir: Path) -> Run:
    """One run: ``jobs`` predictions through a fresh worker."""
    store = SQLiteJobStore(data_dir / "jobs.db")
    blobs = LocalBlobStore(data_dir / "files")
    ended: dict[str, threading.Event] = {}
    end_times: list[float] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def publish(job: Job) -> None:
        if job.is_terminal:
            with lock:
                end_times.append(time.perf_counter())
                outcomes.append(job.status.value)
            ended[job.id].set()

    lifecycle = Lifecycle(store, publish=publish)
    worker = Worker(
        lifecycle,
        scenario.predictor,
        blobs,
        WorkerConfig(worker_id="bench", idle_poll_seconds=0.05, overlap=overlap),
    )
    reference = io.BytesIO()
    Image.new("RGB", (256, 256), (90, 140, 200)).save(reference, "PNG")
    remaining = list(range(jobs))

    def client() -> None:
        while True:
            with lock:
                if not remaining:
                    return
                remaining.pop()
            key = new_key("png")
            blobs.put(key, reference.getvalue(), "image/png")
            inputs = PredictionInput.model_validate({"redux_image": key_id(key), **scenario.inputs})
            job = Job(
                id=new_id(),
                owner="bench",
                input=inputs.model_dump(mode="json"),
                created_at=store.now(),
                input_files=[key],
            )
            ended[job.id] = threading.Event()
            lifecycle.create(job)
            worker.wakeup.set()
            if not ended[job.id].wait(600):
                raise RuntimeError(f"job {job.id} never ended")

    stop = threading.Event()
    clients = [threading.Thread(target=client) for _ in range(CONCURRENCY)]

    def stop_when_served() -> None:
        for thread in clients:
            thread.join()
        stop.set()
        worker.wakeup.set()

    for thread in clients:
        thread.start()
    threading.Thread(target=stop_when_served).start()
    # The loop on the main thread, as in a worker process: on another thread the demo model
    # ran as fast as with torch.set_num_threads(1) (on a busy 2-core machine ~5x faster
    # than with the main thread's 2), which would measure some other worker.
    worker.run_forever(stop)
    metrics = [job.metrics for job in store.find([Status.SUCCEEDED])]
    store.close()
    if outcomes != ["succeeded"] * jobs:
        raise RuntimeError(f"not every prediction succeeded: {outcomes}")
    end_times.sort()
    return Run(
        images_per_s=(jobs - 1) * scenario.images_per_job / (end_times[-1] - end_times[0]),
        model_seconds=[sum(m.get(k, 0.0) for k in MODEL_TIMINGS) for m in metrics],
        cpu_seconds=[sum(m.get(k, 0.0) for k in CPU_TIMINGS) for m in metrics],
    )


def measure_scenario(scenario: Scenario, jobs: int, runs: int) -> dict[str, Any]:
    results: dict[bool, list[Run]] = {True: [], False: []}
    for _ in range(runs):
        for overlap in (True, False):  # interleaved: a busy spell of the machine hits both
            with tempfile.TemporaryDirectory(prefix="fluxredux-overlap-") as tmp:
                results[overlap].append(run_worker(scenario, overlap, jobs, Path(tmp)))
    if scenario.fixed_seconds is not None:
        model_seconds, cpu_seconds = scenario.fixed_seconds
    else:  # each stage's time when the other one does not run meanwhile
        model_seconds = statistics.median(t for run in results[False] for t in run.model_seconds)
        cpu_seconds = statistics.median(t for run in results[False] for t in run.cpu_seconds)
    ideal = scenario.images_per_job / model_seconds
    # With more CPU than model work the CPU is the bottleneck: its rate is the best possible.
    best = scenario.images_per_job / max(model_seconds, cpu_seconds)
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "model_seconds_per_job": round(model_seconds, 4),
        "cpu_seconds_per_job": round(cpu_seconds, 4),
        "cpu_over_model": round(cpu_seconds / model_seconds, 3),
        "images_per_job": scenario.images_per_job,
        "ideal_images_per_s": round(ideal, 3),
        "best_possible_images_per_s": round(best, 3),
        "serial_images_per_s": round(scenario.images_per_job / (model_seconds + cpu_seconds), 3),
    }
    for overlap, measured in results.items():
        label = "on" if overlap else "off"
        median = statistics.median(run.images_per_s for run in measured)
        row[f"overlap_{label}_images_per_s"] = round(median, 3)
        row[f"overlap_{label}_runs"] = [round(run.images_per_s, 3) for run in measured]
        row[f"overlap_{label}_of_ideal"] = round(median / ideal, 3)
        row[f"overlap_{label}_of_best_possible"] = round(median / best, 3)
        if scenario.fixed_seconds is None:  # what sharing the CPU does to each stage
            row[f"overlap_{label}_model_seconds_per_job"] = round(
                statistics.median(t for run in measured for t in run.model_seconds), 4
            )
    print(
        f"{scenario.name:<18} model {model_seconds:6.3f} s  cpu {cpu_seconds:6.3f} s  "
        f"ideal {ideal:6.2f}/s  on {row['overlap_on_images_per_s']:6.2f}/s "
        f"({row['overlap_on_of_ideal']:5.1%})  off {row['overlap_off_images_per_s']:6.2f}/s "
        f"({row['overlap_off_of_ideal']:5.1%})  best possible {best:6.2f}/s",
        flush=True,
    )
    return row


def fake_scenarios(step_seconds: float) -> list[Scenario]:
    model_seconds = FAKE_STEPS * step_seconds
    return [
        Scenario(
            name=f"fake cpu={ratio:g}x",
            predictor=Predictor(FakeModel(step_seconds, cpu_seconds=ratio * model_seconds), None),
            inputs={"num_inference_steps": FAKE_STEPS, "disable_safety_checker": True, "megapixels": "0.25"},
            images_per_job=1,
            fixed_seconds=(model_seconds, ratio * model_seconds),
        )
        for ratio in FAKE_RATIOS
    ]


def demo_scenario() -> tuple[Scenario, dict[str, Any]]:
    """The demo model with the real checker and encoder, warmed up."""
    import torch

    from fluxredux.config import Settings
    from fluxredux.pipeline.loading import load_model
    from fluxredux.worker.factories import build_checker

    settings = Settings(model="demo", device="cpu")
    model: ImageModel = load_model(settings)
    checker: SafetyChecker = build_checker(settings)
    predictor = Predictor(model, checker)
    inputs = {"num_inference_steps": 4, "megapixels": "0.25", "output_format": "webp", "num_outputs": 1}
    parsed = PredictionInput.model_validate({"redux_image": "https://example.com/r.png", **inputs})
    # First-call costs (allocations, the checker's session) stay out of the figures.
    predictor.predict(parsed, [Image.new("RGB", (256, 256), (90, 140, 200))])
    about = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": model.info.describe(),
    }
    return Scenario(name="demo", predictor=predictor, inputs=inputs, images_per_job=1), about


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported")
    parser.add_argument("--jobs", type=int, default=12, help="predictions per run (fake model)")
    parser.add_argument("--demo-jobs", type=int, default=8, help="predictions per run (demo model)")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="the fake model's time per step")
    parser.add_argument("--skip-demo", action="store_true", help="the fake model only")
    parser.add_argument("--skip-fake", action="store_true", help="the demo model only")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "benchmarks" / "results" / "overlap.json",
        help="where the JSON report goes (default benchmarks/results/overlap.json)",
    )
    args = parser.parse_args()
    print(
        f"concurrency {CONCURRENCY}, medians of {args.runs} runs; {os.cpu_count()} CPU cores, "
        f"{platform.platform()}",
        flush=True,
    )
    load_before = os.getloadavg()
    rows = []
    if not args.skip_fake:
        rows += [measure_scenario(s, args.jobs, args.runs) for s in fake_scenarios(args.step_seconds)]
    demo: dict[str, Any] | None = None
    if not args.skip_demo:
        scenario, demo = demo_scenario()
        rows.append(measure_scenario(scenario, args.demo_jobs, args.runs))
    report = {
        "benchmark": "overlap",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            # Other work on the machine (1, 5, 15 min): the demo's figures depend on it.
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "concurrency": CONCURRENCY,
        "runs": args.runs,
        "jobs": args.jobs,
        "demo_jobs": args.demo_jobs,
        "demo": demo,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()

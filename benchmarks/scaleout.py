"""Scale-out throughput: predictions/s with 1, 2 and 4 workers against the linear ideal.

Starts, all on loopback and in a temporary directory that is removed afterwards:
- a private `redis-server` (no persistence) on a free port;
- one API node, `fluxredux serve --redis URL --workers 0 --model fake`, with its own data
  dir and `file://` storage;
- `fluxredux worker --redis URL --model fake` processes with FLUXREDUX_FAKE_STEP_SECONDS
  set so that one prediction takes a fixed time (`--job-seconds`, spread over `--steps`
  denoising steps; the fake model sleeps, then encodes a flat 512x512 JPEG).

The workers are added one run after another (1, then 2, then 4: the earlier ones stay).
For each count N, a closed-loop client keeps `--concurrency-per-worker` x N predictions
in flight (create, then long-poll `GET ?wait=60` until it ends, then create the next)
until `--jobs` predictions have been created, so the queue never runs dry while the last
ones are created. Reported per N: wall time (first create sent -> last result received),
predictions/s, the ideal N / job_seconds, efficiency = measured / ideal, and the median
create -> done latency seen by the client (with C = 2N in flight, about 2 x job_seconds
when nothing is lost). After the runs it reads Redis's own figures for the memory one
prediction costs (its job document, and the growth of `used_memory` per job with the
indexes beside it).

The API key is made by the real command line (`fluxredux keys create --redis URL`). The
node's per-key limits are raised through its environment (FLUXREDUX_RATE_LIMIT_PER_MINUTE,
FLUXREDUX_READ_LIMIT_PER_MINUTE, FLUXREDUX_MAX_IN_FLIGHT_PER_KEY): the default 60
creations a minute per key is far below what 4 workers of a 0.4 s model finish.

Every process of the deployment runs on this one machine: with few CPU cores, the API
node, Redis, the client and the workers' own service work (claim, heartbeats, encoding,
storing, recording) share them, so efficiency beyond the core count measures the machine,
not the design. Not a test; figures are noisy on shared machines.

    python benchmarks/scaleout.py [--workers 1,2,4] [--jobs 40] [--job-seconds 0.4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLUXREDUX = str(Path(sys.executable).with_name("fluxredux"))
PREFIX = "bench-scaleout:"
REDIS_NO_PERSISTENCE = ["--save", "", "--appendonly", "no"]  # a benchmark's Redis
TERMINAL = {"success", "error", "cancelled"}
RAISED_LIMITS = {
    "FLUXREDUX_RATE_LIMIT_PER_MINUTE": "1000000",
    "FLUXREDUX_READ_LIMIT_PER_MINUTE": "1000000",
    "FLUXREDUX_MAX_IN_FLIGHT_PER_KEY": "100000",
}


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a worker drains its job, then exits), then SIGKILL if it lingers."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Deployment:
    """Redis, one API node and workers, each process with its own data dir and log."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        self.procs: list[Proc] = []
        self.redis_url = ""
        self.storage = f"file://{root / 'storage'}"
        self.node_url = ""
        self.key = ""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "COLUMNS": "200",
            "FLUXREDUX_REDIS_PREFIX": PREFIX,
            "FLUXREDUX_FAKE_STEP_SECONDS": repr(self.args.job_seconds / self.args.steps),
            **(extra or {}),
        }

    def common(self, name: str) -> list[str]:
        """The flags every node and worker gets: the deployment, and a data dir of its own."""
        return [
            *("--redis", self.redis_url, "--storage", self.storage, "--model", "fake"),
            *("--data-dir", str(self.root / name)),
        ]

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        port = free_port()
        data = self.root / "redis"
        data.mkdir()
        proc = self._spawn(
            "redis",
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), *REDIS_NO_PERSISTENCE],
            dict(os.environ),
        )

        def listens() -> bool:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited at start:\n{proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(listens, 20, "redis-server listening")
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def create_key(self) -> None:
        """The deployment's API key, made as an operator makes it."""
        done = subprocess.run(
            [FLUXREDUX, "keys", "create", "--name", "benchmark", "--redis", self.redis_url],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=60,
            check=True,
        )
        self.key = done.stdout.strip().splitlines()[-1]

    def start_node(self) -> None:
        port = free_port()
        proc = self._spawn(
            "api",
            [FLUXREDUX, "serve", "--workers", "0", "--port", str(port), *self.common("api")],
            self.env(RAISED_LIMITS),
        )
        self.node_url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            if not proc.alive():
                raise RuntimeError(f"the API node exited at start:\n{proc.tail()}")
            try:
                return httpx.get(self.node_url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 60, "the API node answering /health")

    def add_worker(self) -> Proc:
        index = sum(1 for p in self.procs if p.name.startswith("worker-"))
        name = f"worker-{index}"
        return self._spawn(
            name,
            [FLUXREDUX, "worker", *self.common(name)],
            self.env(),
        )

    def wait_workers_ready(self, count: int) -> None:
        """Until the node's /health counts ``count`` ready workers (it reads the registry)."""

        def ready() -> bool:
            for proc in self.procs:
                if proc.name.startswith("worker-") and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            health = httpx.get(self.node_url + "/health", timeout=5).json()
            return int(health["model"].get("workers_ready", 0)) >= count

        wait_until(ready, 90, f"{count} worker(s) ready")

    def stop(self) -> None:
        """Workers first (they drain), then the node, then Redis; each one, whatever failed."""
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc.name}: {exc}", file=sys.stderr)


@contextmanager
def deployment(args: argparse.Namespace) -> Iterator[Deployment]:
    root = Path(tempfile.mkdtemp(prefix="fluxredux-scaleout-"))
    deployed = Deployment(root, args)
    try:
        yield deployed
    except BaseException:
        for proc in deployed.procs:
            if proc.name != "redis":
                print(f"--- {proc.name} (last lines) ---\n{proc.tail(1500)}", file=sys.stderr)
        raise
    finally:
        deployed.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- load -----------------------------------------------------------------------------------


def reference_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def run_jobs(
    url: str, key: str, body: dict[str, Any], count: int, concurrency: int
) -> tuple[list[dict[str, Any]], float]:
    """``count`` predictions, ``concurrency`` at a time, each created and then long-polled
    to its end; the results (with the client's latency) and the wall time."""
    remaining = count
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": key}, timeout=90, limits=limits
    ) as client:

        async def one() -> dict[str, Any]:
            sent = time.perf_counter()
            created = await client.post("/v1/prediction/", json=body)
            if created.status_code != 200:
                raise RuntimeError(f"create failed: {created.status_code} {created.text}")
            prediction_id = created.json()["predictionID"]
            while True:
                got = await client.get(f"/v1/prediction/{prediction_id}", params={"wait": 60})
                if got.status_code != 200:
                    raise RuntimeError(f"poll failed: {got.status_code} {got.text}")
                result = got.json()
                if result["status"] in TERMINAL:
                    break
            if result["status"] != "success":
                raise RuntimeError(
                    f"prediction {prediction_id} ended {result['status']}: {result.get('error')}"
                )
            return {"latency": time.perf_counter() - sent, "id": prediction_id, **result["metrics"]}

        async def slot() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1  # no await between the test and this: one event loop
                results.append(await one())

        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(concurrency)))
        return results, time.perf_counter() - started


# --- Redis's own figures --------------------------------------------------------------------


def redis_memory(redis_url: str, job_ids: list[str]) -> dict[str, Any]:
    """What jobs cost in Redis, by its own MEMORY USAGE: one job document (median and
    largest of a sample), and every key of the job store (documents and the sorted-set
    indexes beside them) divided by the number of jobs."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        sample = job_ids[:50]
        sizes = [client.memory_usage(f"{PREFIX}jobs:job:{job_id}", samples=0) or 0 for job_id in sample]
        jobs = store = 0
        for key in client.scan_iter(f"{PREFIX}jobs:*", count=1000):
            store += client.memory_usage(key, samples=0) or 0
            jobs += key.startswith(f"{PREFIX}jobs:job:")
        return {
            "job_key_bytes_median": statistics.median(sizes) if sizes else None,
            "job_key_bytes_max": max(sizes) if sizes else None,
            "jobs_in_redis": jobs,
            "job_store_bytes": store,
            "job_store_bytes_per_job": store / max(1, jobs),
            "used_memory_bytes": int(client.info("memory")["used_memory"]),
        }
    finally:
        client.close()


def redis_used_memory(redis_url: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


# --- main -----------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    body = {
        "model": "flux-redux-schnell",
        "version": "0.0.1",
        "input": {
            "redux_image": reference_image(),
            "megapixels": "0.25",
            "num_inference_steps": args.steps,
            "output_format": "jpg",
            "disable_safety_checker": True,
        },
    }
    rows: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    with deployment(args) as cluster:
        cluster.start_redis()
        cluster.create_key()
        cluster.start_node()
        baseline_memory = redis_used_memory(cluster.redis_url)
        all_ids: list[str] = []
        for count in sorted(set(args.workers)):
            while sum(1 for p in cluster.procs if p.name.startswith("worker-")) < count:
                cluster.add_worker()
            cluster.wait_workers_ready(count)
            concurrency = max(count + 1, args.concurrency_per_worker * count)
            # Warm-up: connections, first imports in the workers, Redis scripts loaded.
            warm, _ = asyncio.run(run_jobs(cluster.node_url, cluster.key, body, count * 2, concurrency))
            results, wall = asyncio.run(run_jobs(cluster.node_url, cluster.key, body, args.jobs, concurrency))
            all_ids += [r["id"] for r in warm + results]
            measured = len(results) / wall
            ideal = count / args.job_seconds
            row = {
                "workers": count,
                "jobs": len(results),
                "concurrency": concurrency,
                "wall_s": wall,
                "per_second": measured,
                "ideal_per_second": ideal,
                "efficiency": measured / ideal,
                "latency_p50_s": statistics.median(r["latency"] for r in results),
                "latency_max_s": max(r["latency"] for r in results),
                "predict_time_p50_s": statistics.median(r["predict_time"] for r in results),
                "queue_time_p50_s": statistics.median(r.get("queue_time") or 0.0 for r in results),
            }
            rows.append(row)
            print(
                f"  measured {count} worker(s): {len(results)} jobs in {wall:.2f} s "
                f"({measured:.2f}/s, {100 * row['efficiency']:.0f}% of ideal)",
                flush=True,
            )
        memory = redis_memory(cluster.redis_url, all_ids)
        memory["used_memory_growth_bytes"] = memory["used_memory_bytes"] - baseline_memory
    return {"rows": rows, "redis_memory": memory}


def print_table(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print()
    print(
        f"scale-out, fake model: {args.job_seconds:g} s per prediction ({args.steps} steps x "
        f"{args.job_seconds / args.steps:g} s), {args.jobs} predictions per row"
    )
    header = (
        f"{'workers':>7} {'in flight':>9} {'wall s':>7} {'pred/s':>7} {'ideal/s':>7} "
        f"{'effic.':>6} {'p50 create->done s':>19} {'p50 predict_time s':>19}"
    )
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        print(
            f"{row['workers']:>7} {row['concurrency']:>9} {row['wall_s']:>7.2f} {row['per_second']:>7.2f} "
            f"{row['ideal_per_second']:>7.2f} {100 * row['efficiency']:>5.0f}% "
            f"{row['latency_p50_s']:>19.3f} {row['predict_time_p50_s']:>19.3f}"
        )
    memory = report["redis_memory"]
    print()
    print(
        f"Redis (MEMORY USAGE): a finished job's document {memory['job_key_bytes_median']:.0f} bytes "
        f"(median of {min(50, memory['jobs_in_redis'])}); with its index entries "
        f"{memory['job_store_bytes_per_job']:.0f} bytes per job ({memory['jobs_in_redis']} jobs); "
        f"used_memory grew {memory['used_memory_growth_bytes'] / 1024:.0f} KiB in all."
    )
    print(
        "The API node ran with per-key limits raised through its environment: "
        + ", ".join(f"{k}={v}" for k, v in RAISED_LIMITS.items())
        + "."
    )
    print(
        f"Everything ran on this machine ({os.cpu_count()} CPU cores): Redis, the API node, the client "
        "and every worker share them. Past the core count, workers of the fake model are bound by the "
        "service's CPU work on this machine, not by the model; on real GPUs each worker is on its own."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4],
        help="worker counts to measure, comma-separated (default 1,2,4)",
    )
    parser.add_argument(
        "--jobs", type=int, default=40, help="predictions measured per worker count (default 40)"
    )
    parser.add_argument(
        "--job-seconds", type=float, default=0.4, help="the fake model's time per prediction (default 0.4)"
    )
    parser.add_argument(
        "--steps", type=int, default=4, choices=range(1, 5), help="denoising steps (default 4)"
    )
    parser.add_argument(
        "--concurrency-per-worker",
        type=int,
        default=2,
        help="predictions the client keeps in flight per worker (default 2; at least workers + 1)",
    )
    parser.add_argument(
        "--json",
        "--out",
        dest="json",
        type=Path,
        default=REPO / "benchmarks" / "results" / "scaleout.json",
        help="where the JSON report goes (default benchmarks/results/scaleout.json)",
    )
    args = parser.parse_args()
    if args.jobs < 1 or args.job_seconds <= 0 or min(args.workers) < 1:
        parser.error("--jobs, --job-seconds and every --workers count must be positive")

    print(f"starting Redis, one API node and up to {max(args.workers)} worker(s) on loopback...", flush=True)
    report = measure(args)
    print_table(args, report)
    full = {
        "benchmark": "scaleout",
        "cpu_count": os.cpu_count(),
        "job_seconds": args.job_seconds,
        "steps": args.steps,
        "jobs_per_row": args.jobs,
        "raised_limits": RAISED_LIMITS,
        **report,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(full, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

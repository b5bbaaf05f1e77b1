"""What the service adds on top of the model, where that time goes, and throughput.

Starts `fluxredux serve --model fake` (a zero-time model: flat colours) and, in the same
run, a bare FastAPI app with one trivial endpoint on the same uvicorn. Then, at
concurrency 1, 10 and 50:
- service: create -> result via long-poll (POST + GET ?wait=), end to end; "added" is
  that minus the worker's own predict_time (which, with the fake model, is just
  encoding a flat 512x512 image);
- bare: two round trips to the trivial endpoint (a prediction costs two requests).

Where the added time goes, per prediction (client clock and the job's own times, which the
server and its worker stamp with the same wall clock on this machine):

    create            POST sent -> POST answered (the create's round trip)
    accept            POST sent -> the job's created_at (parse, auth, the reference stored)
    queued->claimed   created_at -> started_at (the worker's claim)
    worker            started_at -> completed_at, less run (lease, reference read, the end recorded)
    run               the worker's predict_time (the model's stage and the post stage)
      model's own     of run: what the model's timings say it spent (with the fake model:
                      encoding the image; no model ran)
      run, not model  the rest of run: the service's work inside it (each step's cancel check
                      and progress write, reading and decoding the reference, storing outputs)
    finished->answer  completed_at -> the long-poll's answer at the client

accept + queued->claimed + worker + finished->answer = added, exactly (run is left out);
create overlaps the others (a claim may happen before the POST's answer arrives). A part
whose p50 is a sizeable share of one of the service's timers (the worker's idle poll, the
long-poll's recheck) is flagged: it waits on the timer instead of being woken. At c=10 and 50
queued->claimed is mostly queueing behind the other jobs (one worker), not overhead, so it is
flagged at c=1 only.

Prints p50/p99 and predictions/s and writes JSON. Not a test; figures are noisy on
shared machines, so compare numbers from one run only. The server's output goes to a log
file (named at the end), read while it runs, so the server never blocks on a full pipe.

    python benchmarks/service.py [--predictions 200] [--concurrency 1,10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLUXREDUX = str(Path(sys.executable).with_name("fluxredux"))

# The parts of a prediction's added time that sum to it (see the docstring), then the others.
SUM_PARTS = ("accept", "queued->claimed", "worker", "finished->answer")
PARTS = ("create", *SUM_PARTS, "run", "model's own", "run, not model")
# The model's own timings among a prediction's metrics (the rest of them: the service's).
MODEL_TIMINGS = ("prior", "denoise", "decode", "post_work", "safety", "encode")
# A part whose p50 is at least this share of a timer looks like a wait on it (a wait on a
# timer that fires at a random moment averages half its interval).
TIMER_SHARE = 0.25


def service_timers() -> dict[str, tuple[str, float]]:
    """The timers that could stand in for a wake-up, by the part they would show in."""
    from fluxredux.api.prediction_actions import LONG_POLL_RECHECK_SECONDS
    from fluxredux.worker.loop import WorkerConfig

    return {
        "queued->claimed": ("the worker's idle poll", WorkerConfig("x").idle_poll_seconds),
        "finished->answer": ("the long-poll's recheck", LONG_POLL_RECHECK_SECONDS),
    }


def bare_app_main(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "success", "n": len(body)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:] if log else ''}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def admin_key(log: Path, process: subprocess.Popen[bytes]) -> str:
    """The API key `serve` prints at its first start, read from its log file."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"no API key in the server's output: {log.read_text()[-2000:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wall(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def run_load(clients: list[httpx.AsyncClient], count: int, one: Any) -> tuple[list[Any], float]:
    """``count`` calls of ``one(client)``, one caller per client at a time (the concurrency)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    results: list[Any] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            results.append(await one(client))

    started = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    return results, time.perf_counter() - started


def summarise(name: str, concurrency: int, results: list[dict[str, float]], elapsed: float) -> dict[str, Any]:
    latency = [r["total"] for r in results]
    added = [r["total"] - r.get("run", 0.0) for r in results]
    row: dict[str, Any] = {
        "target": name,
        "concurrency": concurrency,
        "count": len(results),
        "p50_ms": percentile(latency, 0.5) * 1000,
        "p99_ms": percentile(latency, 0.99) * 1000,
        "added_p50_ms": percentile(added, 0.5) * 1000,
        "added_p99_ms": percentile(added, 0.99) * 1000,
        "per_second": len(results) / elapsed,
    }
    if name == "service":
        row["model_p50_ms"] = statistics.median(r["run"] for r in results) * 1000
        timers = service_timers()
        breakdown, flags = {}, []
        for part in PARTS:
            values = [r[part] for r in results]
            p50 = percentile(values, 0.5)
            breakdown[part] = {"p50_ms": p50 * 1000, "p99_ms": percentile(values, 0.99) * 1000}
            queueing = part == "queued->claimed" and concurrency > 1
            if part in timers and not queueing and p50 >= TIMER_SHARE * timers[part][1]:
                timer, seconds = timers[part]
                flags.append(f"{part} p50 {p50 * 1000:.0f} ms ~ {timer} ({seconds:g} s): a wait on a timer")
        row["breakdown"] = breakdown
        row["timer_flags"] = flags
        # The tail: the slowest 2% by added time, each with its parts (which part made it slow).
        slowest = sorted(results, key=lambda r: r["total"] - r["run"], reverse=True)[
            : max(1, len(results) // 50)
        ]
        row["slowest"] = [
            {"added_ms": (r["total"] - r["run"]) * 1000, **{part: r[part] * 1000 for part in PARTS}}
            for r in slowest
        ]
    return row


async def measure(
    args: argparse.Namespace, service_url: str, key: str, bare_url: str
) -> list[dict[str, Any]]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "model": "flux-redux-schnell",
        "input": {"redux_image": image, "megapixels": "0.25", "disable_safety_checker": True},
    }
    rows = []
    # A client (its own connection pool) per concurrent caller: one pool shared by 50 callers
    # costs the client more per request than the bare app does (httpx's pool looks through its
    # requests and connections on every change): at c=50 the benchmark measured its own
    # client, 78 bare pairs/s instead of 479 (this 2-core machine).
    headers = {"X-API-Key": key}

    def clients(n: int, with_key: bool) -> list[httpx.AsyncClient]:
        return [httpx.AsyncClient(headers=headers if with_key else None, timeout=60) for _ in range(n)]

    async def prediction(client: httpx.AsyncClient) -> dict[str, float]:
        started, sent = time.perf_counter(), time.time()
        created = await client.post(f"{service_url}/v1/prediction/", json=body)
        created_in = time.perf_counter() - started
        prediction_id = created.json()["predictionID"]
        result = (
            await client.get(f"{service_url}/v1/prediction/{prediction_id}", params={"wait": 30})
        ).json()
        total, answered = time.perf_counter() - started, time.time()
        assert result["status"] == "success", result
        metrics = result["metrics"]
        run = metrics["predict_time"]
        model = sum(metrics.get(name, 0.0) for name in MODEL_TIMINGS)
        created_at, started_at = wall(result["created_at"]), wall(result["started_at"])
        completed_at = wall(result["completed_at"])
        return {
            "total": total,
            "run": run,
            "model's own": model,
            "run, not model": run - model,
            "create": created_in,
            "accept": created_at - sent,
            "queued->claimed": started_at - created_at,
            "worker": completed_at - started_at - run,
            "finished->answer": answered - completed_at,
        }

    async def bare(client: httpx.AsyncClient) -> dict[str, float]:
        started = time.perf_counter()
        await client.post(f"{bare_url}/echo", json={"a": 1})
        await client.post(f"{bare_url}/echo", json={"a": 1})
        return {"total": time.perf_counter() - started}

    for concurrency in args.concurrency:
        pair = []
        for name, one in (("service", prediction), ("bare", bare)):
            callers = clients(concurrency, with_key=name == "service")
            try:
                # Warm-up: this level's connections opened (a burst of new connections on
                # busy cores can overflow a listen queue: a dropped SYN waits 1 s), caches.
                await run_load(callers, max(20, concurrency), one)
                results, elapsed = await run_load(callers, args.predictions, one)
            finally:
                await asyncio.gather(*(caller.aclose() for caller in callers))
            row = summarise(name, concurrency, results, elapsed)
            rows.append(row)
            pair.append(row)
        print_pair(*pair)
    return rows


NOTES = {
    "create": "  (overlaps the rest)",
    "run": "  (not in added)",
    "model's own": "  (of run)",
    "run, not model": "  (of run: the service's work inside it)",
}


def print_pair(service: dict[str, Any], bare: dict[str, Any]) -> None:
    c = service["concurrency"]
    print(
        f"c={c:<3} service  p50 {service['p50_ms']:7.2f} ms  p99 {service['p99_ms']:7.2f} ms   "
        f"added p50 {service['added_p50_ms']:7.2f} ms  p99 {service['added_p99_ms']:7.2f} ms   "
        f"{service['per_second']:6.1f}/s",
        flush=True,
    )
    print(
        f"      bare     p50 {bare['p50_ms']:7.2f} ms  p99 {bare['p99_ms']:7.2f} ms   (two round trips)"
        f"{'':30}{bare['per_second']:6.1f}/s",
        flush=True,
    )
    for part in PARTS:
        figures = service["breakdown"][part]
        note = NOTES.get(part, "")
        if part == "queued->claimed" and c > 1:
            note = f"  (mostly the queue: {c} clients, one worker)"
        label = f"  {part}" if part in ("model's own", "run, not model") else part
        print(f"        {label:18} p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms{note}")
    for slow in service["slowest"][:3]:
        worst = max(SUM_PARTS, key=lambda part: slow[part])
        print(f"        slow one: added {slow['added_ms']:6.2f} ms, of it {worst} {slow[worst]:6.2f} ms")
    for flag in service["timer_flags"]:
        print(f"        FLAG: {flag}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictions", type=int, default=200, help="per concurrency level")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 50])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "service.json")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_app_main(args.bare_server)
        return

    data_dir = Path(tempfile.mkdtemp(prefix="fluxredux-bench-"))
    service_log = data_dir / "serve.log"
    service_port, bare_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLUXREDUX_RATE_LIMIT_PER_MINUTE": "1000000",
        "FLUXREDUX_READ_LIMIT_PER_MINUTE": "1000000",
        "FLUXREDUX_MAX_IN_FLIGHT_PER_KEY": "100000",
    }
    load_before = os.getloadavg()
    # The server's output to a file, never a pipe: a pipe nobody reads fills up (its access
    # log and the worker's lines) and the server then blocks on its next write.
    with service_log.open("wb") as log_file:
        service = subprocess.Popen(
            [FLUXREDUX, "serve", "--model", "fake", "--port", str(service_port), "--data-dir", str(data_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
    service_url, bare_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{bare_port}"
    try:
        wait_ready(f"{service_url}/health", service, service_log)
        wait_ready(f"{bare_url}/docs", bare)
        key = admin_key(service_log, service)
        rows = asyncio.run(measure(args, service_url, key, bare_url))
    finally:
        for process in (service, bare):
            process.terminate()
        for process in (service, bare):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                print(f"pid {process.pid} did not stop in 15 s: killed", file=sys.stderr)
                process.kill()
                process.wait()
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    report = {
        "benchmark": "service",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "server_log": str(service_log),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}; the server's log: {service_log}")


if __name__ == "__main__":
    main()

"""What the service adds on top of the model: latency per prediction and throughput.

Starts `fluxredux serve --model fake` (a zero-time model: flat colours) and, in the same
run, a bare FastAPI app with one trivial endpoint on the same uvicorn. Then, at
concurrency 1, 10 and 50:
- service: create -> result via long-poll (POST + GET ?wait=), end to end; "added" is
  that minus the worker's own predict_time (which, with the fake model, is just
  encoding a flat 512x512 image);
- bare: two round trips to the trivial endpoint (a prediction costs two requests).
Prints p50/p99 and predictions/s and writes JSON. Not a test; figures are noisy on
shared machines, so compare numbers from one run only.

    python benchmarks/service.py [--predictions 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLUXREDUX = str(Path(sys.executable).with_name("fluxredux"))


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


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited"
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_load(count: int, concurrency: int, one: Any) -> tuple[list[Any], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    results: list[Any] = []

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            results.append(await one())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


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
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    rows = []
    async with httpx.AsyncClient(headers={"X-API-Key": key}, timeout=60, limits=limits) as client:

        async def prediction() -> tuple[float, float]:
            started = time.perf_counter()
            created = await client.post(f"{service_url}/v1/prediction/", json=body)
            prediction_id = created.json()["predictionID"]
            result = (
                await client.get(f"{service_url}/v1/prediction/{prediction_id}", params={"wait": 30})
            ).json()
            assert result["status"] == "success", result
            return time.perf_counter() - started, result["metrics"]["predict_time"]

        async def bare() -> tuple[float, float]:
            started = time.perf_counter()
            await client.post(f"{bare_url}/echo", json={"a": 1})
            await client.post(f"{bare_url}/echo", json={"a": 1})
            return time.perf_counter() - started, 0.0

        await run_load(20, 1, prediction)  # warm-up: connections, caches, JIT-less but still
        await run_load(20, 1, bare)
        for concurrency in args.concurrency:
            for name, one in (("service", prediction), ("bare", bare)):
                results, elapsed = await run_load(args.predictions, concurrency, one)
                latency = [r[0] for r in results]
                added = [r[0] - r[1] for r in results]
                row = {
                    "target": name,
                    "concurrency": concurrency,
                    "count": len(results),
                    "p50_ms": percentile(latency, 0.5) * 1000,
                    "p99_ms": percentile(latency, 0.99) * 1000,
                    "added_p50_ms": percentile(added, 0.5) * 1000,
                    "added_p99_ms": percentile(added, 0.99) * 1000,
                    "model_p50_ms": statistics.median(r[1] for r in results) * 1000,
                    "per_second": len(results) / elapsed,
                }
                rows.append(row)
                print(
                    f"{name:8} c={concurrency:<3} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"added p50 {row['added_p50_ms']:7.2f} ms  {row['per_second']:7.1f}/s",
                    flush=True,
                )
    return rows


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
    service_port, bare_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLUXREDUX_RATE_LIMIT_PER_MINUTE": "1000000",
        "FLUXREDUX_READ_LIMIT_PER_MINUTE": "1000000",
        "FLUXREDUX_MAX_IN_FLIGHT_PER_KEY": "100000",
    }
    service = subprocess.Popen(
        [FLUXREDUX, "serve", "--model", "fake", "--port", str(service_port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
    service_url, bare_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{bare_port}"
    try:
        wait_ready(f"{service_url}/health", service)
        wait_ready(f"{bare_url}/docs", bare)
        key = None
        assert service.stdout is not None
        while key is None:
            match = re.search(rb"(fr_[0-9a-f]{12}_[A-Za-z0-9_-]+)", service.stdout.readline())
            key = match.group(1).decode() if match else None
        rows = asyncio.run(measure(args, service_url, key, bare_url))
    finally:
        service.terminate()
        bare.terminate()
        service.wait(10)
        bare.wait(10)
    report = {"benchmark": "service", "cpu_count": os.cpu_count(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

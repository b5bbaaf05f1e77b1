"""Step previews and event streams: what a preview costs a step, and what following a
prediction by its stream costs against polling, in one run.

- preview: TAEF1 at its real architecture (AutoencoderTiny, 16 latent channels; random
  weights: the cost is the same) decoding a 1 MP step's x0 estimate, thumbnailed to 256 px
  and encoded as JPEG (pipeline/previews.py, the worker's own code), against one 1 MP
  denoising step of the transformer at the real width (3072) with --blocks double,single
  blocks. The real model has 19 + 38: the ratio against the slice is printed, and against
  the slice's per-block time times 57 blocks (labelled as that: a CPU figure scaled by block
  count, not a measurement of the full model).
- stream vs polling: ``fluxredux serve --model fake`` (steps of --step-seconds), the same
  predictions followed three ways, one at a time: the event stream, a long-poll, and
  polling every 0.2 s (the page's interval before streams). For each: how long after the
  end (completed_at) the client knew, and how many requests it sent.

Prints the figures and writes JSON (benchmarks/results/previews.json). Not a test; compare
numbers from one run only.

    python benchmarks/previews.py [--blocks 1,1] [--repeats 3] [--predictions 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from fluxredux.pipeline.loading import use_pil_image_processors

use_pil_image_processors()  # before the imports below bring in diffusers (see pipeline/loading.py)

from pipeline import device_facts, realistic_inputs  # benchmarks/pipeline.py, beside this
from service import admin_key, free_port, wait_ready, wall  # benchmarks/service.py

from fluxredux.pipeline.architecture import FULL
from fluxredux.pipeline.previews import PreviewDecoder

REPO = Path(__file__).resolve().parents[1]
FLUXREDUX = str(Path(sys.executable).with_name("fluxredux"))
FULL_BLOCKS = 19 + 38


def small_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", default="1,1", help="double,single blocks at the real width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predictions", type=int, default=10, help="per way of following")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="the fake model's step")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "previews.json")
    return parser.parse_args()


def preview_cost(blocks: str, repeats: int) -> dict[str, Any]:
    from diffusers import AutoencoderTiny, FluxTransformer2DModel

    double, single = (int(n) for n in blocks.split(","))
    torch.manual_seed(0)
    config = {**FULL.transformer, "num_layers": double, "num_single_layers": single}
    transformer = FluxTransformer2DModel(**config).eval().requires_grad_(False)
    decoder = PreviewDecoder(AutoencoderTiny(latent_channels=16).eval(), 8, torch.device("cpu"))
    inputs = realistic_inputs(transformer, 1024, collapsed=True)
    packed = torch.randn(1, 64 * 64, 64)
    steps, previews = [], []
    with torch.inference_mode():
        for run in range(repeats + 1):
            started = time.perf_counter()
            transformer(**inputs)
            step = time.perf_counter() - started
            started = time.perf_counter()
            jpeg = decoder.jpeg(packed, 1024, 1024)
            preview = time.perf_counter() - started
            if run:  # the first round warms up
                steps.append(step)
                previews.append(preview)
    step_s, preview_s = statistics.median(steps), statistics.median(previews)
    per_block = step_s / (double + single)
    return {
        "transformer": config,
        "step_s": step_s,
        "preview_s": preview_s,
        "preview_jpeg_bytes": len(jpeg),
        "preview_over_step_slice": preview_s / step_s,
        "preview_over_step_scaled_to_57_blocks": preview_s / (per_block * FULL_BLOCKS),
        "samples_s": {"step": steps, "preview": previews},
    }


def follow_costs(predictions: int, step_seconds: float) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="fluxredux-bench-previews-"))
    log, port = data_dir / "serve.log", free_port()
    env = {
        **os.environ,
        "FLUXREDUX_FAKE_STEP_SECONDS": str(step_seconds),
        "FLUXREDUX_READ_LIMIT_PER_MINUTE": "1000000",
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            [FLUXREDUX, "serve", "--model", "fake", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        wait_ready(f"{url}/health", server, log)
        headers = {"X-API-Key": admin_key(log, server)}
        body = {"input": {"redux_image": small_png(), "disable_safety_checker": True}}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:

            def create() -> str:
                return str(http.post("/v1/prediction/", json=body).json()["predictionID"])

            def by_stream(prediction: str) -> tuple[dict[str, Any], int]:
                with http.stream("GET", f"/v1/prediction/{prediction}/stream") as response:
                    name = ""
                    for line in response.iter_lines():
                        if line.startswith("event:"):
                            name = line[6:].strip()
                        elif line.startswith("data:") and name in ("done", "failed", "canceled"):
                            return json.loads(line[5:]), 1
                raise RuntimeError("the stream ended without the end")

            def by_long_poll(prediction: str) -> tuple[dict[str, Any], int]:
                return http.get(f"/v1/prediction/{prediction}", params={"wait": 30}).json(), 1

            def by_polling(prediction: str) -> tuple[dict[str, Any], int]:
                requests = 0
                while True:
                    requests += 1
                    got = http.get(f"/v1/prediction/{prediction}").json()
                    if got["status"] in ("success", "error", "cancelled"):
                        return got, requests
                    time.sleep(0.2)

            ways = {"stream": by_stream, "long_poll": by_long_poll, "poll_0.2s": by_polling}
            delays: dict[str, list[float]] = {way: [] for way in ways}
            requests: dict[str, list[int]] = {way: [] for way in ways}
            for _ in range(predictions):
                for way, follow in ways.items():  # interleaved: the machine's drift hits all three
                    ended, sent = follow(create())
                    delays[way].append(time.time() - wall(ended["completed_at"].replace("Z", "+00:00")))
                    requests[way].append(sent)
            for way in ways:
                results[way] = {
                    "told_after_end_p50_ms": 1000 * statistics.median(delays[way]),
                    "requests_per_prediction": statistics.mean(requests[way]),
                    "samples_ms": [1000 * d for d in delays[way]],
                }
    finally:
        server.terminate()
        server.wait(30)
    return results


def main() -> None:
    args = parse_args()
    preview = preview_cost(args.blocks, args.repeats)
    print(
        f"preview (TAEF1 decode of a 1 MP latent, 256 px JPEG of {preview['preview_jpeg_bytes']:,} bytes): "
        f"{preview['preview_s'] * 1000:.0f} ms; 1 MP step of {args.blocks} blocks: {preview['step_s']:.2f} s "
        f"(preview/step {preview['preview_over_step_slice']:.3f}; against that step's per-block time x 57 "
        f"blocks: {preview['preview_over_step_scaled_to_57_blocks']:.4f})",
        flush=True,
    )
    follow = follow_costs(args.predictions, args.step_seconds)
    for way, figures in follow.items():
        print(
            f"{way:>10}: told {figures['told_after_end_p50_ms']:.1f} ms after the end (p50), "
            f"{figures['requests_per_prediction']:.1f} requests per prediction",
            flush=True,
        )
    report = {
        "benchmark": "previews",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **device_facts(),
        "threads": torch.get_num_threads(),
        "preview": preview,
        "follow": follow,
        "fake_step_seconds": args.step_seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

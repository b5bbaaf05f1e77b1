"""Drafts to finals: a 0.25 MP draft upscaled 2x against a direct 1 MP run, in one run.

The product page's tip: "generate low-resolution drafts and upscale the best ones". What it
costs: the draft (all its steps at 0.25 MP) plus the final (the VAE encode of the resized
draft and the steps its upscale_strength leaves, 2 of 4 at 0.35, at 1 MP), against one
direct 1 MP prediction. Two models, one run each:

- the demo model (tiny random weights, through the real loading code and the Predictor):
  the whole path, end to end, medians of a few runs;
- --realistic-width (CPU): the transformer alone at the real width (3072, 24 heads) with a
  few blocks, timed per step at each sequence; the draft+final and direct totals are those
  steps summed (each block sees the same sequence, so the ratio holds for the whole model;
  the VAE and the prior are left out).

Prints the figures and writes JSON (benchmarks/results/drafts.json). Not a test; compare
numbers from one run only.

    python benchmarks/drafts.py [--repeats 3] [--realistic-width] [--blocks 1,1] [--model flux]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxredux.config import Settings
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.pipeline.loading import load_model, use_pil_image_processors

use_pil_image_processors()  # before the imports below bring in diffusers (see pipeline/loading.py)

from pipeline import device_facts, realistic_inputs, time_calls  # benchmarks/pipeline.py, beside this

from fluxredux.pipeline.architecture import FULL
from fluxredux.schema import PredictionInput, refine_steps
from fluxredux.worker.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
STRENGTH = 0.35


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "flux"], default="demo")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after 1 warm-up)")
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "sample.jpg")
    parser.add_argument(
        "--realistic-width", action="store_true", help="also the transformer at the real width"
    )
    parser.add_argument("--blocks", default="1,1", help="--realistic-width: double,single blocks")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "drafts.json")
    return parser.parse_args()


def whole_path(args: argparse.Namespace) -> dict[str, Any]:
    """Draft + 2x final against direct 1 MP, the whole prediction path, on ``args.model``."""
    model = load_model(Settings(model=args.model))
    predictor = Predictor(model, safety=None)
    reference = decode_image(args.image.read_bytes(), DecodeLimits())
    common = {"redux_image": "data:,x", "disable_safety_checker": True, "output_format": "png", "seed": 1}
    direct = PredictionInput(**common, megapixels="1")
    draft_input = PredictionInput(**common, megapixels="0.25")
    final_input = PredictionInput(**common, upscale_from={"prediction": "draft"}, scale=2)

    def draft_and_final() -> tuple[float, float]:
        started = time.perf_counter()
        draft = predictor.predict(draft_input, [reference])
        drafted = time.perf_counter() - started
        image = Image.open(io.BytesIO(draft.outputs[0].data))
        started = time.perf_counter()
        predictor.predict(final_input, [reference, image])
        return drafted, time.perf_counter() - started

    def one_direct() -> float:
        started = time.perf_counter()
        predictor.predict(direct, [reference])
        return time.perf_counter() - started

    draft_and_final()  # warm-up: kernels, allocator, the conditioning cache
    one_direct()
    drafts, finals, directs = [], [], []
    for _ in range(args.repeats):  # interleaved, so the machine's drift falls on both alike
        drafted, finished = draft_and_final()
        drafts.append(drafted)
        finals.append(finished)
        directs.append(one_direct())
    median = {
        "draft_s": statistics.median(drafts),
        "final_s": statistics.median(finals),
        "direct_1mp_s": statistics.median(directs),
    }
    median["draft_plus_final_over_direct"] = (median["draft_s"] + median["final_s"]) / median["direct_1mp_s"]
    print(
        f"{args.model} model, whole path: draft 0.25 MP {median['draft_s']:.2f} s + final 2x "
        f"{median['final_s']:.2f} s vs direct 1 MP {median['direct_1mp_s']:.2f} s "
        f"(ratio {median['draft_plus_final_over_direct']:.2f})",
        flush=True,
    )
    return {"model": args.model, "repeats": args.repeats, **median, "samples_s": [drafts, finals, directs]}


def realistic_width(args: argparse.Namespace) -> dict[str, Any]:
    """The denoising steps only, at the real width: 4 at 0.25 MP + the final's at 1 MP
    against 4 at 1 MP."""
    from diffusers import FluxTransformer2DModel

    double, single = (int(n) for n in args.blocks.split(","))
    torch.manual_seed(0)
    config = {**FULL.transformer, "num_layers": double, "num_single_layers": single}
    transformer = FluxTransformer2DModel(**config).eval().requires_grad_(False)
    variants = {f"{side}": realistic_inputs(transformer, side, collapsed=True) for side in (1024, 512)}
    samples = time_calls(transformer, variants, args.repeats)
    step = {side: statistics.median(values) for side, values in samples.items()}
    final_steps = refine_steps(STEPS, STRENGTH)
    draft_plus_final = STEPS * step["512"] + final_steps * step["1024"]
    direct = STEPS * step["1024"]
    print(
        f"realistic width ({double} double + {single} single blocks), per step: 1 MP {step['1024']:.2f} s, "
        f"0.25 MP {step['512']:.2f} s; draft {STEPS} steps + final {final_steps} steps "
        f"{draft_plus_final:.2f} s vs direct {STEPS} steps {direct:.2f} s "
        f"(ratio {draft_plus_final / direct:.2f})",
        flush=True,
    )
    return {
        "transformer": config,
        "step_s": step,
        "samples_s": samples,
        "final_steps": final_steps,
        "draft_plus_final_s": draft_plus_final,
        "direct_s": direct,
        "draft_plus_final_over_direct": draft_plus_final / direct,
    }


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {
        "benchmark": "drafts",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **device_facts(),
        "threads": torch.get_num_threads(),
        "steps": STEPS,
        "upscale_strength": STRENGTH,
        "whole_path": whole_path(args),
    }
    if args.realistic_width:
        report["realistic_width"] = realistic_width(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

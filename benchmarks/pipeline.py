"""Where the time of one prediction goes: prior, denoise, VAE decode, safety, encode.

For each output size (0.25 and 1 MP) and batch (1 and 4 outputs) it runs the whole
prediction path (Predictor: model -> NudeNet safety check -> encode) a few times after a
warm-up, and prints and writes (JSON) the median of each stage. Each run gets a reference
the worker's conditioning cache has not seen (the image with a patch of its own colour),
so "prior" is what a new reference costs; then the prior stage alone is timed for a
repeated reference (a cache hit) against a new one (a miss). Not a test.

    python benchmarks/pipeline.py                      # demo model (CPU: tiny random weights)
    python benchmarks/pipeline.py --model flux         # real weights from the HF cache / folders
    python benchmarks/pipeline.py --full-size-random   # CUDA: the real architecture, random bf16
                                                       # weights (no download; same speed)

Outputs of the demo and random models are noise: only the timings mean anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxredux.config import Settings
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.pipeline.architecture import FULL, TINY
from fluxredux.pipeline.conditioning_cache import ConditioningCache, pixels_key
from fluxredux.pipeline.model import ReduxModel, load_model
from fluxredux.schema import PredictionInput
from fluxredux.worker.factories import build_checker
from fluxredux.worker.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prior", "denoise", "decode", "safety", "encode")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "flux"], default="demo")
    parser.add_argument(
        "--full-size-random", action="store_true", help="real architecture, random weights (CUDA)"
    )
    parser.add_argument(
        "--random-spec", choices=["full", "tiny"], help="random weights of this spec (tiny: CPU smoke run)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after 1 warm-up)")
    parser.add_argument("--megapixels", default="0.25,1")
    parser.add_argument("--outputs", default="1,4")
    parser.add_argument("--aspect-ratio", default="1:1")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-format", default="webp")
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "sample.jpg")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/pipeline-<model>.json")
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> ReduxModel:
    spec_name = "full" if args.full_size_random else args.random_spec
    if spec_name:
        cuda = torch.cuda.is_available()
        if spec_name == "full" and not cuda:
            sys.exit("--full-size-random needs a CUDA GPU (the model is 24 GB in bf16).")
        device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        cache = ConditioningCache.from_megabytes(Settings().conditioning_cache_mb)  # as a worker's
        spec = FULL if spec_name == "full" else TINY
        return ReduxModel.from_random(spec, device=device, dtype=dtype, conditioning_cache=cache)
    return load_model(Settings(model=args.model))


def new_reference(image: Image.Image, fresh: Iterator[int]) -> Image.Image:
    """``image`` with a 32x32 patch of a colour of its own in the middle (inside every crop):
    a reference the conditioning cache has not seen, at the same cost to prepare."""
    n = next(fresh)
    reference = image.convert("RGB")
    x, y = reference.width // 2 - 16, reference.height // 2 - 16
    reference.paste((n % 256, n // 256 % 256, 255 - n % 256), (x, y, x + 32, y + 32))
    return reference


def run_case(
    predictor: Predictor, image: Image.Image, inputs: PredictionInput, repeats: int, fresh: Iterator[int]
) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    references = [new_reference(image, fresh) for _ in range(repeats + 1)]
    predictor.predict(inputs, [references[0]])  # warm-up: kernels, allocator, caches
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    samples: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    for reference in references[1:]:
        started = time.perf_counter()
        result = predictor.predict(inputs, [reference])
        samples["total"].append(time.perf_counter() - started)
        for stage in STAGES:
            samples[stage].append(result.timings.get(stage, 0.0))
    case: dict[str, Any] = {
        "megapixels": inputs.megapixels,
        "num_outputs": inputs.num_outputs,
        "size": list(inputs.size(image.size)),
        "median_s": {stage: statistics.median(values) for stage, values in samples.items()},
        "samples_s": samples,
    }
    if cuda:
        case["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return case


def prior_cache_case(
    model: ReduxModel, predictor: Predictor, image: Image.Image, inputs: PredictionInput, repeats: int
) -> dict[str, Any]:
    """The prior stage for a new reference (a miss: SigLIP and the Redux embedder run) and
    for the same reference again (a hit: preprocessing and the key's hash only), and the
    hash alone."""
    cache = model.conditioning_cache
    assert cache is not None
    fresh = itertools.count(10_000)
    predictor.predict(inputs, [new_reference(image, fresh)])  # warm-up
    before = cache.counters()
    samples: dict[str, list[float]] = {"miss": [], "hit": [], "key_hash": []}
    for _ in range(repeats):
        reference = new_reference(image, fresh)
        samples["miss"].append(predictor.predict(inputs, [reference]).timings["prior"])
        samples["hit"].append(predictor.predict(inputs, [reference]).timings["prior"])
        pixels = model.feature_extractor.preprocess(images=reference, return_tensors="pt").pixel_values
        started = time.perf_counter()
        pixels_key(pixels)
        samples["key_hash"].append(time.perf_counter() - started)
    after = cache.counters()
    # The hits were hits and the misses misses (a new reference the cache had seen would not be).
    assert after["hits"] - before["hits"] == repeats and after["misses"] - before["misses"] == repeats
    return {
        "image_size": list(image.size),
        "median_s": {name: statistics.median(values) for name, values in samples.items()},
        "samples_s": samples,
    }


def main() -> None:
    args = parse_args()
    model = build_model(args)
    if model.info.notice:
        print(f"NOTE: {model.info.notice} (timings only)", file=sys.stderr)
    predictor = Predictor(model, build_checker(Settings(model=args.model)))  # as the worker builds it
    image = decode_image(args.image.read_bytes(), DecodeLimits())
    fresh = itertools.count()  # a new reference for every run: the prior stage is a cache miss
    cases = []
    for megapixels in args.megapixels.split(","):
        for outputs in (int(n) for n in args.outputs.split(",")):
            inputs = PredictionInput(
                redux_image="data:,benchmark",
                megapixels=megapixels,  # type: ignore[arg-type]
                num_outputs=outputs,
                num_inference_steps=args.steps,
                aspect_ratio=args.aspect_ratio,  # type: ignore[arg-type]
                output_format=args.output_format,  # type: ignore[arg-type]
                seed=0,
            )
            case = run_case(predictor, image, inputs, args.repeats, fresh)
            cases.append(case)
            medians = case["median_s"]
            line = "  ".join(f"{stage} {medians[stage] * 1000:8.1f}" for stage in (*STAGES, "total"))
            memory = f"  peak {case['peak_gpu_memory_gib']:.1f} GiB" if "peak_gpu_memory_gib" in case else ""
            width, height = case["size"]
            print(f"{width}x{height} x{outputs}: {line} ms{memory}", flush=True)

    prior_cache = None
    if model.conditioning_cache is None:
        print("conditioning cache off (FLUXREDUX_CONDITIONING_CACHE_MB=0): no hit/miss timing")
    else:
        # The prior does not depend on the output: the smallest, quickest run will do.
        one_step = PredictionInput(
            redux_image="data:,benchmark", megapixels="0.25", num_inference_steps=1, seed=0
        )
        prior_cache = prior_cache_case(model, predictor, image, one_step, max(args.repeats, 5))
        miss, hit, key = (prior_cache["median_s"][name] * 1000 for name in ("miss", "hit", "key_hash"))
        print(
            f"prior, {image.width}x{image.height} reference: new (cache miss) {miss:.1f} ms, "
            f"repeated (cache hit) {hit:.1f} ms, of which the key's hash {key:.2f} ms",
            flush=True,
        )

    report = {
        "benchmark": "pipeline",
        "model": model.info.describe(),
        "random_weights": model.info.is_demo,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "steps": args.steps,
        "output_format": args.output_format,
        "repeats": args.repeats,
        "cases": cases,
        "conditioning_cache_mb": cache.max_bytes / 2**20 if (cache := model.conditioning_cache) else 0,
        "prior_cache": prior_cache,
    }
    name = "full-size-random" if args.full_size_random else (args.random_spec or args.model)
    path = args.json or REPO / "benchmarks" / "results" / f"pipeline-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

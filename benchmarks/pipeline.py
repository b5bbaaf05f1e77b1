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
                                                       # weights (no download; same speed), once
                                                       # per speed setting (the table to fill in)
    python benchmarks/pipeline.py --realistic-width    # CPU: the real width with a few blocks:
                                                       # collapsed/full and compiled/eager ratios

The speed settings (--no-collapse-zero-tokens, --compile, --attention-backend, --quantize)
apply to one run; --full-size-random (or --all-settings) runs each row of SETTINGS_MATRIX
in turn unless one is given, writing the JSON after each row (--rows picks rows, keeping
those of earlier commands in the file). Outputs of the demo and random models are noise:
only the timings mean anything.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import torch
from PIL import Image

from fluxredux.config import Quantization, Settings
from fluxredux.images import DecodeLimits, decode_image
from fluxredux.pipeline.loading import load_model, use_pil_image_processors

use_pil_image_processors()  # before the imports below bring in diffusers (see pipeline/loading.py)

from fluxredux.pipeline.architecture import FULL, TINY
from fluxredux.pipeline.conditioning import TEXT_SEQUENCE_LENGTH, TokenLayout, attention_bias
from fluxredux.pipeline.conditioning_cache import ConditioningCache, pixels_key
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.speed import Tuning
from fluxredux.schema import PredictionInput
from fluxredux.worker.factories import build_checker
from fluxredux.worker.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prior", "denoise", "decode", "safety", "encode")

# --full-size-random: one row per setting, from the reference implementation's way (the
# full 512 zero tokens, eager) to everything on. fp8 rows are skipped where fp8 cannot run.
SETTINGS_MATRIX: list[dict[str, Any]] = [
    {"collapse_zero_tokens": False, "compile": "none", "quantize": "none"},
    {"collapse_zero_tokens": True, "compile": "none", "quantize": "none"},
    # The kernels torch's SDPA chooses among, named (auto lets it choose): with the bias...
    {"collapse_zero_tokens": True, "attention_backend": "_native_cudnn"},
    {"collapse_zero_tokens": True, "attention_backend": "_native_efficient"},
    # ... and flash, which takes none: the full sequence is then the price.
    {"collapse_zero_tokens": False, "attention_backend": "_native_flash"},
    {"collapse_zero_tokens": True, "compile": "transformer", "quantize": "none"},
    {"collapse_zero_tokens": True, "compile": "all", "quantize": "none"},
    {"collapse_zero_tokens": True, "compile": "none", "quantize": "fp8"},
    {"collapse_zero_tokens": True, "compile": "transformer", "quantize": "fp8"},
    # The memory profiles' quantizations that random weights can take (torchao, in memory).
    # nf4 and gguf are quantised as real weights load: --model flux --quantize nf4 (or gguf
    # with --transformer-file), a row each.
    {"collapse_zero_tokens": True, "compile": "none", "quantize": "int8"},
    {"collapse_zero_tokens": True, "compile": "transformer", "quantize": "int8"},
]


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
    speed = parser.add_argument_group("speed settings (default: a worker's defaults)")
    speed.add_argument(
        "--no-collapse-zero-tokens", dest="collapse_zero_tokens", action="store_false", default=None
    )
    speed.add_argument("--compile", choices=["none", "transformer", "all"])
    speed.add_argument("--attention-backend")
    speed.add_argument("--quantize", choices=list(get_args(Quantization)))
    speed.add_argument("--transformer-file", help="--quantize gguf: the GGUF checkpoint")
    parser.add_argument(
        "--realistic-width",
        action="store_true",
        help="CPU: the transformer at the real width (3072, 24 heads) with --blocks double and single "
        "blocks, timed alone at 1 and 0.25 MP: collapsed/full and compiled/eager",
    )
    parser.add_argument("--blocks", default="1,1", help="--realistic-width: double,single blocks")
    parser.add_argument(
        "--all-settings",
        action="store_true",
        help="run every row of SETTINGS_MATRIX (the default of --full-size-random) on this model",
    )
    parser.add_argument(
        "--rows",
        help="--full-size-random: which rows of SETTINGS_MATRIX to run, e.g. 0,1,5 (default: all); "
        "rows already in the JSON file are kept, so a run can be split over several commands",
    )
    return parser.parse_args()


def chosen_tuning(args: argparse.Namespace) -> dict[str, Any]:
    """The speed settings given on the command line (the others keep their defaults)."""
    names = ("collapse_zero_tokens", "compile", "attention_backend", "quantize", "transformer_file")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_model(args: argparse.Namespace, tuning: dict[str, Any], data_dir: Path) -> ReduxModel:
    # A data dir of the row's own: a compile's time is a cold compile, never read back
    # from another row's cache on disk.
    # manual: each row is the setting it names, not what a memory profile would pick.
    settings = Settings(model=args.model, data_dir=data_dir, memory_profile="manual", **tuning)
    spec_name = "full" if args.full_size_random else args.random_spec
    if spec_name:
        cuda = torch.cuda.is_available()
        if spec_name == "full" and not cuda:
            sys.exit("--full-size-random needs a CUDA GPU (the model is 24 GB in bf16).")
        device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        cache = ConditioningCache.from_megabytes(settings.conditioning_cache_mb)  # as a worker's
        spec = FULL if spec_name == "full" else TINY
        return ReduxModel.from_random(
            spec, device=device, dtype=dtype, conditioning_cache=cache, tuning=Tuning.from_settings(settings)
        )
    return load_model(settings)


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
        "sequence": result.sequence,
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
        pixels = model.parts.feature_extractor.preprocess(images=reference, return_tensors="pt").pixel_values
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


def run_settings(args: argparse.Namespace, tuning: dict[str, Any], image: Image.Image) -> dict[str, Any]:
    """Every case (size x outputs) and the prior's cache timing, with one speed setting."""
    with tempfile.TemporaryDirectory(prefix="fluxredux-bench-") as data_dir:
        return run_settings_in(args, tuning, image, Path(data_dir))


def run_settings_in(
    args: argparse.Namespace, tuning: dict[str, Any], image: Image.Image, data_dir: Path
) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_model(args, tuning, data_dir)
    load_s = time.perf_counter() - started
    print(f"== {model.info.describe()} (ready in {load_s:.1f} s)", flush=True)
    if model.info.notice:
        print(f"NOTE: {model.info.notice} (timings only)", file=sys.stderr)
    predictor = Predictor(model, build_checker(Settings(model=args.model)))  # as the worker builds it
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
            print(f"{width}x{height} x{outputs}: {line} ms{memory}  ({case['sequence']})", flush=True)

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
    return {
        "settings": tuning,
        "model": model.info.describe(),
        "random_weights": model.info.is_demo,
        "ready_s": load_s,  # loading, building and (with compile) the warm-up's compiles
        "cases": cases,
        "conditioning_cache_mb": cache.max_bytes / 2**20 if (cache := model.conditioning_cache) else 0,
        "prior_cache": prior_cache,
    }


def fp8_refusal() -> str | None:
    """Why fp8 cannot run here, or None."""
    from fluxredux.errors import ModelUnavailable
    from fluxredux.pipeline.quantization import check_quantization

    try:
        check_quantization("fp8", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except ModelUnavailable as exc:
        return exc.message
    return None


def forget_compiled_code() -> None:
    """Between settings: no compiled graph, no disabled compiler, no cached memory carried
    over. A compiled module holds itself in a reference cycle (its compiled call is a bound
    method of its own): only the collector frees its 24 GB."""
    torch._dynamo.reset()
    torch._dynamo.config.disable = False
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        facts["cuda"] = torch.version.cuda
        facts["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return facts


# --- --realistic-width: the transformer alone, at the real width, on a CPU ---------------


def realistic_inputs(
    transformer: Any, side: int, *, collapsed: bool, redux_tokens: int = 729
) -> dict[str, Any]:
    """One denoising step's transformer inputs for a ``side``-pixel square output, prompt-
    less: the 512 zero text tokens (or the one collapsed token and its bias), 729 random
    Redux tokens, random latents; as the pipeline builds them."""
    from diffusers import FluxPipeline

    config = transformer.config
    generator = torch.Generator().manual_seed(side)
    redux = torch.randn(1, redux_tokens, config.joint_attention_dim, generator=generator)
    text_tokens = 1 if collapsed else TEXT_SEQUENCE_LENGTH
    text = torch.cat([torch.zeros(1, text_tokens, config.joint_attention_dim), redux], dim=1)
    grid = side // 16  # 8x VAE, 2x2 packing
    layout = TokenLayout(
        text=text_tokens,
        redux=redux_tokens,
        image=grid * grid,
        text_multiplicity=TEXT_SEQUENCE_LENGTH if collapsed else 1,
    )
    bias = attention_bias(layout, 1.0, dtype=torch.float32, device=torch.device("cpu"))
    return {
        "hidden_states": torch.randn(1, grid * grid, config.in_channels, generator=generator),
        "encoder_hidden_states": text,
        "pooled_projections": torch.zeros(1, config.pooled_projection_dim),
        "timestep": torch.tensor([1.0]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, grid, grid, torch.device("cpu"), torch.float32),
        "txt_ids": torch.zeros(text.shape[1], 3),
        "joint_attention_kwargs": {"attention_mask": bias} if bias is not None else None,
        "return_dict": False,
    }


def sequence_of(inputs: dict[str, Any]) -> str:
    return (
        f"{inputs['encoder_hidden_states'].shape[1]} text + {inputs['hidden_states'].shape[1]} image tokens"
    )


def time_calls(transformer: Any, variants: dict[str, dict[str, Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, the variants interleaved run by run (so that the
    machine's drift falls on all alike), after one untimed call of each."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in range(repeats + 1):
            for name, inputs in variants.items():
                started = time.perf_counter()
                transformer(**inputs)
                if run:
                    samples[name].append(time.perf_counter() - started)
    return samples


def realistic_width(args: argparse.Namespace) -> None:
    """Collapsed/full and compiled/eager, at the real hidden size (3072, 24 heads of 128)
    with a few blocks: each block sees the same sequence, so the ratio per block is the
    whole model's (its 19 double and 38 single blocks), give or take the embedders."""
    from diffusers import FluxTransformer2DModel

    double, single = (int(n) for n in args.blocks.split(","))
    torch.manual_seed(0)
    config = {**FULL.transformer, "num_layers": double, "num_single_layers": single}
    transformer = FluxTransformer2DModel(**config).eval().requires_grad_(False)
    cases = []
    for megapixels, side in (("1", 1024), ("0.25", 512)):
        full = realistic_inputs(transformer, side, collapsed=False)
        collapsed = realistic_inputs(transformer, side, collapsed=True)
        with torch.inference_mode():
            image_full = transformer(**full)[0]
            image_collapsed = transformer(**collapsed)[0]
        error = ((image_collapsed - image_full).abs().max() / image_full.abs().max()).item()
        samples = time_calls(transformer, {"full": full, "collapsed": collapsed}, args.repeats)
        median = {name: statistics.median(values) for name, values in samples.items()}
        cases.append(
            {
                "megapixels": megapixels,
                "sequence": {
                    name: sequence_of(inputs) for name, inputs in (("full", full), ("collapsed", collapsed))
                },
                "max_relative_difference": error,
                "median_s": median,
                "samples_s": samples,
                "collapsed_over_full": median["collapsed"] / median["full"],
            }
        )
        print(
            f"{side}x{side}: full {median['full']:.2f} s, collapsed {median['collapsed']:.2f} s: "
            f"ratio {median['collapsed'] / median['full']:.3f} (outputs differ by {error:.1e} of their max)",
            flush=True,
        )

    # Compiled as a worker compiles it (dynamic shapes: one graph for both sizes).
    started = time.perf_counter()
    transformer.compile(dynamic=True)
    variants = {f"{side}": realistic_inputs(transformer, side, collapsed=True) for side in (1024, 512)}
    with torch.inference_mode():
        for inputs in variants.values():
            transformer(**inputs)
    compile_s = time.perf_counter() - started
    compiled = time_calls(transformer, variants, args.repeats)
    for case, side in zip(cases, (1024, 512), strict=True):
        median = statistics.median(compiled[f"{side}"])
        case["compiled_collapsed_s"] = median
        case["compiled_samples_s"] = compiled[f"{side}"]
        case["compiled_over_eager"] = median / case["median_s"]["collapsed"]
        ratio = case["compiled_over_eager"]
        print(f"{side}x{side}: collapsed compiled {median:.2f} s: compiled/eager {ratio:.3f}")
    print(f"compiling took {compile_s:.1f} s")
    report = {
        "benchmark": "pipeline --realistic-width",
        **device_facts(),
        "threads": torch.get_num_threads(),
        "transformer": config,
        "repeats": args.repeats,
        "compile_s": compile_s,
        "cases": cases,
    }
    path = args.json or REPO / "benchmarks" / "results" / "pipeline-realistic-width.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    if args.realistic_width:
        realistic_width(args)
        return
    image = decode_image(args.image.read_bytes(), DecodeLimits())
    chosen = chosen_tuning(args)
    if (args.full_size_random or args.all_settings) and not chosen:
        numbers = [int(n) for n in args.rows.split(",")] if args.rows else range(len(SETTINGS_MATRIX))
        rows = [(number, SETTINGS_MATRIX[number]) for number in numbers]
    else:
        rows = [(0, chosen)]
    name = "full-size-random" if args.full_size_random else (args.random_spec or args.model)
    path = args.json or REPO / "benchmarks" / "results" / f"pipeline-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier command (--rows) are kept: one row may need a command of its own.
    earlier = json.loads(path.read_text()) if args.rows and path.is_file() else {}
    runs: dict[str, Any] = dict(earlier.get("runs", {}))
    for number, tuning in rows:
        if tuning.get("quantize") == "fp8" and (refusal := fp8_refusal()) is not None:
            print(f"== row {number}, skipped {tuning}: {refusal}", flush=True)
            runs[str(number)] = {"settings": tuning, "skipped": refusal}
        else:
            try:
                runs[str(number)] = run_settings(args, tuning, image)
            except Exception as exc:  # one row's failure (out of memory, a backend) keeps the others
                traceback.print_exc()
                runs[str(number)] = {"settings": tuning, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            forget_compiled_code()
        report = {
            "benchmark": "pipeline",
            **device_facts(),
            "steps": args.steps,
            "output_format": args.output_format,
            "repeats": args.repeats,
            "runs": dict(sorted(runs.items(), key=lambda item: int(item[0]))),
        }
        path.write_text(json.dumps(report, indent=2))  # after every row: a crash loses one row
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Style adapters (LoRA): what loading one costs the first time and from the worker's
cache, and what an active adapter adds to each denoising step, in one run.

The transformer at the real width (3072, 24 heads) with a few blocks (on a CPU the whole
12B model would not fit a benchmark's patience), a random LoRA of rank --rank on every
attention and feed-forward projection of those blocks (as style LoRAs are commonly
trained), saved as a safetensors file and loaded through the worker's own AdapterCache
(diffusers' PEFT integration):

- load: the first activate() (file read + PEFT layers injected) against a cached one
  (set_adapters only), medians of --repeats, each first load after the cache let it go;
- step: one denoising step at 1 MP, prompt-less, with the adapter at scale 1 against
  disabled (the model's own layers), interleaved run by run.

Per block, a LoRA's extra work is rank x (in + out) per token and projection against the
projection's in x out, so the step ratio holds for the whole model at this rank; the load
time grows with the number of blocks (57 in the real model).

Prints the figures and writes JSON (benchmarks/results/loras.json). Not a test; compare
numbers from one run only.

    python benchmarks/loras.py [--rank 64] [--blocks 1,1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fluxredux.pipeline.loading import use_pil_image_processors

use_pil_image_processors()  # before the imports below bring in diffusers (see pipeline/loading.py)

from pipeline import device_facts, realistic_inputs  # benchmarks/pipeline.py, beside this

from fluxredux.pipeline.adapters import AdapterBudget, AdapterCache
from fluxredux.pipeline.architecture import FULL
from fluxredux.pipeline.protocol import AdapterFile

REPO = Path(__file__).resolve().parents[1]
# The projections style LoRAs are trained on: attention (both streams) and feed-forward.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TARGETS += ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--blocks", default="1,1", help="double,single blocks at the real width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "loras.json")
    return parser.parse_args()


def write_lora(transformer: Any, rank: int, path: Path) -> int:
    """A random LoRA of ``transformer`` at ``rank``, saved as a trainer saves one; its tensors."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = FluxTransformer2DModel(**transformer.config)  # not the timed one: no layers left behind
    targets = [t for t in TARGETS if any(name.endswith(t) for name, _ in donor.named_modules())]
    donor.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    generator = torch.Generator().manual_seed(rank)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.02
        for k, v in get_peft_model_state_dict(donor).items()
    }
    with tempfile.TemporaryDirectory() as folder:
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, safe_serialization=True)
        (Path(folder) / "pytorch_lora_weights.safetensors").replace(path)
    return len(state)


def main() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    args = parse_args()
    double, single = (int(n) for n in args.blocks.split(","))
    torch.manual_seed(0)
    config = {**FULL.transformer, "num_layers": double, "num_single_layers": single}
    transformer = FluxTransformer2DModel(**config).eval().requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FULL.scheduler),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    folder = Path(tempfile.mkdtemp(prefix="fluxredux-lora-bench-"))
    path = folder / "style.safetensors"
    tensors = write_lora(transformer, args.rank, path)
    file = AdapterFile(name="style", path=str(path), scale=1.0, index=0)
    cache = AdapterCache(pipe, AdapterBudget(count=1, bytes=2**40))
    other = folder / "other.safetensors"
    write_lora(transformer, args.rank, other)
    other_file = AdapterFile(name="other", path=str(other), scale=1.0, index=0)

    first, cached = [], []
    for _ in range(args.repeats):
        cache.activate([other_file])  # the cache holds one: this lets "style" go
        started = time.perf_counter()
        cache.activate([file])
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        cache.activate([file])
        cached.append(time.perf_counter() - started)

    inputs = realistic_inputs(transformer, 1024, collapsed=True)
    steps: dict[str, list[float]] = {"without": [], "with": []}
    with torch.inference_mode():
        for run in range(args.repeats + 1):
            for variant in ("without", "with"):
                cache.activate([file] if variant == "with" else [])
                started = time.perf_counter()
                transformer(**inputs)
                if run:  # the first round warms up
                    steps[variant].append(time.perf_counter() - started)
    load = {"first_s": statistics.median(first), "cached_s": statistics.median(cached)}
    step = {variant: statistics.median(values) for variant, values in steps.items()}
    size_mib = path.stat().st_size / 2**20
    print(
        f"LoRA rank {args.rank} on {tensors // 2} projections ({double} double + {single} single blocks at "
        f"width 3072; file {size_mib:.1f} MiB): load first {load['first_s'] * 1000:.0f} ms, "
        f"cached {load['cached_s'] * 1000:.1f} ms; 1 MP step without {step['without']:.2f} s, with "
        f"{step['with']:.2f} s (ratio {step['with'] / step['without']:.3f})",
        flush=True,
    )
    report = {
        "benchmark": "loras",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **device_facts(),
        "threads": torch.get_num_threads(),
        "transformer": config,
        "rank": args.rank,
        "lora_file_bytes": path.stat().st_size,
        "load": load,
        "load_samples_s": {"first": first, "cached": cached},
        "step_s": step,
        "step_samples_s": steps,
        "step_with_over_without": step["with"] / step["without"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

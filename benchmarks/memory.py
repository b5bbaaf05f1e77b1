"""What each way of storing the transformer's weights costs, on the realistic-width slice.

The transformer at the real width (3072, 24 heads of 128) with a few blocks (--blocks), one
profile per child process (so that each peak RSS is its own): the float model (bf16 on a
GPU, float32 on a CPU, where bf16 is slow), int8 (torchao, weight-only), and where they can
run here, nf4 (bitsandbytes: CUDA only) and GGUF Q8_0 (a file of the slice written with the
gguf package, read back through diffusers' GGUF loader). For each: the parameter bytes as
measured (the quantized tensors' own storage), bytes per parameter, peak RSS (and peak CUDA
memory on a GPU), the median time of one denoising step relative to the float model, and
the largest difference of its output from the float model's. Then the full-size
transformer's memory COMPUTED from those bytes per parameter (its parameter count from
architecture.FULL). Never a GPU figure unless it ran on one.

    python benchmarks/memory.py [--blocks 1,1] [--repeats 3] [--side 512]

Writes benchmarks/results/memory.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("float", "int8", "nf4", "gguf-q8_0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", default="1,1", help="double,single blocks of the slice")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=512, help="output side in pixels (the image tokens)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--one", choices=PROFILES, help=argparse.SUPPRESS)  # a child's profile
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # where the float output is
    return parser.parse_args()


def slice_config(blocks: str) -> dict[str, Any]:
    from fluxredux.pipeline.architecture import FULL

    double, single = (int(n) for n in blocks.split(","))
    return {**FULL.transformer, "num_layers": double, "num_single_layers": single}


def parameter_bytes(model: Any) -> int:
    """The bytes the model's parameters are stored in: a quantized tensor counts its own
    data and scales (torchao's inner tensors; a GGUF parameter's packed blocks)."""
    total = 0
    for parameter in model.parameters():
        if hasattr(parameter, "__tensor_flatten__"):  # torchao: the inner tensors (int8 data, scales)
            names, _ = parameter.__tensor_flatten__()
            total += sum(getattr(parameter, n).numel() * getattr(parameter, n).element_size() for n in names)
        elif type(parameter).__name__ in ("GGUFParameter", "Params4bit"):  # packed: the storage is the size
            total += parameter.untyped_storage().nbytes()
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def build(profile: str, config: dict[str, Any], dtype: Any, device: Any, work: Path) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # the same random weights in every child
    model = FluxTransformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    if profile == "float":
        return model.to(device)
    if profile == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = model.to(device)
        quantize_(model, Int8WeightOnlyConfig())
        return model
    if profile == "nf4":
        from diffusers import BitsAndBytesConfig

        folder = work / "slice"
        model.save_pretrained(folder)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        return FluxTransformer2DModel.from_pretrained(
            folder, quantization_config=quantization, torch_dtype=dtype
        )
    # gguf-q8_0: the slice written as a GGUF file (as city96's are), read back by diffusers.
    sys.path.insert(0, str(REPO))
    from fluxredux.pipeline.gguf import load_gguf_transformer
    from tests.gguf_files import write_gguf

    folder = work / "schnell"
    model.save_pretrained(folder / "transformer")
    path = write_gguf(model, work / "slice-Q8_0.gguf", "Q8_0")
    return load_gguf_transformer(path, folder, dtype).to(device)


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One profile, in this (child) process: its figures, and its output saved for the float
    one to compare with."""
    import torch
    from pipeline import realistic_inputs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = slice_config(args.blocks)
    with tempfile.TemporaryDirectory() as work:
        try:
            model = build(args.one, config, dtype, device, Path(work))
        except Exception as exc:  # a profile that cannot run here says why, in the table
            return {"profile": args.one, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        count, stored = (
            full_transformer_parameters(config),
            parameter_bytes(model),
        )  # count: of the float layout
        inputs = realistic_inputs(model, args.side, collapsed=True)
        inputs = {
            k: v.to(device=device, dtype=dtype)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for k, v in inputs.items()
        }
        times = []
        with torch.inference_mode():
            output = model(**inputs)[0]
            for _ in range(args.repeats):
                started = time.perf_counter()
                model(**inputs)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
    assert args.reference is not None
    result: dict[str, Any] = {
        "profile": args.one,
        "parameters": count,
        "parameter_bytes": stored,
        "bytes_per_parameter": stored / count,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times),
        "step_samples_s": times,
    }
    if cuda:
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.one == "float":
        torch.save(output.float().cpu(), args.reference)
    else:
        reference = torch.load(args.reference)
        result["max_abs_difference"] = (output.float().cpu() - reference).abs().max().item()
        result["max_relative_difference"] = result["max_abs_difference"] / reference.abs().max().item()
    return result


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    from fluxredux.pipeline.architecture import FULL

    rows = []
    with tempfile.TemporaryDirectory() as work:
        reference = Path(work) / "float-output.pt"
        for profile in PROFILES:  # float first: the others compare with its output
            command = [sys.executable, __file__, "--one", profile, "--reference", str(reference)]
            command += ["--blocks", args.blocks, "--repeats", str(args.repeats), "--side", str(args.side)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = (
                json.loads(lines[-1])
                if lines
                else {"profile": profile, "skipped": done.stderr.strip()[-300:]}
            )
            rows.append(row)
    float_step = next((r["step_s"] for r in rows if r["profile"] == "float" and "step_s" in r), None)
    full_parameters = full_transformer_parameters(FULL.transformer)
    for row in rows:
        if "skipped" in row:
            print(f"{row['profile']:>10}: not run here ({row['skipped']})")
            continue
        row["step_over_float"] = row["step_s"] / float_step if float_step else None
        row["full_size_gib_computed"] = full_parameters * row["bytes_per_parameter"] / 2**30
        difference = row.get("max_relative_difference")
        print(
            f"{row['profile']:>10}: {row['bytes_per_parameter']:.3f} bytes/param, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB, "
            f"step {row['step_s']:.3f} s ({row['step_over_float']:.2f}x float), "
            f"full transformer {row['full_size_gib_computed']:.1f} GiB (computed)"
            + (
                f", max difference {difference:.2e} of the float output's max"
                if difference is not None
                else ""
            )
        )
    import platform

    report = {
        "benchmark": "memory",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
        "slice": slice_config(args.blocks),
        "side": args.side,
        "full_transformer_parameters": full_parameters,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


def full_transformer_parameters(config: dict[str, Any]) -> int:
    """The parameter count of a transformer of ``config`` (the slice's, or FULL's), from one
    built on the meta device (no memory): exact, whatever the storage."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return sum(parameter.numel() for parameter in model.parameters())


if __name__ == "__main__":
    main()

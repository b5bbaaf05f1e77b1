"""FLUX.1 [schnell]'s transformer from one GGUF checkpoint (``--quantize gguf``), such as
city96's ``city96/FLUX.1-schnell-gguf`` files, for 8-16 GB GPUs.

Those files hold the original Black Forest Labs checkpoint (``double_blocks.0.img_attn.
qkv.weight``: q, k and v fused), most weights quantized (Q8_0 ... Q2_K). diffusers' GGUF
quantizer keeps them quantized in memory and dequantizes each layer as it runs. The BFL
names are turned into diffusers' here rather than by diffusers' single-file converter,
which hard-codes the real model's width (3072) and so cannot read any other; this one
takes every size from the transformer's config, is the same at 3072 (tests/test_gguf.py
checks it against diffusers' own), and checks that the file fits the config, so that a
GGUF of another model fails with a clear error instead of loading half its weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

from fluxredux.errors import ModelUnavailable, WeightsNotFound, first_line

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install 'fluxredux[gguf]'"
GGUF_DOWNLOAD = "fluxredux download --gguf Q8_0"
# Some single-file checkpoints prefix every name with this (ComfyUI's full checkpoints);
# diffusers' converter strips it too.
_PREFIX = "model.diffusion_model."
# BFL's final norm is (shift, scale) along its rows; diffusers' AdaLayerNormContinuous
# takes (scale, shift).
_SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def resolve_transformer_file(value: str) -> Path:
    """``--transformer-file``: a local file as it is, or ``owner/repo/file.gguf`` from the
    Hugging Face cache. Never downloads (``fluxredux download --gguf`` does, on purpose)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise _file_not_found(value, f"{path} is a folder; give the .gguf file in it")
    parts = value.split("/")
    if path.exists() or value.startswith(("/", "./", "../", "~")) or len(parts) < 3:
        # Clearly a path (a Hub file is owner/repo/file), and no file is there.
        raise _file_not_found(value, f"no file at {path}")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise _file_not_found(
            value,
            f"no file at {path}, and {filename} of {repo_id} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})",
        ) from exc


def _file_not_found(value: str, what: str) -> WeightsNotFound:
    return WeightsNotFound(
        f"--transformer-file {value}: {what}. Fetch a GGUF of FLUX.1 [schnell]'s transformer with "
        f"`{GGUF_DOWNLOAD}` (or a smaller level, e.g. Q4_K_S) and pass the "
        "--transformer-file it prints, or give the path of a local .gguf file.",
        model=value,
    )


def load_gguf_transformer(file: Path, schnell_dir: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    """The transformer of ``schnell_dir`` (its config: local files only) with the weights of
    the GGUF ``file``, kept quantized and computed in ``dtype``. ModelUnavailable, naming
    --transformer-file, when the file is no GGUF, or one of another model or size, or when
    the gguf package is missing: never a silent fallback to the folder's own weights."""
    _check_gguf_package()
    config = FluxTransformer2DModel.load_config(schnell_dir, subfolder="transformer", local_files_only=True)
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = {
            name: tuple(t.shape)
            for name, t in FluxTransformer2DModel.from_config(config).state_dict().items()
        }
    checkpoint = _read_gguf(file)
    try:
        state_dict = bfl_to_diffusers(checkpoint, config, expected)
    except CheckpointMismatch as exc:
        raise ModelUnavailable(
            f"--transformer-file {file} is not a GGUF of this FLUX.1 [schnell] transformer "
            f"({config['num_layers']} double and {config['num_single_layers']} single blocks, "
            f"{config['num_attention_heads'] * config['attention_head_dim']} wide, as "
            f"{schnell_dir / 'transformer'} says): {exc}. Use a FLUX.1 [schnell] GGUF "
            f"(`{GGUF_DOWNLOAD}` fetches city96's), or --quantize none.",
            transformer_file=str(file),
        ) from None
    try:
        # A state dict with exactly the model's names: from_single_file converts nothing
        # and hands every GGUFParameter to the GGUF quantizer (GGUFLinear layers).
        transformer = FluxTransformer2DModel.from_single_file(
            state_dict,
            config=str(schnell_dir),
            subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            torch_dtype=dtype,
            local_files_only=True,
        )
    except (ImportError, ValueError, RuntimeError, OSError) as exc:  # a library's, said in one line
        raise ModelUnavailable(
            f"--transformer-file {file}: diffusers could not load it: {first_line(exc)}",
            transformer_file=str(file),
        ) from exc
    kinds = Counter(_quant_name(t) for t in checkpoint.values())
    log.info("transformer read from %s (%s)", file, ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
    return transformer


def _check_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelUnavailable(
            f"quantize=gguf (--transformer-file) needs the gguf package, 0.10 or newer: {GGUF_INSTALL}"
        ) from None
    from diffusers.utils import is_gguf_version

    if is_gguf_version("<", "0.10.0"):
        raise ModelUnavailable(f"quantize=gguf needs gguf 0.10 or newer: {GGUF_INSTALL}")


def _read_gguf(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``file``: GGUFParameter where quantized, plain where F32/F16."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        with file.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelUnavailable(f"--transformer-file {file} cannot be read: {first_line(exc)}") from exc
    if magic != GGUF_MAGIC:
        raise ModelUnavailable(
            f"--transformer-file {file} is not a GGUF file (it does not start with GGUF's magic bytes): "
            f"give a GGUF checkpoint of FLUX.1 [schnell]'s transformer (`{GGUF_DOWNLOAD}` fetches one), "
            "or use --quantize none.",
            transformer_file=str(file),
        )
    try:
        checkpoint: dict[str, torch.Tensor] = load_gguf_checkpoint(str(file))
    except (ValueError, OSError, KeyError, IndexError) as exc:  # truncated, or a type diffusers lacks
        raise ModelUnavailable(
            f"--transformer-file {file} could not be read as GGUF: {first_line(exc)}",
            transformer_file=str(file),
        ) from exc
    return {name.removeprefix(_PREFIX): tensor for name, tensor in checkpoint.items()}


class CheckpointMismatch(Exception):
    """The checkpoint does not fit the config; the message says where."""


def _bfl_names(
    num_layers: int, num_single_layers: int, guidance: bool
) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Each tensor of the BFL checkpoint and the diffusers tensors it holds, stacked in this
    order along dim 0 (q, k and v fused; the single blocks' MLP input too)."""

    def linear(bfl: str, *ours: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        for suffix in ("weight", "bias"):
            yield f"{bfl}.{suffix}", tuple(f"{name}.{suffix}" for name in ours)

    def rms_norm(bfl: str, ours: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        yield f"{bfl}.scale", (f"{ours}.weight",)

    yield from linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    yield from linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    yield from linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    yield from linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if guidance:  # FLUX.1 [dev]'s; [schnell] is guidance-distilled and has none
        yield from linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        yield from linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    yield from linear("txt_in", "context_embedder")
    yield from linear("img_in", "x_embedder")
    for i in range(num_layers):
        bfl, ours = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        yield from linear(f"{bfl}img_mod.lin", f"{ours}norm1.linear")
        yield from linear(f"{bfl}txt_mod.lin", f"{ours}norm1_context.linear")
        yield from linear(f"{bfl}img_attn.qkv", *(f"{ours}attn.to_{x}" for x in "qkv"))
        yield from linear(f"{bfl}txt_attn.qkv", *(f"{ours}attn.add_{x}_proj" for x in "qkv"))
        yield from rms_norm(f"{bfl}img_attn.norm.query_norm", f"{ours}attn.norm_q")
        yield from rms_norm(f"{bfl}img_attn.norm.key_norm", f"{ours}attn.norm_k")
        yield from rms_norm(f"{bfl}txt_attn.norm.query_norm", f"{ours}attn.norm_added_q")
        yield from rms_norm(f"{bfl}txt_attn.norm.key_norm", f"{ours}attn.norm_added_k")
        yield from linear(f"{bfl}img_mlp.0", f"{ours}ff.net.0.proj")
        yield from linear(f"{bfl}img_mlp.2", f"{ours}ff.net.2")
        yield from linear(f"{bfl}txt_mlp.0", f"{ours}ff_context.net.0.proj")
        yield from linear(f"{bfl}txt_mlp.2", f"{ours}ff_context.net.2")
        yield from linear(f"{bfl}img_attn.proj", f"{ours}attn.to_out.0")
        yield from linear(f"{bfl}txt_attn.proj", f"{ours}attn.to_add_out")
    for i in range(num_single_layers):
        bfl, ours = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        yield from linear(f"{bfl}modulation.lin", f"{ours}norm.linear")
        yield from linear(f"{bfl}linear1", *(f"{ours}attn.to_{x}" for x in "qkv"), f"{ours}proj_mlp")
        yield from rms_norm(f"{bfl}norm.query_norm", f"{ours}attn.norm_q")
        yield from rms_norm(f"{bfl}norm.key_norm", f"{ours}attn.norm_k")
        yield from linear(f"{bfl}linear2", f"{ours}proj_out")
    yield from linear("final_layer.linear", "proj_out")
    yield from linear("final_layer.adaLN_modulation.1", "norm_out.linear")


def bfl_to_diffusers(
    checkpoint: dict[str, torch.Tensor], config: Mapping[str, Any], expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The BFL ``checkpoint`` under diffusers' names, fused tensors split by the rows each
    part has in ``expected`` (the config's model): what diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` does at width 3072, at any width.
    CheckpointMismatch when a tensor is missing, extra, or of another shape."""
    left = dict(checkpoint)
    converted: dict[str, torch.Tensor] = {}
    names = _bfl_names(config["num_layers"], config["num_single_layers"], bool(config.get("guidance_embeds")))
    for bfl, ours in names:
        if bfl not in left:
            raise CheckpointMismatch(f"it has no {bfl}")
        tensor = left.pop(bfl)
        rows = [expected[name][0] for name in ours]
        if tensor.dim() == 0 or tensor.shape[0] != sum(rows):
            raise CheckpointMismatch(f"{bfl} has {_shape(tensor)} where this model needs {sum(rows)} rows")
        if bfl in _SWAPPED:
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        parts = torch.split(tensor, rows, dim=0)
        if any(_shape(part) != expected[name] for name, part in zip(ours, parts, strict=True)):
            needed = " + ".join(str(expected[name]) for name in ours)
            raise CheckpointMismatch(f"{bfl} has {_shape(tensor)} where this model needs {needed}")
        converted.update(zip(ours, parts, strict=True))
    if left:
        extra = sorted(left)
        dev = (
            " (FLUX.1 [dev]'s guidance embedder: a [dev] file?)"
            if any(n.startswith("guidance_in.") for n in extra)
            else ""
        )
        raise CheckpointMismatch(f"it has {len(extra)} tensors this model has not, e.g. {extra[0]}{dev}")
    missing = sorted(set(expected) - set(converted))
    if missing:  # a diffusers version with tensors this mapping does not know
        raise CheckpointMismatch(f"nothing in it fills {missing[0]}")
    return converted


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The logical shape: a quantized GGUFParameter's own shape is its bytes per row."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def _quant_name(tensor: torch.Tensor) -> str:
    quant_type = getattr(tensor, "quant_type", None)
    return (
        str(getattr(quant_type, "name", quant_type))
        if quant_type is not None
        else str(tensor.dtype).removeprefix("torch.")
    )

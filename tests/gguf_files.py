"""GGUF checkpoints of a diffusers Flux transformer, written as city96's FLUX GGUFs are.

city96's files (``city96/FLUX.1-schnell-gguf``, made by ComfyUI-GGUF's tools/convert.py)
hold the original Black Forest Labs checkpoint: BFL's tensor names (``double_blocks.0.
img_attn.qkv.weight``), q, k and v fused into one tensor, the final norm's halves in BFL's
(shift, scale) order; diffusers' single-file loader splits and renames them back. So the
test files are diffusers' state dict turned back into that checkpoint, then quantized as
convert.py does: 2-D weights to the asked type where a row divides into its blocks,
the rest (biases, norm scales, the input and output layers' weights) kept in F32.

The renaming here is written from diffusers' side on purpose (its own code, not the
loader's in fluxredux.pipeline.gguf): the tests check each against diffusers' converter.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers import FluxTransformer2DModel

# diffusers' name (without ".weight"/".bias") -> BFL's, for the tensors renamed one for one.
_EMBEDDERS = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
# Fused in BFL's checkpoint, in this order along dim 0 (diffusers splits them apart).
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

# convert.py keeps these layers' weights in F32 whatever the type asked: the small input
# and output layers, where quantization error costs the most.
_KEPT_IN_F32 = ("time_in.", "txt_in.", "vector_in.", "img_in.", "guidance_in.", "final_layer.")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) of the final norm <-> BFL's (shift, scale): its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _norm_name(bfl: str, suffix: str) -> str:
    # BFL's RMSNorms call their weight "scale".
    return f"{bfl}.scale" if bfl.endswith(("query_norm", "key_norm")) else f"{bfl}.{suffix}"


def bfl_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Flux transformer state dict as the original BFL checkpoint. Every
    tensor is used exactly once (an unknown name fails loudly here, not in a test)."""
    left = dict(state_dict)
    bfl: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return left.pop(name)

    def block_count(prefix: str) -> int:
        return len({key.split(".")[1] for key in state_dict if key.startswith(prefix)})

    for ours, theirs in _EMBEDDERS.items():
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in left:
                bfl[f"{theirs}.{suffix}"] = take(f"{ours}.{suffix}")
    for suffix in ("weight", "bias"):
        bfl[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(take(f"norm_out.linear.{suffix}"))

    for kind, renamed, fused, theirs_prefix in (
        ("transformer_blocks.", _DOUBLE, _DOUBLE_FUSED, "double_blocks."),
        ("single_transformer_blocks.", _SINGLE, _SINGLE_FUSED, "single_blocks."),
    ):
        for i in range(block_count(kind)):
            ours, theirs = f"{kind}{i}.", f"{theirs_prefix}{i}."
            for diffusers_name, bfl_name in renamed.items():
                for suffix in ("weight", "bias"):
                    if f"{ours}{diffusers_name}.{suffix}" in left:
                        bfl[theirs + _norm_name(bfl_name, suffix)] = take(f"{ours}{diffusers_name}.{suffix}")
            for bfl_name, parts in fused.items():
                for suffix in ("weight", "bias"):
                    bfl[f"{theirs}{bfl_name}.{suffix}"] = torch.cat(
                        [take(f"{ours}{part}.{suffix}") for part in parts], dim=0
                    )
    assert not left, f"diffusers tensors with no BFL name: {sorted(left)}"
    return bfl


def _qtype_for(name: str, array: np.ndarray, asked: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if array.ndim == 1 or (name.startswith(_KEPT_IN_F32) and name.endswith(".weight")):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[asked]
    return asked if array.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F32


def write_gguf(transformer: FluxTransformer2DModel, path: Path, qtype: str = "Q8_0") -> Path:
    """A GGUF file of ``transformer``'s weights at ``path``, as city96's: BFL's names and
    layout, 2-D weights quantized to ``qtype`` where their shape allows (gguf's own
    quantizer), the rest in F32."""
    asked = gguf.GGMLQuantizationType[qtype]
    state = {
        name: tensor.detach().to("cpu", torch.float32) for name, tensor in transformer.state_dict().items()
    }
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(asked))  # as convert.py writes it (its quant type, not llama.cpp's file type)
    for name, tensor in bfl_state_dict(state).items():
        array = tensor.numpy()
        data_qtype = _qtype_for(name, array, asked)
        writer.add_tensor(name, gguf.quants.quantize(array, data_qtype), raw_dtype=data_qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

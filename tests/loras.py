"""Tiny LoRA adapters for the tests: made with peft for the demo model's transformer (the
TINY architecture), with random weights (so that they change the images), and saved as a
trainer saves them, through diffusers' save_lora_weights."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from fluxredux.pipeline.architecture import TINY, ArchitectureSpec

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_lora(
    path: Path,
    *,
    seed: int,
    rank: int = 4,
    spec: ArchitectureSpec = TINY,
    targets: tuple[str, ...] = ATTENTION,
    strength: float = 0.5,
) -> Path:
    """A LoRA of ``spec``'s transformer written to ``path`` (a .safetensors file)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec.transformer)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    # peft starts lora_B at zero (an adapter that changes nothing): random both, as trained.
    state = {
        name: torch.randn(tensor.shape, generator=generator) * strength
        for name, tensor in get_peft_model_state_dict(transformer).items()
    }
    with tempfile.TemporaryDirectory() as folder:
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state, safe_serialization=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(folder) / "pytorch_lora_weights.safetensors", path)
    return path


# The same blocks at another width: a FLUX transformer LoRA whose shapes fit another model.
WIDER = replace(
    TINY,
    name="wider",
    transformer={**TINY.transformer, "attention_head_dim": 32, "axes_dims_rope": [8, 8, 16]},
)


def safetensors_of(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def sdxl_lora(path: Path) -> Path:
    """A kohya-style LoRA of an SDXL UNet: safetensors, a LoRA, but not FLUX's."""
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    return safetensors_of(
        path, {f"{name}.lora_down.weight": torch.zeros(4, 640), f"{name}.lora_up.weight": torch.zeros(640, 4)}
    )

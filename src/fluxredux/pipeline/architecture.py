"""The FLUX.1 [schnell] + Redux architecture as configs, and random-weight builders.

Two specs share one builder:
- FULL: the real model's shapes (from the published configs). With random bf16 weights
  on a GPU it times exactly like the real weights: the benchmark uses it so nobody has
  to download 24 GB to measure speed.
- TINY: the same component classes, shrunk so a whole pipeline builds in ~0.1 s and
  runs on a CPU in well under a second. The demo model and the tests use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import diffusers.utils.logging as diffusers_logging
import torch
import transformers.utils.logging as transformers_logging
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from fluxredux.pipeline.memory_profiles import SCHNELL_TRANSFORMER

# FLUX.1 [schnell]'s scheduler: flow matching, fixed shift 1.0 (no resolution-dependent shift).
SCHNELL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _vae_config(channels: tuple[int, ...], layers: int, groups: int, attention: bool) -> dict[str, Any]:
    # Four levels keep the real 8x downscale (2 ** (levels - 1)); 16 latent channels
    # packed 2x2 give the transformer's 64 input channels.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": attention,
        "force_upcast": True,
    }


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    siglip: dict[str, Any]
    embedder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHNELL_SCHEDULER))


FULL = ArchitectureSpec(
    name="full",
    # The shapes live in the torch-free memory_profiles (the HTTP process sizes profiles
    # from them); the rotary embedding's axes are only the model's business.
    transformer={**SCHNELL_TRANSFORMER, "axes_dims_rope": [16, 56, 56]},
    vae=_vae_config((128, 256, 512, 512), layers=2, groups=32, attention=True),
    # google/siglip-so400m-patch14-384: 27x27 = 729 image tokens.
    siglip={
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
    embedder={"redux_dim": 1152, "txt_in_features": 4096},
)

TINY = ArchitectureSpec(
    name="tiny",
    transformer={
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": False,
        "axes_dims_rope": [4, 4, 8],
    },
    # No mid-block attention: at 1 MP it would be a 16k x 16k attention on the CPU.
    vae=_vae_config((8, 8, 16, 16), layers=1, groups=4, attention=False),
    siglip={
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
    embedder={"redux_dim": 32, "txt_in_features": 32},
)


@dataclass
class RandomComponents:
    """Every component the project loads, with random weights."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    image_encoder: SiglipVisionModel
    feature_extractor: SiglipImageProcessorPil
    image_embedder: ReduxImageEncoder


def feature_extractor_for(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP preprocessing as published: bicubic resize to a square, scale to [-1, 1]."""
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_random_components(
    spec: ArchitectureSpec,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RandomComponents:
    """Build every component with seeded random weights, directly on ``device``.

    Building under ``torch.device(device)`` allocates and initialises on that device:
    the full-size transformer (12B parameters) is built on a GPU in seconds instead of
    being initialised in 48 GB of CPU fp32 first.
    """
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**spec.transformer)
            vae = AutoencoderKL(**spec.vae)
            image_encoder = SiglipVisionModel(SiglipVisionConfig(**spec.siglip))
            image_embedder = ReduxImageEncoder(**spec.embedder)
    finally:
        torch.set_default_dtype(previous_dtype)
    modules: list[torch.nn.Module] = [transformer, vae, image_encoder, image_embedder]
    for module in modules:
        module.eval().requires_grad_(False)
    return RandomComponents(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor_for(spec.siglip["image_size"]),
        image_embedder=image_embedder,
    )


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Silence diffusers'/transformers' own tqdm bars (we report progress ourselves)."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()

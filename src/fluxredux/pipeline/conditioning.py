"""The Redux conditioning, computed in project code.

diffusers' FluxPriorReduxPipeline, without text encoders, hard-codes the zero text
embeddings as (B, 512, 4096) and pooled (B, 768): right for the real transformer, wrong
for any other width. Sizing them from the transformer's config gives the same result
at full width (a test compares the two bit for bit) and lets the tiny demo model run
the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionModel

# T5's sequence length that the Redux prior pads with zeros, as in the reference
# implementation. The image tokens follow it.
TEXT_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class Conditioning:
    prompt_embeds: torch.Tensor  # (1, TEXT_SEQUENCE_LENGTH + image tokens, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (1, pooled_projection_dim)


def redux_conditioning(
    image: Image.Image,
    *,
    image_encoder: SiglipVisionModel,
    feature_extractor: SiglipImageProcessorPil,
    image_embedder: ReduxImageEncoder,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    device: torch.device,
    text_sequence_length: int = TEXT_SEQUENCE_LENGTH,
) -> Conditioning:
    """SigLIP -> Redux embedder -> appended after zero "text" tokens; pooled is zeros."""
    encoder_dtype = next(image_encoder.parameters()).dtype
    pixels = feature_extractor.preprocess(
        images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True
    ).pixel_values.to(device=device, dtype=encoder_dtype)
    hidden = image_encoder(pixel_values=pixels).last_hidden_state
    image_tokens = image_embedder(hidden).image_embeds.to(device=device)
    text = torch.zeros(
        (1, text_sequence_length, joint_attention_dim), device=device, dtype=image_tokens.dtype
    )
    pooled = torch.zeros((1, pooled_projection_dim), device=device, dtype=image_tokens.dtype)
    return Conditioning(prompt_embeds=torch.cat([text, image_tokens], dim=1), pooled_prompt_embeds=pooled)


def redux_strength_bias(
    conditioning: Conditioning,
    strength: float,
    *,
    image_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    text_sequence_length: int = TEXT_SEQUENCE_LENGTH,
) -> torch.Tensor | None:
    """An additive attention bias that weakens the Redux tokens: ln(strength) on their
    keys, 0 elsewhere; None at strength 1 (nothing changes: today's exact path).

    Why a bias and not scaling the tokens: multiplying the Redux embeddings by s also
    shrinks their values and moves them off the distribution the transformer saw, and
    users of ComfyUI's and others' Redux nodes report it goes from "no effect" to "all
    reference" over a narrow band. ln(s) on the keys multiplies exactly the attention
    each query pays the reference by s before the softmax renormalises (the reference's
    share of attention falls monotonically with s, and each token keeps its meaning);
    at s = 0 the reference is not attended at all.

    Joint attention runs over [text tokens (512 zeros + Redux tokens), image tokens]; the
    bias is shaped [1, 1, 1, keys] so it broadcasts over batch, heads and queries (a 2D
    mask is misread by some attention backends)."""
    if strength >= 1:
        return None
    text_tokens = conditioning.prompt_embeds.shape[1]
    bias = torch.zeros((1, 1, 1, text_tokens + image_tokens), dtype=dtype, device=device)
    bias[..., text_sequence_length:text_tokens] = math.log(strength) if strength > 0 else float("-inf")
    return bias

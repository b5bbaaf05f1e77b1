"""The Redux conditioning, computed in project code.

diffusers' FluxPriorReduxPipeline, without text encoders, hard-codes the zero text
embeddings as (B, 512, 4096) and pooled (B, 768): right for the real transformer, wrong
for any other width. Sizing them from the transformer's config gives the same result
at full width (a test compares the two bit for bit) and lets the tiny demo model run
the same code.
"""

from __future__ import annotations

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

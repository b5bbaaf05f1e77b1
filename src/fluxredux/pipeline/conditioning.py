"""The Redux conditioning, computed in project code.

diffusers' FluxPriorReduxPipeline, without text encoders, hard-codes the zero text
embeddings as (B, 512, 4096) and pooled (B, 768): right for the real transformer, wrong
for any other width. Sizing them from the transformer's config gives the same result
at full width (a test compares the two bit for bit) and lets the tiny demo model run
the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    # The zero text as one token (see collapse_zero_text): then prompt_embeds holds 1 + image
    # tokens, and nothing that expects TEXT_SEQUENCE_LENGTH text tokens may take it.
    collapsed: bool = False


def _not_collapsed(conditioning: Conditioning, what: str) -> None:
    if conditioning.collapsed:
        raise ValueError(
            f"{what} takes a conditioning with its {TEXT_SEQUENCE_LENGTH} text tokens, not a collapsed one"
        )


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
    """SigLIP -> Redux embedder -> appended after zero "text" tokens; pooled is zeros.

    The prior's parts and the widths one by one, not a ``ReduxComponents``: this is the
    reference the model's own (cached) path and diffusers' prior are checked against, and
    it needs no transformer, so it runs at any width (the real one in a test, on tiny parts)."""
    tokens = redux_tokens(
        encoder_pixels(image, feature_extractor),
        image_encoder=image_encoder,
        image_embedder=image_embedder,
        device=device,
    )
    return after_zero_text(
        tokens,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        text_sequence_length=text_sequence_length,
    )


def encoder_pixels(image: Image.Image, feature_extractor: SiglipImageProcessorPil) -> torch.Tensor:
    """What SigLIP's processor makes of ``image`` (on the CPU): exactly what the encoder sees."""
    pixels: torch.Tensor = feature_extractor.preprocess(
        images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True
    ).pixel_values
    return pixels


def redux_tokens(
    pixels: torch.Tensor,
    *,
    image_encoder: SiglipVisionModel,
    image_embedder: ReduxImageEncoder,
    device: torch.device,
) -> torch.Tensor:
    """SigLIP -> Redux embedder: the reference's tokens, on ``device``."""
    encoder_dtype = next(image_encoder.parameters()).dtype
    hidden = image_encoder(pixel_values=pixels.to(device=device, dtype=encoder_dtype)).last_hidden_state
    tokens: torch.Tensor = image_embedder(hidden).image_embeds.to(device=device)
    return tokens


def after_zero_text(
    tokens: torch.Tensor,
    *,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    text_sequence_length: int = TEXT_SEQUENCE_LENGTH,
) -> Conditioning:
    """The conditioning of a prompt-less Redux prior: zero "text" tokens, then ``tokens``
    (a new tensor: nothing done to it downstream reaches ``tokens``); pooled is zeros."""
    device, dtype = tokens.device, tokens.dtype
    text = torch.zeros((1, text_sequence_length, joint_attention_dim), device=device, dtype=dtype)
    pooled = torch.zeros((1, pooled_projection_dim), device=device, dtype=dtype)
    return Conditioning(prompt_embeds=torch.cat([text, tokens], dim=1), pooled_prompt_embeds=pooled)


def with_text(
    conditioning: Conditioning, text: Conditioning, *, text_sequence_length: int = TEXT_SEQUENCE_LENGTH
) -> Conditioning:
    """``conditioning`` (the zero text, then the Redux tokens: one reference's or a mix's)
    with a prompt's encoding in place of the zeros: ``text``'s T5 tokens before the same
    Redux tokens, and its CLIP pooled vector. What FluxPriorReduxPipeline makes of a prompt
    and one image; for several images it sums w_i·[text, tokens_i], whose text part is the
    prompt's own when the weights sum to 1, as here: the prompt counts once, the references
    are mixed."""
    _not_collapsed(conditioning, "with_text")
    if text.prompt_embeds.shape[1] != text_sequence_length:
        raise ValueError(
            f"the prompt's encoding has {text.prompt_embeds.shape[1]} tokens, expected {text_sequence_length}"
        )
    tokens = conditioning.prompt_embeds[:, text_sequence_length:]
    device, dtype = tokens.device, tokens.dtype
    prompt = torch.cat([text.prompt_embeds.to(device=device, dtype=dtype), tokens], dim=1)
    return Conditioning(
        prompt_embeds=prompt, pooled_prompt_embeds=text.pooled_prompt_embeds.to(device, dtype)
    )


@dataclass(frozen=True)
class TokenLayout:
    """The transformer's joint sequence: [text tokens, Redux tokens] (the conditioning),
    then the image tokens. A collapsed text token stands for ``text_multiplicity``
    identical ones."""

    text: int
    redux: int
    image: int
    text_multiplicity: int = 1

    @property
    def context(self) -> int:
        """Tokens of the conditioning stream: text and Redux."""
        return self.text + self.redux

    @property
    def total(self) -> int:
        return self.context + self.image

    def describe(self) -> str:
        return f"{self.context} text + {self.image} image tokens"


def token_layout(conditioning: Conditioning, *, image_tokens: int) -> TokenLayout:
    """The layout of ``conditioning`` (full zero text, a prompt's, or collapsed to one)."""
    context = conditioning.prompt_embeds.shape[1]
    text = 1 if conditioning.collapsed else TEXT_SEQUENCE_LENGTH
    multiplicity = TEXT_SEQUENCE_LENGTH if conditioning.collapsed else 1
    return TokenLayout(text=text, redux=context - text, image=image_tokens, text_multiplicity=multiplicity)


def collapse_zero_text(conditioning: Conditioning) -> Conditioning:
    """The prompt-less conditioning with its TEXT_SEQUENCE_LENGTH zero text tokens as one.

    Why it is exact: the zero tokens are identical going in, and every block treats them
    alike (same projections, same RoPE position: text ids are all 0), so they stay
    identical through the whole transformer, as their queries see the same keys. What
    they add to any query's attention is 512 equal terms: one key with +ln(512) on its
    logit gives exactly that (see ``attention_bias``). The caller must know the text is
    the zeros (no prompt): this is not checked, as checking would cost a device sync."""
    _not_collapsed(conditioning, "collapse_zero_text")
    return Conditioning(
        # A copy, not a view: a compiled transformer guards on its input's storage offset,
        # and a view's (511 tokens in) would make the prompt path's tensors recompile.
        prompt_embeds=conditioning.prompt_embeds[:, TEXT_SEQUENCE_LENGTH - 1 :].clone(),
        pooled_prompt_embeds=conditioning.pooled_prompt_embeds,
        collapsed=True,
    )


def attention_bias(
    layout: TokenLayout, strength: float, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The additive attention bias on the keys of ``layout``'s sequence: ln(multiplicity)
    on a collapsed text token, ln(strength) on the Redux tokens; None when neither applies
    (nothing changes: the exact unmasked path).

    Shaped [1, 1, 1, keys], so it broadcasts over batch, heads and queries (a 2D mask is
    misread by some attention backends), as a view of one row of keys (strides 0, 0, 0,
    1): whatever the sequence's length, its rows are aligned as memory-efficient kernels
    want them, and a compiled graph sees the same strides. In ``dtype``, the query's: some
    kernels insist.
    (In bf16, ln 512 rounds to 6.25: the collapsed key weighs 1.2% more than the 512 it
    stands for, about one bf16 step on the whole model's output; fp32 is exact.)

    Why a bias for ``redux_strength``. What users of the Redux tools report: multiplying
    the tokens by s (the default of ComfyUI's style node, and mflux's) stays "always
    strong" until s is below about 0.1, and moves the tokens off what the transformer was
    trained on; pooling the 27x27 token grid (the popular AdvancedRefluxControl node) does
    weaken the reference, at the cost of its details, and its author points to an
    attention bias as the way to set a strength without losing them. ln(s) on the keys
    multiplies exactly the attention each query pays the reference by s before the softmax
    renormalises: the reference's share of attention falls monotonically with s, each
    token keeps its meaning and detail, and at s = 0 the reference is not attended at
    all. (How the slider feels on the real weights is still to be seen on a GPU.) A
    prompt's tokens keep their full weight: only the reference is weakened."""
    collapsed = layout.text_multiplicity > 1
    if not collapsed and strength >= 1:
        return None
    keys = torch.zeros(layout.total, dtype=dtype, device=device)
    if collapsed:
        keys[: layout.text] = math.log(layout.text_multiplicity)
    if strength < 1:
        keys[layout.text : layout.context] = math.log(strength) if strength > 0 else float("-inf")
    return key_bias(keys)


def key_bias(keys: torch.Tensor) -> torch.Tensor:
    """A bias per key (1-D) as the [1, 1, 1, keys] attention mask every query shares."""
    return keys.expand(1, 1, 1, keys.shape[0])


def mix_conditionings(parts: Sequence[tuple[Conditioning, float]]) -> Conditioning:
    """Several references as one conditioning: the weighted sum of their embeddings, as
    FluxPriorReduxPipeline does with ``prompt_embeds_scale`` for a list of images, with
    the weights given already normalised (they sum to 1, so the mix keeps the scale of
    one reference's tokens and stays where the transformer was trained). One part (any
    weight) is returned as it is: a single reference takes today's exact path, and
    weights [1, 0] give exactly the first image's conditioning (1·a + 0·b = a)."""
    for conditioning, _ in parts:
        _not_collapsed(conditioning, "mix_conditionings")
    if len(parts) == 1:
        return parts[0][0]
    prompt = sum(c.prompt_embeds * weight for c, weight in parts)
    pooled = sum(c.pooled_prompt_embeds * weight for c, weight in parts)
    assert isinstance(prompt, torch.Tensor) and isinstance(pooled, torch.Tensor)
    return Conditioning(prompt_embeds=prompt, pooled_prompt_embeds=pooled)

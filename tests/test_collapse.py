"""The collapsed zero text tokens: 512 identical tokens run as one, with +ln(512) on its key.

Exact in real arithmetic; here: to fp32 precision at the attention layer, and within 2/255
per channel for whole images of the demo model, whose sequence is exactly 511 tokens
shorter (seen at the transformer's own input).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed
from PIL import Image

from fluxredux.pipeline.protocol import GenerationRequest
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.speed import Tuning
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor
from tests.conftest import SAMPLE_IMAGE
from tests.helpers import png_data_uri
from tests.test_cli import run_cli


def joint_attention(
    attention: FluxAttention, text: torch.Tensor, image: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint attention as the transformer calls it: RoPE over [text, image] positions,
    text ids all 0 (as FluxPipeline makes them), image ids on a grid."""
    text_ids = torch.zeros(text.shape[1], 3)
    side = math.isqrt(image.shape[1])
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_ids = torch.stack([torch.zeros(side * side), rows.flatten(), cols.flatten()], dim=1)
    with torch.inference_mode():
        rope = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(torch.cat([text_ids, image_ids]))
        image_out, text_out = attention(
            hidden_states=image, encoder_hidden_states=text, attention_mask=bias, image_rotary_emb=rope
        )
    return image_out, text_out


@pytest.fixture(scope="module")
def attention() -> FluxAttention:
    torch.manual_seed(0)
    layer = FluxAttention(query_dim=64, heads=4, dim_head=16, added_kv_proj_dim=64, bias=True).eval()
    with torch.no_grad():
        for parameter in layer.parameters():  # LayerNorm weights start at 1: randomise them too
            parameter.normal_(0, 0.3)
    return layer


def test_one_biased_token_equals_512_identical_ones_at_the_attention(attention: FluxAttention) -> None:
    generator = torch.Generator().manual_seed(1)
    zero_text = torch.randn(1, 1, 64, generator=generator)  # what the zero tokens become in a block
    redux = torch.randn(1, 24, 64, generator=generator)
    image = torch.randn(1, 36, 64, generator=generator)

    full_text = torch.cat([zero_text.expand(1, 512, 64), redux], dim=1)
    image_full, text_full = joint_attention(attention, full_text, image, bias=None)

    collapsed_text = torch.cat([zero_text, redux], dim=1)
    bias = torch.zeros(1, 1, 1, collapsed_text.shape[1] + image.shape[1])
    bias[..., 0] = math.log(512)
    image_collapsed, text_collapsed = joint_attention(attention, collapsed_text, image, bias)

    scale = image_full.abs().max()
    assert torch.allclose(image_collapsed, image_full, rtol=0, atol=2e-6 * scale)
    # The collapsed token comes out as each of the 512 does, and the Redux tokens as they do.
    assert torch.allclose(text_collapsed[:, :1].expand(1, 512, 64), text_full[:, :512], atol=2e-6 * scale)
    assert torch.allclose(text_collapsed[:, 1:], text_full[:, 512:], atol=2e-6 * scale)

    # Without the bias the one token weighs 1/512 of the many: far off.
    image_unbiased, _ = joint_attention(attention, collapsed_text, image, bias=None)
    assert (image_unbiased - image_full).abs().max() > 100 * 2e-6 * scale


@contextmanager
def transformer_sequences(model: ReduxModel) -> Iterator[list[tuple[int, int]]]:
    """(text + Redux, image) token counts of every call of ``model``'s transformer."""
    seen: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]))

    handle = model.parts.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def full_model(model_cache_dir: Path) -> ReduxModel:
    """The demo model (its weights on disk) loaded with the collapse off."""
    from fluxredux.pipeline.demo import demo_model_paths

    paths = demo_model_paths(model_cache_dir)
    return ReduxModel.load(
        str(paths.schnell),
        str(paths.redux),
        kind="demo",
        device=torch.device("cpu"),
        tuning=Tuning(collapse_zero_tokens=False),
    )


def predict(model: ReduxModel, images: list[Image.Image], **fields: Any) -> PredictionResult:
    inputs = PredictionInput(
        redux_image=None if len(images) > 1 else png_data_uri(8, 8),
        redux_images=[{"image": png_data_uri(8, 8), "weight": 1} for _ in images]
        if len(images) > 1
        else None,
        disable_safety_checker=True,
        output_format="png",
        seed=21,
        megapixels="0.25",
        **fields,
    )
    return Predictor(model, safety=None).predict(inputs, images)


def pixels(result: PredictionResult) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(o.data)), dtype=np.int16) for o in result.outputs])


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"num_outputs": 2, "aspect_ratio": "16:9", "num_inference_steps": 4},
        {"redux_strength": 0.4},  # both biases at once: the collapsed token's and the strength's
        {"references": 2},  # a mix of two references
    ],
    ids=["plain", "batch-16:9", "strength", "mix"],
)
def test_collapsed_images_match_the_full_sequence_within_2_of_255(
    demo_model: ReduxModel, full_model: ReduxModel, reference_image: Image.Image, fields: dict[str, Any]
) -> None:
    fields = dict(fields)
    images = [reference_image, Image.open(SAMPLE_IMAGE).rotate(90)][: fields.pop("references", 1)]
    assert demo_model.tuning.collapse_zero_tokens  # the default
    with transformer_sequences(demo_model) as collapsed_calls:
        collapsed = predict(demo_model, images, **fields)
    with transformer_sequences(full_model) as full_calls:
        full = predict(full_model, images, **fields)

    difference = np.abs(pixels(collapsed) - pixels(full))
    assert difference.max() <= 2, f"max difference {difference.max()}/255"
    # Every step's transformer call: exactly 511 text tokens fewer, the same image tokens.
    assert len(collapsed_calls) == len(full_calls) == fields.get("num_inference_steps", 4)
    for (text_c, image_c), (text_f, image_f) in zip(collapsed_calls, full_calls, strict=True):
        assert text_f - text_c == 511 and image_c == image_f
    redux, image_tokens = full_calls[0][0] - 512, full_calls[0][1]
    assert collapsed.sequence == f"{1 + redux} text + {image_tokens} image tokens"
    assert full.sequence == f"{512 + redux} text + {image_tokens} image tokens"


def test_a_prompt_keeps_the_full_sequence(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    """The prompt's T5 tokens are not identical: nothing to collapse."""
    with transformer_sequences(demo_model) as calls:
        generation = demo_model.generate(
            GenerationRequest(
                [(reference_image, 1.0)],
                width=512,
                height=512,
                num_outputs=1,
                num_inference_steps=1,
                seed=0,
                prompt="a red fox",
            )
        )
    redux = calls[0][0] - 512
    assert calls == [(512 + redux, 1024)]
    assert generation.sequence == f"{512 + redux} text + 1024 image tokens"


def test_predict_prints_the_sequence_either_way(tmp_path: Path, model_cache_dir: Path) -> None:
    args = ("predict", str(SAMPLE_IMAGE), "--megapixels", "0.25", "--seed", "3", "--output-format", "png")
    collapsed = run_cli(*args, "-o", "a", cache=model_cache_dir, cwd=tmp_path)
    full = run_cli(*args, "-o", "b", "--no-collapse-zero-tokens", cache=model_cache_dir, cwd=tmp_path)
    assert collapsed.returncode == 0 and full.returncode == 0, collapsed.stderr + full.stderr
    # The demo model's SigLIP gives 16 Redux tokens; 512x512 is 1024 image tokens.
    assert "sequence: 17 text + 1024 image tokens" in collapsed.stderr
    assert "sequence: 528 text + 1024 image tokens" in full.stderr
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    difference = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
    assert difference.max() <= 2


def test_a_collapsed_conditioning_cannot_be_misread(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    """What expects the 512 text tokens refuses a collapsed conditioning rather than take
    the Redux tokens for text (or the other way round)."""
    from fluxredux.pipeline.conditioning import collapse_zero_text, mix_conditionings, with_text

    with torch.inference_mode():
        full = demo_model.conditioning([(reference_image, 1.0)])
        collapsed = collapse_zero_text(full)
        assert collapsed.prompt_embeds.shape[1] == full.prompt_embeds.shape[1] - 511
        for misuse in (
            lambda: with_text(collapsed, full),
            lambda: mix_conditionings([(collapsed, 0.5), (full, 0.5)]),
            lambda: collapse_zero_text(collapsed),
        ):
            with pytest.raises(ValueError, match="collapsed"):
                misuse()

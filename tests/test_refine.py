"""Drafts to finals on the demo model (tiny random weights, through the real loading code):
the refine starts from the VAE's encoding of the resized draft, noised to where its
strength puts it in the schedule, and runs only the steps left; the same seed gives the
same bytes; strength 1 is a fresh generation at the target size; a prompt alone is plain
text-to-image. Outputs are noise: the tests compare tensors and bytes, never looks."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor

DRAFT = {"aspect_ratio": "16:9", "megapixels": "0.25", "seed": 3, "num_inference_steps": 4}


def predict(model: ReduxModel, images: list[Image.Image], **fields: Any) -> PredictionResult:
    reference = {} if "prompt" in fields and not images else {"redux_image": "data:,x"}
    inputs = PredictionInput(disable_safety_checker=True, output_format="png", **reference, **fields)
    return Predictor(model, safety=None).predict(inputs, images)


def final(model: ReduxModel, reference: Image.Image, draft: Image.Image, **fields: Any) -> PredictionResult:
    upscale = {
        "upscale_from": {"prediction": "draft"},
        "scale": 2,
        "seed": 3,
        "num_inference_steps": 4,
        **fields,
    }
    return predict(model, [reference, draft], **upscale)


def image_of(result: PredictionResult, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(result.outputs[index].data))


def test_the_refine_starts_from_the_noised_encoding_of_the_resized_draft(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    draft = image_of(predict(demo_model, [reference_image], **DRAFT))
    assert draft.size == (672, 384)
    seen: list[dict[str, torch.Tensor]] = []

    def first_input(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append({"latents": kwargs["hidden_states"].clone(), "timestep": kwargs["timestep"].clone()})

    steps: list[tuple[int, int]] = []
    hook = demo_model.parts.pipe.transformer.register_forward_pre_hook(first_input, with_kwargs=True)
    try:
        inputs = PredictionInput(
            redux_image="data:,x",
            upscale_from={"prediction": "d"},
            scale=2,
            seed=3,
            disable_safety_checker=True,
        )
        Predictor(demo_model, safety=None).generate(
            inputs, [reference_image, draft], on_step=lambda step, total: steps.append((step, total))
        )
    finally:
        hook.remove()
    # 4 steps at strength 0.35: the schedule's last 2 (sigma 0.5, then 0.25).
    assert steps == [(1, 2), (2, 2)] and len(seen) == 2
    sigma = float(seen[0]["timestep"][0])
    assert abs(sigma - 0.5) < 1e-6

    # What it must have started from, computed here: the draft resized to the final's size,
    # its VAE encoding (sampled with the seed's generator, then noise from the same one).
    width, height = 1344, 768
    pipe = demo_model.parts.pipe
    resized = draft.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        encoded = pipe.vae.encode(pixels).latent_dist.sample(generator)
    config = pipe.vae.config
    clean = (encoded - config.shift_factor) * config.scaling_factor
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)

    def packed(at: float) -> torch.Tensor:
        noised = at * noise + (1 - at) * clean
        return FluxPipeline._pack_latents(noised, 1, noised.shape[1], noised.shape[2], noised.shape[3])

    started = seen[0]["latents"]
    assert started.shape == packed(sigma).shape
    # Equal up to float rounding (diffusers scales the pixels to [-1, 1] in another order),
    # far from any other starting point (the draft noised to another step, or pure noise).
    assert (started - packed(sigma)).abs().max() < 1e-3
    assert min((started - packed(other)).abs().max() for other in (0.25, 0.75, 1.0)) > 0.05


def test_a_final_is_reproducible_and_moves_with_its_strength(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    draft = image_of(predict(demo_model, [reference_image], **DRAFT))
    first = final(demo_model, reference_image, draft)
    assert image_of(first).size == (1344, 768)
    assert [o.data for o in final(demo_model, reference_image, draft).outputs] == [
        o.data for o in first.outputs
    ]
    further = final(demo_model, reference_image, draft, upscale_strength=0.9)
    resized = np.asarray(draft.convert("RGB").resize((1344, 768)), dtype=np.float32)

    def distance(result: PredictionResult) -> float:
        return float(np.abs(np.asarray(image_of(result), dtype=np.float32) - resized).mean())

    assert distance(first) < distance(further)  # a lower strength stays nearer the draft


def test_strength_one_is_a_fresh_generation_at_the_target_size(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    draft = image_of(predict(demo_model, [reference_image], **DRAFT))
    fresh = final(demo_model, reference_image, draft, upscale_strength=1.0)
    direct = predict(demo_model, [reference_image], width=1344, height=768, seed=3, num_inference_steps=4)
    assert fresh.outputs[0].data == direct.outputs[0].data


def test_a_prompt_alone_is_text_to_image(demo_model: ReduxModel) -> None:
    fox = predict(demo_model, [], prompt="a red fox", width=512, height=256, seed=1, num_inference_steps=2)
    assert image_of(fox).size == (512, 256)
    assert fox.sequence == "512 text + 512 image tokens"  # the prompt's T5 tokens, no Redux tokens
    again = predict(demo_model, [], prompt="a red fox", width=512, height=256, seed=1, num_inference_steps=2)
    bird = predict(demo_model, [], prompt="a blue bird", width=512, height=256, seed=1, num_inference_steps=2)
    assert again.outputs[0].data == fox.outputs[0].data != bird.outputs[0].data
    assert "prior" not in fox.timings and fox.timings["prompt"] > 0


def test_a_prompt_alone_ignores_redux_strength(demo_model: ReduxModel) -> None:
    fields = {"prompt": "a red fox", "width": 256, "height": 256, "seed": 4, "num_inference_steps": 1}
    weak = predict(demo_model, [], redux_strength=0.3, **fields)
    assert weak.outputs[0].data == predict(demo_model, [], **fields).outputs[0].data

"""The real model code path, on the demo model (tiny random weights: outputs are noise).

The demo model is written in the real diffusers layout and loaded through the real
loader, so these tests run the same code as a GPU server, only smaller.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fluxredux.errors import ModelUnavailable, PredictionCancelled
from fluxredux.pipeline.loading import choose_model_kind
from fluxredux.pipeline.protocol import GenerationRequest
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.schema import MEGAPIXELS, TABLE_ASPECT_RATIOS, PredictionInput, output_size
from fluxredux.worker.predictor import PredictionResult, Predictor

INPUT = "data:,x"


def predict(model: Any, image: Image.Image, **fields: Any) -> PredictionResult:
    inputs = PredictionInput(redux_image=INPUT, disable_safety_checker=True, **fields)
    return Predictor(model, safety=None).predict(inputs, [image])


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("megapixels", MEGAPIXELS)
@pytest.mark.parametrize("aspect_ratio", TABLE_ASPECT_RATIOS)
def test_every_size_in_the_table(
    demo_model: ReduxModel, reference_image: Image.Image, aspect_ratio: str, megapixels: str
) -> None:
    result = predict(
        demo_model, reference_image, aspect_ratio=aspect_ratio, megapixels=megapixels, num_inference_steps=1
    )
    (output,) = result.outputs
    assert decoded(output.data).size == output_size(aspect_ratio, megapixels)
    assert (output.width, output.height) == output_size(aspect_ratio, megapixels)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    settings = {"megapixels": "0.25", "output_format": "png", "num_outputs": 2}
    first = predict(demo_model, reference_image, seed=42, **settings)
    again = predict(demo_model, reference_image, seed=42, **settings)
    other = predict(demo_model, reference_image, seed=43, **settings)
    assert [o.data for o in first.outputs] == [o.data for o in again.outputs]
    assert first.outputs[0].data != other.outputs[0].data
    assert first.seed == 42


def test_random_seed_is_reported_and_reproduces(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    first = predict(demo_model, reference_image, megapixels="0.25", output_format="png")
    second = predict(demo_model, reference_image, megapixels="0.25", output_format="png")
    assert first.seed != second.seed  # drawn at random when absent (2**-32 chance of a clash)
    replay = predict(demo_model, reference_image, megapixels="0.25", output_format="png", seed=first.seed)
    assert replay.outputs[0].data == first.outputs[0].data


def test_four_outputs_are_four_distinct_images(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    result = predict(
        demo_model, reference_image, megapixels="0.25", num_outputs=4, seed=5, output_format="png"
    )
    assert len(result.outputs) == 4
    assert len({o.data for o in result.outputs}) == 4
    assert [(o.index, o.extension) for o in result.outputs] == [(i, "png") for i in range(4)]


def test_the_reference_image_conditions_the_output(demo_model: ReduxModel) -> None:
    dark, bright = Image.new("RGB", (64, 64), (10, 10, 10)), Image.new("RGB", (64, 64), (250, 240, 200))
    a = predict(demo_model, dark, megapixels="0.25", seed=9, output_format="png")
    b = predict(demo_model, bright, megapixels="0.25", seed=9, output_format="png")
    assert a.outputs[0].data != b.outputs[0].data


def small_request(reference_image: Image.Image, **fields: Any) -> GenerationRequest:
    """One 256x256 output of ``reference_image`` in 4 steps with seed 1, but for ``fields``."""
    small = {"width": 256, "height": 256, "num_outputs": 1, "num_inference_steps": 4, "seed": 1}
    return GenerationRequest([(reference_image, 1.0)], **{**small, **fields})


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_each_step_count_is_honoured_with_progress(
    demo_model: ReduxModel, reference_image: Image.Image, steps: int
) -> None:
    progress: list[tuple[int, int]] = []
    generation = demo_model.generate(
        small_request(reference_image, num_inference_steps=steps, seed=3),
        on_step=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(i, steps) for i in range(1, steps + 1)]
    assert set(generation.timings) == {"prior", "denoise", "decode"}


def test_more_steps_change_the_image(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    one = predict(
        demo_model, reference_image, megapixels="0.25", seed=3, num_inference_steps=1, output_format="png"
    )
    four = predict(
        demo_model, reference_image, megapixels="0.25", seed=3, num_inference_steps=4, output_format="png"
    )
    assert one.outputs[0].data != four.outputs[0].data


def test_cancel_stops_within_one_step(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    steps_done: list[int] = []
    with pytest.raises(PredictionCancelled):
        demo_model.generate(
            small_request(reference_image), on_step=lambda done, total: steps_done.append(done),
            is_cancelled=lambda: len(steps_done) >= 2,
        )  # fmt: skip
    assert steps_done == [1, 2]


def test_cancel_before_start_runs_nothing(demo_model: ReduxModel, reference_image: Image.Image) -> None:
    steps_done: list[int] = []
    with pytest.raises(PredictionCancelled):
        demo_model.generate(
            small_request(reference_image), on_step=lambda done, total: steps_done.append(done),
            is_cancelled=lambda: True,
        )  # fmt: skip
    assert steps_done == []


def test_sizes_off_the_latent_grid_are_refused_not_resized(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        demo_model.generate(small_request(reference_image, width=500, height=512, num_inference_steps=1))


def test_text_encoders_are_not_loaded_though_the_folder_has_them(demo_model: ReduxModel) -> None:
    schnell = Path(demo_model.info.schnell)
    assert (schnell / "text_encoder_2" / "model.safetensors").is_file()
    assert (schnell / "tokenizer" / "tokenizer.json").is_file()
    pipe = demo_model.parts.pipe
    assert (pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2) == (None,) * 4
    assert pipe.transformer.config.guidance_embeds is False


def test_demo_model_says_what_it_is(demo_model: ReduxModel) -> None:
    assert demo_model.info.kind == "demo"
    assert demo_model.info.notice == "demo model: random weights, outputs are noise"
    assert "DEMO" in demo_model.info.describe()
    assert demo_model.info.dtype == "float32"  # fp32 on CPU; bf16 is ~15x slower there


def test_demo_model_is_built_deterministically(tmp_path: Path, model_cache_dir: Path) -> None:
    from fluxredux.pipeline.demo import demo_model_paths, write_demo_model

    fresh = write_demo_model(tmp_path / "again")
    cached = demo_model_paths(model_cache_dir)
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (fresh.schnell / sub).read_bytes() == (cached.schnell / sub).read_bytes()
    for sub in ("image_encoder/model.safetensors", "image_embedder/diffusion_pytorch_model.safetensors"):
        assert (fresh.redux / sub).read_bytes() == (cached.redux / sub).read_bytes()


def test_auto_picks_the_real_model_only_with_cuda() -> None:
    assert choose_model_kind("auto", cuda_available=False) == "demo"
    assert choose_model_kind("auto", cuda_available=True) == "flux"
    assert choose_model_kind("flux", cuda_available=False) == "flux"
    with pytest.raises(ModelUnavailable):
        choose_model_kind("sdxl", cuda_available=True)


def test_offload_needs_cuda(model_cache_dir: Path) -> None:
    from fluxredux.pipeline.demo import demo_model_paths

    paths = demo_model_paths(model_cache_dir)
    with pytest.raises(ModelUnavailable, match="needs a CUDA device"):
        ReduxModel.load(
            str(paths.schnell), str(paths.redux), kind="demo", device=torch.device("cpu"), offload="model"
        )


def test_conditioning_equals_diffusers_prior_at_full_width() -> None:
    """Our zero-padding sized from the transformer config == FluxPriorReduxPipeline's
    hard-coded (512, 4096) / 768 at the real width. Tiny SigLIP, real-width embedder."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from fluxredux.pipeline.architecture import TINY, feature_extractor_for
    from fluxredux.pipeline.conditioning import redux_conditioning

    torch.manual_seed(0)
    encoder = SiglipVisionModel(SiglipVisionConfig(**TINY.siglip)).eval()
    embedder = ReduxImageEncoder(redux_dim=TINY.siglip["hidden_size"], txt_in_features=4096).eval()
    extractor = feature_extractor_for(TINY.siglip["image_size"])
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    with torch.inference_mode():
        ours = redux_conditioning(
            image, image_encoder=encoder, feature_extractor=extractor, image_embedder=embedder,
            joint_attention_dim=4096, pooled_projection_dim=768, device=torch.device("cpu"),
        )  # fmt: skip
        prior = FluxPriorReduxPipeline(
            image_encoder=encoder, feature_extractor=extractor, image_embedder=embedder
        )(image, return_dict=False)
    assert ours.prompt_embeds.shape == prior[0].shape == (1, 512 + 16, 4096)
    assert torch.equal(ours.prompt_embeds, prior[0])
    assert torch.equal(ours.pooled_prompt_embeds, prior[1])


# --- beyond the hosted API: the optional controls --------------------------------------------

SMALL = {"megapixels": "0.25", "output_format": "png", "seed": 11, "num_inference_steps": 2}


def pixels_of(result: PredictionResult) -> np.ndarray:
    return np.asarray(decoded(result.outputs[0].data), dtype=np.float64)


def test_the_new_controls_at_their_defaults_give_todays_bytes(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    today = predict(demo_model, reference_image, **SMALL)
    spelled_out = predict(demo_model, reference_image, redux_strength=1, redux_image_crop="squash", **SMALL)
    assert spelled_out.outputs[0].data == today.outputs[0].data


def test_a_weaker_reference_moves_the_image_further_the_weaker_it_is(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    """ln(strength) on the Redux keys: the reference's share of attention falls with it,
    so the image moves away from the full-strength one monotonically."""
    full = pixels_of(predict(demo_model, reference_image, **SMALL))
    distances = [
        float(
            np.abs(pixels_of(predict(demo_model, reference_image, redux_strength=s, **SMALL)) - full).mean()
        )
        for s in (0.9, 0.5, 0.1, 0.0)
    ]
    assert distances[0] > 0
    assert distances == sorted(distances), distances


def test_crop_modes_change_what_the_encoder_sees_of_a_portrait(demo_model: ReduxModel) -> None:
    portrait = Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 48, 3), dtype=np.uint8))
    outputs = {
        mode: predict(demo_model, portrait, redux_image_crop=mode, **SMALL).outputs[0].data
        for mode in ("squash", "center", "pad")
    }
    assert len(set(outputs.values())) == 3


def test_match_input_generates_at_the_references_proportions(demo_model: ReduxModel) -> None:
    portrait = Image.new("RGB", (600, 900), (90, 60, 30))
    result = predict(demo_model, portrait, aspect_ratio="match_input", **SMALL)
    width, height = output_size("match_input", "0.25", (600, 900))
    assert decoded(result.outputs[0].data).size == (width, height) == (416, 624)


def test_weights_one_and_zero_give_the_first_reference_alone(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    other = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mix = {"redux_images": [{"image": INPUT, "weight": 1}, {"image": INPUT, "weight": 0}]}
    alone = predict(demo_model, reference_image, **SMALL)
    inputs = PredictionInput(disable_safety_checker=True, **mix, **SMALL)  # type: ignore[arg-type]
    mixed = Predictor(demo_model, safety=None).predict(inputs, [reference_image, other])
    assert mixed.outputs[0].data == alone.outputs[0].data


def test_a_mix_of_two_references_is_neither_of_them(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    other = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mix = {"redux_images": [{"image": INPUT, "weight": 1}, {"image": INPUT, "weight": 1}]}
    inputs = PredictionInput(disable_safety_checker=True, **mix, **SMALL)  # type: ignore[arg-type]
    mixed = Predictor(demo_model, safety=None).predict(inputs, [reference_image, other]).outputs[0].data
    assert mixed not in {
        predict(demo_model, image, **SMALL).outputs[0].data for image in (reference_image, other)
    }

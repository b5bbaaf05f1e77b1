"""The optional prompt: T5 tokens and CLIP's pooled vector in place of the zero text, the
Redux image tokens still appended; the text encoders loaded on first use only, once, and
freed after each prompt when the setting says so. On the demo model (tiny random weights,
its own tiny text encoders; outputs are noise: the tests compare bytes, never looks)."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fluxredux.config import Offload, Settings
from fluxredux.errors import FluxReduxError, TextEncodersMissing
from fluxredux.pipeline.conditioning import TEXT_SEQUENCE_LENGTH
from fluxredux.pipeline.conditioning_cache import MIB, ConditioningCache
from fluxredux.pipeline.demo import demo_model_paths
from fluxredux.pipeline.fake import FakeModel
from fluxredux.pipeline.loading import load_model
from fluxredux.pipeline.protocol import GenerationRequest
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.text_encoders import LazyTextEncoders, TextEncoders, load_text_encoders
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor
from fluxredux.worker.process import model_details
from tests.harness import running_server
from tests.test_conditioning_cache import CountingEncoder, sharing

SMALL = {"megapixels": "0.25", "output_format": "png", "seed": 11, "num_inference_steps": 2}
CPU = torch.device("cpu")


class CountingLoader:
    """Loads the demo model's text encoders, counting the loads (injected into the model)."""

    def __init__(self, cache_dir: Path, delay: float = 0.0) -> None:
        self.folder = demo_model_paths(cache_dir).schnell
        self.delay = delay
        self.calls = 0

    def __call__(self) -> TextEncoders:
        self.calls += 1
        time.sleep(self.delay)  # a slow load, so that concurrent first prompts overlap
        return load_text_encoders(self.folder, dtype=torch.float32, device=CPU)


def predict(model: Any, image: Image.Image, **fields: Any) -> PredictionResult:
    inputs = PredictionInput(redux_image="data:,x", disable_safety_checker=True, **{**SMALL, **fields})
    return Predictor(model, safety=None).predict(inputs, [image])


def files(result: PredictionResult) -> list[bytes]:
    return [output.data for output in result.outputs]


def other_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_without_a_prompt_nothing_changes_and_nothing_loads(
    demo_model: ReduxModel, reference_image: Image.Image, model_cache_dir: Path
) -> None:
    loader = CountingLoader(model_cache_dir)
    model = sharing(demo_model, LazyTextEncoders(loader))
    # A model that cannot take a prompt at all: the path every output took before prompts.
    before = predict(sharing(demo_model, None), reference_image)
    for fields in ({}, {"prompt": None}, {"prompt": ""}, {"prompt": "  \n "}):
        result = predict(model, reference_image, **fields)
        assert files(result) == files(before)
        assert "prompt" not in result.timings
    assert loader.calls == 0 and not model.text_encoders_loaded
    # The zero text: 512 zero tokens before the Redux tokens, a zero pooled vector.
    conditioning = model.conditioning([(reference_image, 1.0)])
    assert not conditioning.prompt_embeds[:, :TEXT_SEQUENCE_LENGTH].any()
    assert not conditioning.pooled_prompt_embeds.any()


def test_a_prompt_changes_the_output_and_loads_the_encoders_once(
    demo_model: ReduxModel, reference_image: Image.Image, model_cache_dir: Path
) -> None:
    loader = CountingLoader(model_cache_dir)
    model = sharing(demo_model, LazyTextEncoders(loader))
    plain = files(predict(model, reference_image))
    assert loader.calls == 0
    fox = predict(model, reference_image, prompt="a red fox")
    assert loader.calls == 1 and model.text_encoders_loaded
    assert files(fox) != plain
    assert fox.timings["prompt"] > 0
    assert files(predict(model, reference_image, prompt="a red fox")) == files(fox)  # deterministic
    bird = files(predict(model, reference_image, prompt="a blue bird"))
    assert bird not in (files(fox), plain)
    assert files(predict(model, reference_image)) == plain  # loaded encoders change nothing
    assert loader.calls == 1  # kept (the default): loaded once for every prompt
    assert model_details(model)["text_encoders_loaded"] is True


def test_first_prompts_arriving_together_load_the_encoders_once(
    demo_model: ReduxModel, model_cache_dir: Path
) -> None:
    loader = CountingLoader(model_cache_dir, delay=0.3)
    model = sharing(demo_model, LazyTextEncoders(loader))
    start = threading.Barrier(4)
    encoded: list[torch.Tensor] = []

    def encode() -> None:
        start.wait()
        encoded.append(model.encode_prompt("a cat").prompt_embeds)

    threads = [threading.Thread(target=encode) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == 1
    assert len(encoded) == 4 and all(torch.equal(e, encoded[0]) for e in encoded)


@pytest.mark.parametrize(("policy", "kept"), [("keep", True), ("unload", False)])
def test_the_setting_decides_whether_they_stay_loaded(
    model_cache_dir: Path,
    reference_image: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    kept: bool,
) -> None:
    monkeypatch.setenv("FLUXREDUX_TEXT_ENCODERS", policy)
    model = load_model(Settings(model="demo", cache_dir=model_cache_dir))  # a fresh one, lazy as served
    assert model.text_encoders is not None and model.text_encoders.keep is kept
    assert not model.text_encoders_loaded and model_details(model)["text_encoders_loaded"] is False
    loaded_while_denoising: list[bool] = []

    def note(done: int, total: int) -> None:
        loaded_while_denoising.append(model.text_encoders_loaded)

    request = GenerationRequest(
        [(reference_image, 1.0)], width=256, height=256, num_outputs=1, num_inference_steps=2, seed=3,
        prompt="a fox",
    )  # fmt: skip
    runs = [model.generate(request, on_step=note) for _ in range(2)]
    # unload: freed as soon as the prompt is encoded, before the denoising that needs the memory.
    assert loaded_while_denoising == [kept] * 4
    assert model.text_encoders_loaded is kept
    assert model.text_encoders.loads == (1 if kept else 2)
    assert np.array_equal(runs[0].images[0], runs[1].images[0])  # a reload encodes the same


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_text_encoders_encode_the_same(model_cache_dir: Path, offload: Offload) -> None:
    """With FLUXREDUX_OFFLOAD they wait in CPU RAM (model: moved to the device per prompt;
    sequential: streamed by accelerate's hooks). Here the device is the CPU itself: the
    code paths run, the GPU memory they save is not measured."""
    folder = demo_model_paths(model_cache_dir).schnell
    resident = load_text_encoders(folder, dtype=torch.float32, device=CPU).encode("a red fox")
    offloaded = load_text_encoders(folder, dtype=torch.float32, device=CPU, offload=offload)
    assert offloaded.offload == offload
    assert torch.equal(offloaded.encode("a red fox").prompt_embeds, resident.prompt_embeds)
    assert torch.equal(offloaded.encode("a red fox").pooled_prompt_embeds, resident.pooled_prompt_embeds)


def test_the_prompt_conditioning_is_what_diffusers_redux_prior_makes_of_it(
    demo_model: ReduxModel, reference_image: Image.Image, model_cache_dir: Path
) -> None:
    """FluxPriorReduxPipeline given text encoders and a prompt, on the same components:
    equal bit for bit for one image; for a weighted mix it sums w_i * [text, tokens_i],
    which keeps the prompt's text part whole (weights sum to 1) up to rounding."""
    from diffusers import FluxPriorReduxPipeline

    encoders = load_text_encoders(demo_model_paths(model_cache_dir).schnell, dtype=torch.float32, device=CPU)
    model = sharing(demo_model, LazyTextEncoders(lambda: encoders))
    prior = FluxPriorReduxPipeline(
        image_encoder=demo_model.parts.image_encoder,
        feature_extractor=demo_model.parts.feature_extractor,
        image_embedder=demo_model.parts.image_embedder,
        text_encoder=encoders.clip,
        tokenizer=encoders.clip_tokenizer,
        text_encoder_2=encoders.t5,
        tokenizer_2=encoders.t5_tokenizer,
    )
    prompt = "a watercolour painting, soft morning light"
    with torch.inference_mode():
        ours = model.conditioning([(reference_image, 1.0)], prompt)
        theirs = prior(reference_image, prompt=prompt, return_dict=False)
        assert ours.prompt_embeds.shape == (1, TEXT_SEQUENCE_LENGTH + 16, 32)
        assert torch.equal(ours.prompt_embeds, theirs[0])
        assert torch.equal(ours.pooled_prompt_embeds, theirs[1])

        other = other_image()
        mixed = model.conditioning([(reference_image, 0.75), (other, 0.25)], prompt)
        theirs = prior(
            [reference_image, other], prompt=prompt, prompt_embeds_scale=[0.75, 0.25],
            pooled_prompt_embeds_scale=[0.75, 0.25], return_dict=False,
        )  # fmt: skip
    torch.testing.assert_close(mixed.prompt_embeds, theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.pooled_prompt_embeds, theirs[1], rtol=0, atol=1e-6)
    # The prompt counts once, whole; only the image tokens are mixed.
    text = slice(0, TEXT_SEQUENCE_LENGTH)
    assert torch.equal(mixed.prompt_embeds[:, text], ours.prompt_embeds[:, text])
    assert torch.equal(mixed.pooled_prompt_embeds, ours.pooled_prompt_embeds)


def test_the_conditioning_cache_serves_prompted_predictions(
    demo_model: ReduxModel, reference_image: Image.Image, model_cache_dir: Path
) -> None:
    """The cache holds image tokens only: the prompt is put before them on a hit as on a miss."""
    encoder = CountingEncoder(demo_model.parts.image_encoder)
    cache = ConditioningCache(MIB)
    encoders = LazyTextEncoders(CountingLoader(model_cache_dir))
    model = sharing(demo_model, encoders, cache=cache, encoder=encoder)
    uncached = sharing(demo_model, encoders)
    prompts = ("a red fox", "a blue bird", None)
    outputs = [files(predict(model, reference_image, prompt=p)) for p in prompts]
    assert (encoder.calls, cache.counters()) == (1, {"hits": 2, "misses": 1})
    assert len({tuple(o) for o in outputs}) == 3
    assert outputs == [files(predict(uncached, reference_image, prompt=p)) for p in prompts]


def test_at_redux_strength_zero_the_prompt_alone_steers(
    demo_model: ReduxModel, reference_image: Image.Image, model_cache_dir: Path
) -> None:
    """The strength bias falls on the Redux tokens after the prompt's 512, never on the
    prompt: at 0 the reference is not attended at all, so any reference gives the same
    image, and the prompt still makes its difference."""
    model = sharing(demo_model, LazyTextEncoders(CountingLoader(model_cache_dir)))
    fox = {"prompt": "a red fox", "redux_strength": 0}
    assert files(predict(model, reference_image, **fox)) == files(predict(model, other_image(), **fox))
    assert files(predict(model, reference_image, **fox)) != files(
        predict(model, reference_image, prompt="a blue bird", redux_strength=0)
    )


def schnell_without_text_encoders(tmp_path: Path, cache_dir: Path) -> Path:
    copy = tmp_path / "schnell"
    without = shutil.ignore_patterns("text_encoder_2")
    shutil.copytree(demo_model_paths(cache_dir).schnell, copy, ignore=without)
    return copy


def test_missing_text_encoders_fail_a_prompted_prediction_clearly(
    tmp_path: Path, model_cache_dir: Path, reference_image: Image.Image
) -> None:
    schnell = schnell_without_text_encoders(tmp_path, model_cache_dir)
    model = ReduxModel.load(
        str(schnell), str(demo_model_paths(model_cache_dir).redux), kind="demo", device=CPU
    )
    assert len(predict(model, reference_image).outputs) == 1  # no prompt: nothing missing
    with pytest.raises(TextEncodersMissing) as info:
        predict(model, reference_image, prompt="a red fox")
    error = info.value
    assert isinstance(error, FluxReduxError) and error.code == "text_encoders_missing"
    assert str(schnell) in error.message and "text_encoder_2/config.json" in error.message
    assert "fluxredux download --with-text-encoders" in error.message
    assert error.detail["missing"] == ["text_encoder_2/config.json", "text_encoder_2/*.safetensors"]
    assert not model.text_encoders_loaded

    # Served: the prediction fails with that code and message (no 500, no internal error).
    with running_server(tmp_path / "server", model=model) as api:
        prediction = api.get(api.create_id(prompt="a red fox", **SMALL), wait=30)
        assert prediction["status"] == "error"
        assert prediction["error_code"] == "text_encoders_missing"
        assert "--with-text-encoders" in prediction["error"]


def test_a_repo_missing_from_the_cache_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from fluxredux.pipeline.weights import resolve_text_encoders

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TextEncodersMissing) as info:
        resolve_text_encoders("black-forest-labs/FLUX.1-schnell")
    assert str(tmp_path) in info.value.message and "--with-text-encoders" in info.value.message


def test_a_model_built_without_text_encoders_says_it_takes_no_prompt(
    demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    with pytest.raises(TextEncodersMissing, match="without text encoders"):
        predict(sharing(demo_model, None), reference_image, prompt="a red fox")


def test_the_fake_model_takes_the_prompt_too(tmp_path: Path) -> None:
    fake = FakeModel()
    request = GenerationRequest([], width=16, height=16, num_outputs=1, num_inference_steps=1, seed=5)
    plain = fake.generate(request).images[0]
    assert np.array_equal(fake.generate(replace(request, prompt=None)).images[0], plain)
    assert not np.array_equal(fake.generate(replace(request, prompt="a red fox")).images[0], plain)

    with running_server(tmp_path) as api:
        with_prompt = api.get(api.create_id(prompt="a red fox", seed=5, output_format="png"), wait=10)
        without = api.get(api.create_id(seed=5, output_format="png"), wait=10)
        assert with_prompt["status"] == without["status"] == "success"
        assert with_prompt["input"]["prompt"] == "a red fox" and without["input"]["prompt"] is None
        assert httpx.get(with_prompt["output"]).content != httpx.get(without["output"]).content

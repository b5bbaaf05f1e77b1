"""Smaller weights for smaller GPUs (the quantize choices), on the demo model and a CPU:
int8 (torchao, weight-only) runs here end to end through the real loading code; nf4 needs
CUDA (diffusers' bitsandbytes quantizer refuses to start without a GPU) and gguf a file, and
each says so at start, naming the flag and the way out, before any weight is read; the
combinations diffusers cannot run are refused the same way, never a silent bf16."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fluxredux.config import Settings
from fluxredux.errors import ModelUnavailable
from fluxredux.pipeline.loading import load_model
from fluxredux.pipeline.redux_model import ReduxModel
from fluxredux.pipeline.speed import Tuning, check_tuning
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import PredictionResult, Predictor
from tests.conftest import SAMPLE_IMAGE
from tests.test_cli import run_cli

FIELDS = {"megapixels": "0.25", "seed": 9, "num_inference_steps": 2, "output_format": "png"}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def int8_model(model_cache_dir: Path) -> ReduxModel:
    return load_model(Settings(model="demo", cache_dir=model_cache_dir, quantize="int8"))


def predict(model: ReduxModel, image: Image.Image, **fields: Any) -> PredictionResult:
    inputs = PredictionInput(redux_image="data:,x", disable_safety_checker=True, **{**FIELDS, **fields})
    return Predictor(model, safety=None).predict(inputs, [image])


def pixels(result: PredictionResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.outputs[0].data)), dtype=np.int16)


def test_int8_quantizes_the_transformers_linear_weights_and_says_so(int8_model: ReduxModel) -> None:
    from torchao.quantization import Int8Tensor

    linear = int8_model.parts.pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(linear.weight, Int8Tensor)
    assert "quantize int8" in int8_model.info.describe()
    assert not isinstance(
        int8_model.parts.pipe.vae.decoder.conv_in.weight, Int8Tensor
    )  # the transformer only


def test_int8_makes_images_the_same_for_the_same_seed_near_the_float_ones(
    int8_model: ReduxModel, demo_model: ReduxModel, reference_image: Image.Image
) -> None:
    first, again = predict(int8_model, reference_image), predict(int8_model, reference_image)
    assert first.outputs[0].data == again.outputs[0].data
    assert Image.open(io.BytesIO(first.outputs[0].data)).size == (512, 512)
    other = predict(int8_model, reference_image, seed=10)
    assert other.outputs[0].data != first.outputs[0].data
    # Weight-only int8 moves each weight by at most half a step of its row's scale: the
    # image moves a little (the demo model's random weights amplify it more than FLUX's).
    difference = np.abs(pixels(first) - pixels(predict(demo_model, reference_image)))
    assert 0 < difference.mean() < 8, difference.mean()


@pytest.mark.parametrize(
    ("tuning", "device", "offload", "says"),
    [
        (Tuning(quantize="nf4"), CPU, "none", "quantize=nf4 needs a CUDA GPU (bitsandbytes 4-bit)"),
        (Tuning(quantize="gguf"), CPU, "none", "quantize=gguf needs --transformer-file"),
        (Tuning(quantize="fp8"), CPU, "none", "needs a CUDA GPU"),
        (Tuning(quantize="int8"), CUDA, "model", "quantize=int8 cannot be combined with offload=model"),
        (
            Tuning(quantize="nf4"),
            CUDA,
            "sequential",
            "quantize=nf4 cannot be combined with offload=sequential",
        ),
        (Tuning(quantize="gguf"), CUDA, "group", "quantize=gguf cannot be combined with offload=group"),
        (
            Tuning(compile="transformer"),
            CUDA,
            "group",
            "compile=transformer cannot be combined with offload=group",
        ),
        (Tuning(text_encoder_quantize="nf4"), CPU, "none", "text_encoder_quantize=nf4"),
    ],
    ids=[
        "nf4-cpu",
        "gguf-no-file",
        "fp8-cpu",
        "int8-model",
        "nf4-sequential",
        "gguf-group",
        "compile-group",
        "t5",
    ],
)
def test_what_cannot_run_is_refused_before_loading(
    tuning: Tuning, device: torch.device, offload: Any, says: str
) -> None:
    with pytest.raises(ModelUnavailable, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_tuning(tuning, device, offload)


def test_the_combinations_diffusers_runs_pass_the_check() -> None:
    check_tuning(Tuning(quantize="int8"), CPU, "none")
    check_tuning(Tuning(), CUDA, "group")
    check_tuning(Tuning(text_encoder_quantize="int8"), CPU, "none")


def test_nf4_on_this_cpu_is_one_plain_error_at_start(tmp_path: Path, model_cache_dir: Path) -> None:
    result = run_cli(
        "predict", str(SAMPLE_IMAGE), "--quantize", "nf4", "-o", "out", cache=model_cache_dir, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "quantize=nf4 needs a CUDA GPU (bitsandbytes 4-bit)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_an_int8_t5_encodes_prompts_in_fewer_bytes(
    model_cache_dir: Path, reference_image: Image.Image
) -> None:
    from torchao.quantization import Int8Tensor

    from fluxredux.pipeline.demo import demo_model_paths
    from fluxredux.pipeline.text_encoders import load_text_encoders

    folder = demo_model_paths(model_cache_dir).schnell
    encoders = load_text_encoders(folder, dtype=torch.float32, device=CPU, quantize="int8")
    assert any(isinstance(parameter, Int8Tensor) for parameter in encoders.t5.parameters())
    plain = load_text_encoders(folder, dtype=torch.float32, device=CPU)
    quantized, exact = encoders.encode("a red fox"), plain.encode("a red fox")
    assert quantized.prompt_embeds.shape == exact.prompt_embeds.shape
    assert torch.allclose(quantized.prompt_embeds, exact.prompt_embeds, atol=0.1)
    model = load_model(Settings(model="demo", cache_dir=model_cache_dir, text_encoder_quantize="int8"))
    assert predict(model, reference_image, prompt="a red fox").outputs


def test_a_quantize_or_offload_given_wins_over_the_auto_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxredux.cli.options import ModelFlags, settings_from

    monkeypatch.delenv("FLUXREDUX_QUANTIZE", raising=False)
    monkeypatch.delenv("FLUXREDUX_OFFLOAD", raising=False)
    monkeypatch.delenv("FLUXREDUX_MEMORY_PROFILE", raising=False)
    assert settings_from(ModelFlags()).memory_profile == "auto"
    assert settings_from(ModelFlags(quantize="none")).memory_profile == "manual"  # given, even as none
    monkeypatch.setenv("FLUXREDUX_OFFLOAD", "model")
    assert settings_from(ModelFlags()).memory_profile == "manual"
    monkeypatch.delenv("FLUXREDUX_OFFLOAD")
    assert settings_from(ModelFlags(memory_profile="nf4")).memory_profile == "nf4"  # a name is kept


@pytest.fixture
def cuda_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the start-up checks ask of torch.cuda, answered as on an RTX 30x0 (cc 8.6) with
    bitsandbytes' CUDA build: the choice's glue is tested here, the GPU itself cannot be."""
    from fluxredux.pipeline import quantization

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 30x0")
    monkeypatch.setattr(quantization, "_needs_bitsandbytes", lambda what: None)


@pytest.mark.usefixtures("cuda_here")
def test_a_worker_on_a_12_gb_gpu_loads_the_profile_auto_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loading step's use of the choice (the choice itself: tests/test_memory_profiles.py):
    this worker's GPU is read, the picked profile's quantize and offload replace the
    defaults, and the line that says so is what the model's description will show."""
    from fluxredux.pipeline import devices
    from fluxredux.pipeline.loading import _with_memory_profile
    from fluxredux.pipeline.memory_profiles import DeviceReport

    gib = 2**30
    asked: list[int] = []

    def a_3060(index: int) -> DeviceReport:
        asked.append(index)
        return DeviceReport(
            name="NVIDIA GeForce RTX 3060",
            total_bytes=12 * gib,
            free_bytes=int(11.5 * gib),
            capability=(8, 6),
        )

    monkeypatch.setattr(devices, "cuda_device", a_3060)
    tuning, offload, line = _with_memory_profile(
        Settings(), torch.device("cuda", 1), Tuning(compile="transformer")
    )
    assert asked == [1]  # its own GPU, no other
    assert (tuning.quantize, offload, tuning.compile) == ("nf4", "none", "transformer")
    assert "nf4" in line
    with pytest.raises(ModelUnavailable, match="--memory-profile"):
        _with_memory_profile(Settings(memory_profile="tiny"), torch.device("cuda", 0), Tuning())


def test_a_profile_name_is_checked_at_once_and_never_overrides_a_flag(tmp_path: Path) -> None:
    unknown = run_cli("predict", str(SAMPLE_IMAGE), "--memory-profile", "tiny", cache=tmp_path, cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown memory profile 'tiny'" in unknown.stderr, unknown.stderr
    both = run_cli(
        "predict",
        str(SAMPLE_IMAGE),
        "--memory-profile",
        "nf4",
        "--quantize",
        "int8",
        cache=tmp_path,
        cwd=tmp_path,
    )
    assert both.returncode == 2 and "drop it or --quantize" in both.stderr, both.stderr
    alone = run_cli(
        "predict", str(SAMPLE_IMAGE), "--transformer-file", "x.gguf", cache=tmp_path, cwd=tmp_path
    )
    assert alone.returncode != 0 and "it needs --quantize gguf" in alone.stderr, alone.stderr


@pytest.mark.usefixtures("cuda_here")
def test_auto_passes_over_what_this_worker_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile that needs a package not installed here, or an offload its --compile cannot
    combine with, is passed over, saying why; a prompt on a card that needs nf4 and model
    offload gets its T5 in 4-bit too."""
    from fluxredux.pipeline import devices, quantization
    from fluxredux.pipeline.loading import _with_memory_profile
    from fluxredux.pipeline.memory_profiles import DeviceReport

    gib = 2**30

    def a_3080(index: int) -> DeviceReport:
        return DeviceReport(
            name="RTX 3080", total_bytes=10 * gib, free_bytes=int(9.5 * gib), capability=(8, 6)
        )

    monkeypatch.setattr(devices, "cuda_device", a_3080)
    tuning, offload, _ = _with_memory_profile(Settings(), torch.device("cuda", 0), Tuning())
    assert (tuning.quantize, offload, tuning.text_encoder_quantize) == ("nf4", "model", "nf4")

    def no_bitsandbytes(what: str) -> None:
        raise ModelUnavailable(f"{what} needs bitsandbytes")

    monkeypatch.setattr(quantization, "_needs_bitsandbytes", no_bitsandbytes)
    tuning, offload, _ = _with_memory_profile(Settings(), torch.device("cuda", 0), Tuning())
    assert (tuning.quantize, offload) == ("none", "group")  # nf4 passed over: 8 GB's choice
    # 9.5 GiB free with --compile: group and sequential offload would stream, which compile
    # cannot; with bitsandbytes back, nf4 with model offload is what fits and runs.
    monkeypatch.setattr(quantization, "_needs_bitsandbytes", lambda what: None)
    compiled = Tuning(compile="transformer")
    tuning, offload, _ = _with_memory_profile(Settings(), torch.device("cuda", 0), compiled)
    assert (tuning.quantize, offload) == ("nf4", "model")


@pytest.mark.usefixtures("cuda_here")
def test_every_profile_is_a_combination_the_start_up_checks_accept() -> None:
    from fluxredux.pipeline.memory_profiles import PROFILES

    for profile in PROFILES:
        if profile.quantize == "fp8":
            continue  # cc 8.9+, and this stand-in GPU is 8.6: refused by design, not by the table
        check_tuning(Tuning(quantize=profile.quantize), CUDA, profile.offload)

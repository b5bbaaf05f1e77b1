"""Memory profiles: the parameter counts behind them (each formula against the real
diffusers/transformers class), auto's choice for the GPUs self-hosters have, and
``fluxredux doctor`` on this CPU-only machine."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)
from typer.testing import CliRunner

from fluxredux.pipeline import devices as devices_module
from fluxredux.pipeline import memory_profiles as mp
from fluxredux.pipeline.architecture import FULL, TINY
from fluxredux.pipeline.memory_profiles import (
    FLUX_SCHNELL,
    GIB,
    PROFILES,
    PROFILES_BY_NAME,
    DeviceReport,
    choose_profile,
    describe_choice,
    margin_bytes,
    needed_bytes,
)
from tests.test_cli import run_cli

# A config unlike both specs: guidance embedder, 2x2 patches, other in/out channels, heads
# of another width; the formula must follow every field it reads.
ODD_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 8,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 3,
    "joint_attention_dim": 20,
    "pooled_projection_dim": 12,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _leaf_params(module: torch.nn.Module) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


# --- the formulas against the real classes --------------------------------------------------


@pytest.mark.parametrize(
    "config", [TINY.transformer, ODD_TRANSFORMER, FULL.transformer], ids=["tiny", "odd", "full"]
)
def test_the_transformer_formula_counts_what_diffusers_builds(config: dict[str, Any]) -> None:
    with torch.device("meta"):  # FULL's 11.9 B parameters, without a byte of memory
        model = FluxTransformer2DModel(**config)
    counted = mp.transformer_params(config)
    assert counted.total == _count(model)
    assert counted.all.matrices == sum(layer.weight.numel() for layer in _linears(model))
    assert counted.double_block.total == _count(model.transformer_blocks[0])
    assert counted.single_block.total == _count(model.single_transformer_blocks[0])
    assert counted.blocks.total == _count(model.transformer_blocks) + _count(model.single_transformer_blocks)
    assert counted.largest_layer == _leaf_params(model)
    assert counted.largest_matrix == max(layer.weight.numel() for layer in _linears(model))
    assert counted.hidden_size == model.inner_dim


def test_the_full_transformer_is_flux_schnells_11_9_billion_parameters() -> None:
    assert FLUX_SCHNELL.transformer.total == 11_891_178_560
    assert FLUX_SCHNELL.transformer.total == mp.transformer_params(FULL.transformer).total
    # bf16: 23.8 GB, the figure the issue starts from.
    assert mp.transformer_bytes(FLUX_SCHNELL, "none") == 2 * 11_891_178_560


@pytest.mark.parametrize("spec", [TINY, FULL], ids=["tiny", "full"])
def test_the_other_components_formulas_count_what_the_libraries_build(spec: Any) -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(**spec.vae)
        siglip = SiglipVisionModel(SiglipVisionConfig(**spec.siglip))
        embedder = ReduxImageEncoder(**spec.embedder)
    assert mp.vae_params(spec.vae) == _count(vae)
    assert mp.siglip_vision_params(spec.siglip) == _count(siglip)
    assert mp.redux_embedder_params(spec.embedder) == _count(embedder)
    # The decoder's widest map at full resolution: the last upsampler's output.
    assert (
        mp.vae_full_resolution_channels(spec.vae) == vae.decoder.up_blocks[-2].upsamplers[0].conv.out_channels
    )


def test_the_vae_formula_follows_the_quant_convs() -> None:
    config = {**TINY.vae, "use_quant_conv": True, "use_post_quant_conv": True}
    with torch.device("meta"):
        assert mp.vae_params(config) == _count(AutoencoderKL(**config))


def test_the_text_encoder_formulas_count_what_transformers_builds() -> None:
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**mp.T5_XXL_ENCODER, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(**mp.CLIP_L_TEXT))
    counted = mp.t5_encoder_params(mp.T5_XXL_ENCODER)
    assert counted.total == _count(t5) == 4_762_310_656
    assert counted.matrices == sum(layer.weight.numel() for layer in _linears(t5))
    assert mp.clip_text_params(mp.CLIP_L_TEXT) == _count(clip) == 123_060_480


def test_the_copied_configs_are_fulls() -> None:
    """memory_profiles cannot import architecture (torch): its copy must not drift."""
    for copy, full in [
        (mp.SCHNELL_TRANSFORMER, FULL.transformer),
        (mp.SCHNELL_VAE, FULL.vae),
        (mp.SIGLIP_SO400M, FULL.siglip),
        (mp.REDUX_EMBEDDER, FULL.embedder),
    ]:
        assert {key: full[key] for key in copy} == copy


def test_constants_shared_with_torch_modules_agree() -> None:
    from fluxredux.pipeline.quantization import FP8_MIN_CAPABILITY
    from fluxredux.schema import MAX_AREA

    assert mp.FP8_MIN_CAPABILITY == FP8_MIN_CAPABILITY
    assert mp.MAX_REQUEST_MEGAPIXELS * mp.PIXELS_PER_MEGAPIXEL == MAX_AREA


# --- the computed needs -----------------------------------------------------------------------


def test_bytes_per_weight_of_each_format() -> None:
    assert pytest.approx(0.5159, abs=1e-4) == mp.NF4_BYTES  # 4 bits + 8-bit absmax / 64 + fp32 / 16384
    assert mp.GGUF_BYTES["Q8_0"] == 34 / 32 and mp.GGUF_BYTES["Q4_K"] == 4.5 / 8
    transformer = FLUX_SCHNELL.transformer
    fp8 = mp.transformer_bytes(FLUX_SCHNELL, "fp8")
    assert fp8 == transformer.all.matrices + 2 * transformer.all.other
    assert mp.transformer_bytes(FLUX_SCHNELL, "int8") == fp8
    # nf4: diffusers publishes ~6.7 GB allocated for a Flux transformer; the weights alone 6.1 GB.
    assert 6.0e9 < mp.transformer_bytes(FLUX_SCHNELL, "nf4") < 6.7e9
    sizes = [mp.transformer_bytes(FLUX_SCHNELL, "gguf", kind) for kind in ("Q8_0", "Q6_K", "Q4_K", "Q2_K")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < mp.transformer_bytes(FLUX_SCHNELL, "none")
    with pytest.raises(ValueError, match="gguf needs a known type"):
        mp.transformer_bytes(FLUX_SCHNELL, "gguf")


def test_needs_fall_along_the_table_so_the_last_is_the_smallest() -> None:
    needs = [needed_bytes(profile) for profile in PROFILES]
    assert needs == sorted(needs, reverse=True)
    assert [round(n / GIB, 1) for n in needs] == [25.5, 14.4, 14.4, 9.0, 7.5, 4.7, 3.3]


def test_a_need_is_its_parts_and_grows_with_the_output() -> None:
    bf16 = PROFILES_BY_NAME["bf16"]
    need = mp.need(bf16)
    prior_vae_transformer = 2 * (FLUX_SCHNELL.prior + FLUX_SCHNELL.vae + FLUX_SCHNELL.transformer.total)
    assert need.weights == prior_vae_transformer
    assert need.activations == mp.vae_decode_bytes(FLUX_SCHNELL, 1.0) == 2 * GIB  # 4 maps x 256 ch x 2 B
    assert need.cache == 256 * 1024**2
    assert needed_bytes(bf16, megapixels=4) - needed_bytes(bf16) == 3 * 2 * GIB
    assert needed_bytes(bf16, conditioning_cache_mb=0) == need.total - need.cache


def test_offloaded_profiles_count_what_stays_on_the_gpu() -> None:
    transformer = FLUX_SCHNELL.transformer
    group = mp.need(PROFILES_BY_NAME["group-offload"])
    resident = (
        FLUX_SCHNELL.prior + FLUX_SCHNELL.vae + transformer.outer.total + 2 * transformer.double_block.total
    )
    assert group.weights == 2 * resident
    sequential = mp.need(PROFILES_BY_NAME["sequential-offload"])
    assert sequential.weights == 2 * (FLUX_SCHNELL.prior + transformer.largest_layer)
    model = mp.need(PROFILES_BY_NAME["nf4-model-offload"])
    assert model.weights == 2 * FLUX_SCHNELL.prior + mp.transformer_bytes(FLUX_SCHNELL, "nf4")


def test_gguf_types_from_file_names() -> None:
    assert mp.gguf_type_from_name("flux1-schnell-Q4_K_S.gguf") == "Q4_K"
    assert mp.gguf_type_from_name("flux1-schnell-Q8_0.gguf") == "Q8_0"
    assert mp.gguf_type_from_name("flux1-schnell-F16.gguf") == "F16"
    assert mp.gguf_type_from_name("flux1-schnell.gguf") is None
    profile = mp.gguf_profile("Q4_K")
    assert needed_bytes(profile, gguf_type="Q4_K") < needed_bytes(PROFILES_BY_NAME["nf4"]) * 1.1


# --- auto's choice ------------------------------------------------------------------------------


def _gpu(name: str, total_gib: float, free_gib: float, capability: tuple[int, int]) -> DeviceReport:
    return DeviceReport(name, round(total_gib * GIB), round(free_gib * GIB), capability)


# Free memory as an idle card of each size shows it (the total less the driver's and the
# CUDA context's share).
FAKE_GPUS = [
    (_gpu("NVIDIA H100 80GB HBM3", 79.2, 78.6, (9, 0)), "bf16"),
    (_gpu("NVIDIA GeForce RTX 4090", 23.6, 23.0, (8, 9)), "fp8"),
    (_gpu("NVIDIA GeForce RTX 3090", 24.0, 23.4, (8, 6)), "int8"),
    (_gpu("NVIDIA GeForce RTX 4080", 16.0, 15.4, (8, 9)), "nf4"),
    (_gpu("NVIDIA GeForce RTX 3060", 12.0, 11.5, (8, 6)), "nf4"),
    (_gpu("NVIDIA GeForce RTX 3080", 10.0, 9.5, (8, 6)), "nf4-model-offload"),
    (_gpu("NVIDIA GeForce RTX 3070", 8.0, 7.4, (8, 6)), "group-offload"),
    (_gpu("NVIDIA GeForce GTX 1650", 4.0, 3.6, (7, 5)), "sequential-offload"),
]


@pytest.mark.parametrize(("device", "expected"), FAKE_GPUS, ids=[d.name for d, _ in FAKE_GPUS])
def test_auto_picks_the_fastest_profile_that_fits(device: DeviceReport, expected: str) -> None:
    choice = choose_profile(device)
    assert choice.profile.name == expected
    assert choice.how == "auto" and choice.free_bytes == device.free_bytes
    assert choice.needed_bytes == needed_bytes(choice.profile)
    assert f"{device.free_bytes / GIB:.1f} GiB free" in choice.reason and "computed" in choice.reason
    if expected == "sequential-offload":  # 3.3 GiB + the 1 GiB margin: more than 3.6 free
        assert "nothing fits" in choice.reason
        assert choice.needed_bytes < device.free_bytes
    else:
        assert choice.needed_bytes + margin_bytes(choice.needed_bytes) <= device.free_bytes
        # Every faster profile either did not fit or the device lacks what it needs.
        for faster in PROFILES[: PROFILES.index(choice.profile)]:
            assert not mp.fits(faster, device, needed_bytes(faster))
            assert faster.name in choice.reason


def test_fp8_needs_compute_capability_8_9() -> None:
    ampere = _gpu("NVIDIA A100-SXM4-40GB", 40.0, 39.4, (8, 0))
    choice = choose_profile(ampere)
    assert choice.profile.name == "bf16"  # bf16 fits 40 GB: fp8 is not even considered
    small_ampere = _gpu("NVIDIA A10", 22.0, 21.5, (8, 6))
    choice = choose_profile(small_ampere)
    assert choice.profile.name == "int8"
    assert "fp8 needs compute capability 8.9+ (this GPU: 8.6)" in choice.reason


def test_a_requested_profile_wins_and_says_when_it_may_not_fit() -> None:
    small = _gpu("NVIDIA GeForce RTX 3060", 12.0, 11.5, (8, 6))
    choice = choose_profile(small, requested="bf16")
    assert (choice.profile.name, choice.how) == ("bf16", "requested")
    assert "may not fit" in choice.reason
    assert "compute capability 8.9+" in choose_profile(small, requested="fp8").reason
    roomy = choose_profile(small, requested="sequential-offload")
    assert roomy.profile.name == "sequential-offload" and "may not fit" not in roomy.reason
    assert describe_choice(roomy) == "memory profile sequential-offload (requested)"


def test_an_unknown_profile_is_a_clear_error_naming_them_all() -> None:
    with pytest.raises(ValueError) as raised:
        choose_profile(None, requested="tiny")
    message = str(raised.value)
    assert "unknown memory profile 'tiny'" in message
    assert all(name in message for name in ["auto", "manual", *PROFILES_BY_NAME])
    with pytest.raises(ValueError, match="manual"):
        choose_profile(FAKE_GPUS[0][0], requested="manual")  # the caller applies no profile


def test_no_cuda_changes_nothing() -> None:
    for requested in ("auto", "nf4"):
        choice = choose_profile(None, requested=requested)
        assert (choice.profile.quantize, choice.profile.offload) == ("none", "none")
        assert choice.profile.name == "bf16" and choice.how == "no_cuda"
        assert choice.reason == "no CUDA GPU: profiles apply to CUDA only"
        assert describe_choice(choice) == "no memory profile (no CUDA GPU)"


def test_describe_choice_is_one_short_line() -> None:
    choice = choose_profile(_gpu("NVIDIA GeForce RTX 3060", 12.0, 11.2, (8, 6)))
    assert describe_choice(choice) == "memory profile nf4 (auto: 11.2 GiB free)"


# --- devices -------------------------------------------------------------------------------------


def test_no_cuda_device_here_and_the_driver_facts_never_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():  # on a GPU machine the driver facts are checked alone
        assert devices_module.cuda_devices() == []
    monkeypatch.setenv("PATH", "/nonexistent")
    facts = devices_module.driver_facts()
    assert facts["torch"] == torch.__version__
    assert facts["driver"] == "unknown (nvidia-smi is not on PATH)"


def _fake_nvidia_smi(folder: Path, body: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_the_driver_version_comes_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, "echo 550.54.15; echo 550.54.15")  # one line per GPU
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devices_module.driver_facts()["driver"] == "550.54.15"


def test_a_hung_or_failing_nvidia_smi_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(devices_module, "NVIDIA_SMI_TIMEOUT_SECONDS", 0.5)
    _fake_nvidia_smi(tmp_path, "exec sleep 10")
    assert devices_module.driver_facts()["driver"] == "unknown (nvidia-smi gave no answer in 0.5 s)"
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed because it could not communicate' >&2; exit 9")
    assert devices_module.driver_facts()["driver"].startswith("unknown (nvidia-smi: NVIDIA-SMI has failed")


def test_the_light_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import fluxredux.pipeline.memory_profiles, fluxredux.pipeline.devices, fluxredux.cli.doctor\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- fluxredux doctor ------------------------------------------------------------------------------


def test_doctor_here_says_no_gpu_and_lists_every_profile_with_its_need(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--city96--FLUX.1-schnell-gguf" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "flux1-schnell-Q4_K_S.gguf").write_bytes(b"GGUF" + bytes(60))
    result = run_cli("doctor", cache=tmp_path / "cache", cwd=tmp_path, HF_HUB_CACHE=str(hub))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "no CUDA GPU: the real model needs one; the demo and fake models run here" in text
    assert "auto applies on CUDA GPUs only" in text and "<- auto" not in text
    rows = {line.split("\t")[0]: line.split("\t") for line in text.splitlines() if "\t" in line}
    for profile in PROFILES:
        row = rows[profile.name]
        assert row[1:4] == [profile.quantize, profile.offload, f"{needed_bytes(profile) / GIB:.1f}"]
    assert "gguf-Q4_K" in rows  # the GGUF file found in the cache, with its computed need
    assert "flux1-schnell-Q4_K_S.gguf (Q4_K" in text
    assert "FLUX.1 [schnell]: missing" in text and "FLUX.1 Redux prior: missing" in text
    assert f"{hub}: " in text and "GiB free" in text
    assert "Traceback" not in result.stderr


def test_doctor_marks_what_auto_picks_on_each_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fluxredux.cli import app

    gpus = [FAKE_GPUS[1][0], FAKE_GPUS[4][0]]  # a 4090 and a 3060
    monkeypatch.setattr(devices_module, "cuda_devices", lambda: gpus)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "FLUXREDUX_CACHE_DIR": str(tmp_path / "cache")}
    result = CliRunner().invoke(app, ["doctor"], env={**os.environ, **env})
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line.split("\t") for line in result.output.splitlines() if "\t" in line}
    assert rows["profile"][5:7] == ["GPU 0", "GPU 1"]
    assert rows["fp8"][5:7] == ["fits <- auto", "compute capability 8.9+ needed"]
    assert rows["nf4"][5:7] == ["fits", "fits <- auto"]
    assert rows["bf16"][5:7] == ["too big", "too big"]
    assert "GPU 0: auto picks fp8: 23.0 GiB free: fp8 needs 14.4 GiB (computed)" in result.output
    assert "GPU 1: auto picks nf4: 11.5 GiB free" in result.output


def test_doctor_names_a_bad_memory_profile_setting_and_still_exits_0(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fluxredux.cli import app

    monkeypatch.setattr(devices_module, "cuda_devices", list)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "FLUXREDUX_MEMORY_PROFILE": "tiny"}
    result = CliRunner().invoke(app, ["doctor"], env={**os.environ, **env})
    assert result.exit_code == 0, result.output
    assert "memory_profile: unknown memory profile 'tiny': use auto, manual or one of bf16," in result.output

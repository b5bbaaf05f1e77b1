"""--quantize gguf: FLUX.1 [schnell]'s transformer from one GGUF checkpoint, as city96's.

On the demo model (tiny random weights: outputs are noise, so the tests compare numbers,
never looks): its transformer written as a real Q8_0 GGUF file in BFL's layout
(tests/gguf_files.py), read back through ``load_gguf_transformer``, the loader the model
uses. The BFL <-> diffusers renaming on both sides is checked against diffusers' own
converter at the real model's width, which the demo model cannot have.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter
from PIL import Image

from fluxredux.cli.download import GGUF_LEVELS, GGUF_REPO, gguf_file
from fluxredux.errors import ModelUnavailable, WeightsNotFound
from fluxredux.pipeline.architecture import FULL, TINY
from fluxredux.pipeline.demo import DemoModelPaths, demo_model_paths
from fluxredux.pipeline.gguf import bfl_to_diffusers, load_gguf_transformer, resolve_transformer_file
from tests.gguf_files import bfl_state_dict, write_gguf

CPU = torch.device("cpu")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


@pytest.fixture(scope="module")
def paths(model_cache_dir: Path) -> DemoModelPaths:
    return demo_model_paths(model_cache_dir)


@pytest.fixture(scope="module")
def float_transformer(paths: DemoModelPaths) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(
        paths.schnell, subfolder="transformer", local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def q8_file(float_transformer: FluxTransformer2DModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(float_transformer, tmp_path_factory.mktemp("gguf") / "flux1-schnell-demo-Q8_0.gguf")


@pytest.fixture(scope="module")
def gguf_transformer(q8_file: Path, paths: DemoModelPaths) -> FluxTransformer2DModel:
    return load_gguf_transformer(q8_file, paths.schnell, torch.float32)


def inputs(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """One denoising step's inputs for a 4x4-token image and 8 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.75]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(8, 3),
    }


@torch.inference_mode()
def forward(transformer: FluxTransformer2DModel, seed: int = 0) -> torch.Tensor:
    output: torch.Tensor = transformer(**inputs(transformer.config, seed), return_dict=False)[0]
    return output


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# --- what loads -------------------------------------------------------------------------


def test_the_file_holds_bfl_tensors_quantized_as_city96s(q8_file: Path) -> None:
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q8_file).tensors}
    # BFL's fused names, not diffusers' split ones.
    assert tensors["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert tensors["single_blocks.0.linear1.weight"] == "Q8_0"
    assert not any(name.startswith(BLOCKS) or ".to_q." in name for name in tensors)
    # Biases, norm scales and the input/output layers stay in F32, as in city96's files.
    assert tensors["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert tensors["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"
    assert tensors["img_in.weight"] == tensors["final_layer.linear.weight"] == "F32"


def test_a_q8_0_file_loads_quantized_and_smaller(
    q8_file: Path,
    paths: DemoModelPaths,
    float_transformer: FluxTransformer2DModel,
    gguf_transformer: FluxTransformer2DModel,
) -> None:
    params = dict(gguf_transformer.named_parameters())
    quantized = {name for name, p in params.items() if isinstance(p, GGUFParameter)}
    # Every block's linear weight stays quantized in memory (GGUFLinear dequantises it as it
    # runs); the rest is plain float32.
    assert quantized == {name for name, p in params.items() if name.startswith(BLOCKS) and p.dim() == 2}
    assert {params[name].quant_type for name in quantized} == {gguf.GGMLQuantizationType.Q8_0}
    assert {p.dtype for name, p in params.items() if name not in quantized} == {torch.float32}
    assert set(params) == set(dict(float_transformer.named_parameters()))
    # Q8_0 is 34 bytes a block of 32 weights; the demo's F32 embedders keep the total at
    # about half, not a quarter (the real model's blocks are over 99% of its weights).
    assert nbytes(gguf_transformer) < 0.6 * nbytes(float_transformer)
    (safetensors,) = (paths.schnell / "transformer").glob("*.safetensors")
    assert q8_file.stat().st_size < 0.6 * safetensors.stat().st_size


def test_one_step_is_close_to_the_float_transformers(
    float_transformer: FluxTransformer2DModel, gguf_transformer: FluxTransformer2DModel
) -> None:
    """Q8_0 stores each block of 32 weights as int8 steps of max|w|/127: each weight is off
    by at most half a step, about 0.5% of a weight's size in RMS. The output's relative
    error is of that order or below (independent errors add in quadrature), so 1% is a
    bound with room; a wrong split, swapped shift/scale or transposed weight is off by
    ~100%. Measured: 4e-4."""
    expected, got = forward(float_transformer), forward(gguf_transformer)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 0 < relative < 1e-2  # not 0: the weights really went through Q8_0
    assert (got - expected).abs().max().item() < 1e-2 * expected.abs().max().item()


def test_the_same_inputs_twice_give_the_same_bits(gguf_transformer: FluxTransformer2DModel) -> None:
    assert torch.equal(forward(gguf_transformer, seed=3), forward(gguf_transformer, seed=3))
    assert not torch.equal(forward(gguf_transformer, seed=3), forward(gguf_transformer, seed=4))


def test_a_whole_generation_is_within_a_level_of_the_float_models(
    q8_file: Path, paths: DemoModelPaths, reference_image: Image.Image
) -> None:
    """The real loading path (``ReduxModel.load`` with quantize=gguf), four steps: the
    per-step error above is far below one 8-bit level, so images may differ only where
    rounding flips a pixel, by one level (allowed: 2). Measured: max 1, mean 0.01."""
    from fluxredux.pipeline.protocol import GenerationRequest
    from fluxredux.pipeline.redux_model import ReduxModel
    from fluxredux.pipeline.speed import Tuning

    tuning = Tuning(quantize="gguf", transformer_file=str(q8_file))
    quantized = ReduxModel.load(str(paths.schnell), str(paths.redux), kind="demo", device=CPU, tuning=tuning)
    plain = ReduxModel.load(str(paths.schnell), str(paths.redux), kind="demo", device=CPU)
    request = GenerationRequest(
        references=[(reference_image, 1.0)],
        width=256,
        height=256,
        num_outputs=1,
        num_inference_steps=4,
        seed=5,
    )
    (got,) = quantized.generate(request).images
    (again,) = quantized.generate(request).images
    (expected,) = plain.generate(request).images
    assert np.array_equal(got, again)
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.1
    assert "quantize gguf" in quantized.info.describe()


# --- the names: the same as diffusers' converter at the real width ----------------------


def test_the_renaming_both_ways_is_diffusers_at_the_real_width() -> None:
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes FLUX's
    width (3072), so it cannot read the demo's files; at that width, on a real-shaped
    checkpoint (2 + 2 blocks, weights cut to 2 columns: the splits are along the rows),
    the test writer's BFL file is what it reads, and the loader's renaming is what it does."""
    config = {**FULL.transformer, "num_layers": 2, "num_single_layers": 2}
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in FluxTransformer2DModel(**config).state_dict().items()}
    thin = {n: shape[:1] + (2,) * (len(shape) - 1) for n, shape in shapes.items()}
    generator = torch.Generator().manual_seed(0)
    ours = {n: torch.randn(shape, generator=generator) for n, shape in thin.items()}

    bfl = bfl_state_dict(ours)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    left = dict(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(left, config=config)
    assert not left  # diffusers took every tensor the writer wrote
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[n], ours[n]) for n in ours)

    loaded = bfl_to_diffusers(dict(bfl), config, thin)
    assert set(loaded) == set(ours)
    assert all(torch.equal(loaded[n], theirs[n]) for n in ours)


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"attention_head_dim": 32, "axes_dims_rope": [8, 12, 12]}, "rows"),  # twice as wide
        ({"num_layers": 2}, "tensors this model has not"),  # one more double block
        ({"guidance_embeds": True}, "[dev]"),  # FLUX.1 [dev]'s guidance embedder
    ],
    ids=["wider", "deeper", "dev"],
)
def test_a_gguf_of_another_flux_is_refused(
    tmp_path: Path, paths: DemoModelPaths, change: dict[str, Any], said: str
) -> None:
    torch.manual_seed(0)
    other = FluxTransformer2DModel(**{**TINY.transformer, **change}).eval()
    file = write_gguf(other, tmp_path / "other.gguf")
    with pytest.raises(ModelUnavailable) as info:
        load_gguf_transformer(file, paths.schnell, torch.float32)
    message = info.value.message
    assert message.startswith(f"--transformer-file {file} is not a GGUF of this FLUX.1 [schnell]")
    assert said in message and "fluxredux download --gguf Q8_0" in message and "\n" not in message


def test_a_gguf_of_another_model_is_refused(tmp_path: Path, paths: DemoModelPaths) -> None:
    file = tmp_path / "llm.gguf"
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    writer.write_header_to_file(path=file)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelUnavailable, match=r"^--transformer-file .*: it has no time_in\.in_layer\.weight"
    ):
        load_gguf_transformer(file, paths.schnell, torch.float32)


def test_a_file_that_is_no_gguf_is_refused(tmp_path: Path, paths: DemoModelPaths, q8_file: Path) -> None:
    (safetensors,) = (paths.schnell / "transformer").glob("*.safetensors")  # the right model, not GGUF
    with pytest.raises(ModelUnavailable, match=r"^--transformer-file .* is not a GGUF file"):
        load_gguf_transformer(safetensors, paths.schnell, torch.float32)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(q8_file.read_bytes()[:2000])
    with pytest.raises(ModelUnavailable, match=r"^--transformer-file .* could not be read as GGUF"):
        load_gguf_transformer(truncated, paths.schnell, torch.float32)


def test_without_the_gguf_package_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, q8_file: Path, paths: DemoModelPaths
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelUnavailable) as info:
        load_gguf_transformer(q8_file, paths.schnell, torch.float32)
    assert "--transformer-file" in info.value.message
    assert "pip install 'fluxredux[gguf]'" in info.value.message


# --- --transformer-file: where the file is -----------------------------------------------


def fake_hub_cache(root: Path, repo_id: str, filename: str, content: bytes) -> Path:
    """A file in the Hugging Face cache's own layout, as ``hf_hub_download`` leaves it."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    file = repo / "snapshots" / commit / filename
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    return file


def test_a_local_file_or_a_cached_hub_file_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    assert resolve_transformer_file(str(local)) == local
    cache = tmp_path / "hub"
    _, filename = gguf_file("Q8_0")
    cached = fake_hub_cache(cache, GGUF_REPO, filename, b"GGUF")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    # What `fluxredux download --gguf Q8_0` prints to pass as --transformer-file.
    assert resolve_transformer_file(f"{GGUF_REPO}/{filename}") == cached


def test_a_missing_file_names_the_flag_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    with pytest.raises(WeightsNotFound) as info:
        resolve_transformer_file(str(tmp_path / "nowhere.gguf"))
    message = info.value.message
    assert message.startswith(f"--transformer-file {tmp_path / 'nowhere.gguf'}: no file at")
    assert "fluxredux download --gguf Q8_0" in message
    with pytest.raises(WeightsNotFound, match="is a folder"):
        resolve_transformer_file(str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFound) as info:
        resolve_transformer_file("city96/FLUX.1-schnell-gguf/flux1-schnell-Q4_K_S.gguf")
    assert (
        "not in the Hugging Face cache" in info.value.message
        and str(tmp_path / "empty") in info.value.message
    )
    assert "fluxredux download --gguf Q8_0" in info.value.message


# --- fluxredux download --gguf LEVEL ------------------------------------------------------


def test_each_level_is_city96s_file() -> None:
    assert gguf_file("Q8_0") == ("city96/FLUX.1-schnell-gguf", "flux1-schnell-Q8_0.gguf")
    assert gguf_file("q4_k_s") == ("city96/FLUX.1-schnell-gguf", "flux1-schnell-Q4_K_S.gguf")
    # Every level is one diffusers can dequantise (its name's quant type, K-quants by family).
    supported = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES}
    assert {level.removesuffix("_S") for level in GGUF_LEVELS} <= supported


def test_download_gguf_fetches_the_file_and_prints_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import fluxredux.cli.download
    from fluxredux.cli import app

    fetched: list[str] = []
    monkeypatch.setattr(
        fluxredux.cli.download, "download_weights", lambda spec, repo, token=None: Path(f"/hub/{repo}")
    )
    monkeypatch.setattr(
        fluxredux.cli.download,
        "download_gguf",
        lambda repo, name, token=None: fetched.append(f"{repo}/{name}") or Path(f"/hub/{name}"),
    )
    runner = CliRunner()
    result = runner.invoke(app, ["download", "--gguf", "Q5_K_S"])
    assert result.exit_code == 0, result.output
    assert fetched == ["city96/FLUX.1-schnell-gguf/flux1-schnell-Q5_K_S.gguf"]
    assert "FLUX.1 [schnell]: /hub/black-forest-labs/FLUX.1-schnell" in result.stdout
    assert "GGUF transformer: /hub/flux1-schnell-Q5_K_S.gguf" in result.stdout
    assert (
        "--quantize gguf --transformer-file city96/FLUX.1-schnell-gguf/flux1-schnell-Q5_K_S.gguf"
        in result.stdout
    )

    result = runner.invoke(app, ["download", "--gguf", "Q9_9"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "--gguf Q9_9: no such level" in result.stderr and "Q8_0" in result.stderr
    assert "Traceback" not in result.output
    assert fetched == ["city96/FLUX.1-schnell-gguf/flux1-schnell-Q5_K_S.gguf"]  # nothing more fetched

"""Finding the weights: local folders, the Hugging Face cache, and the error when absent."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest

from fluxredux.errors import WeightsNotFound
from fluxredux.pipeline.weights import REDUX, SCHNELL, TEXT_ENCODERS, WeightsSpec, resolve_weights

# File listings of the real hub repos (names only), to check what `download` fetches.
SCHNELL_REPO_FILES = [
    ".gitattributes", "README.md", "LICENSE.md", "schnell_grid.jpeg", "ae.safetensors",
    "flux1-schnell.safetensors", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip
REDUX_REPO_FILES = [
    ".gitattributes", "README.md", "LICENSE.md", "flux1-redux-dev.safetensors", "model_index.json",
    "feature_extractor/preprocessor_config.json", "image_embedder/config.json",
    "image_embedder/diffusion_pytorch_model.safetensors", "image_encoder/config.json",
    "image_encoder/model.safetensors",
]  # fmt: skip


def selected(spec: WeightsSpec, files: list[str]) -> set[str]:
    return {f for f in files if any(fnmatch.fnmatch(f, p) for p in spec.allow_patterns)}


def test_download_fetches_only_the_diffusers_files_we_load() -> None:
    chosen = selected(SCHNELL, SCHNELL_REPO_FILES)
    assert not any(f.startswith(("text_encoder", "tokenizer")) for f in chosen)
    assert "flux1-schnell.safetensors" not in chosen and "ae.safetensors" not in chosen
    assert {f for f in SCHNELL_REPO_FILES if f.startswith(("transformer/", "vae/", "scheduler/"))} <= chosen
    assert selected(REDUX, REDUX_REPO_FILES) == {
        "model_index.json", "feature_extractor/preprocessor_config.json", "image_embedder/config.json",
        "image_embedder/diffusion_pytorch_model.safetensors", "image_encoder/config.json",
        "image_encoder/model.safetensors",
    }  # fmt: skip


def test_the_text_encoders_are_fetched_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import fluxredux.cli.download
    from fluxredux.cli import app

    assert selected(TEXT_ENCODERS, SCHNELL_REPO_FILES) == {
        f for f in SCHNELL_REPO_FILES if f.startswith(("text_encoder", "tokenizer"))
    }
    fetched: list[tuple[str, str]] = []
    monkeypatch.setattr(
        fluxredux.cli.download,
        "download_weights",
        lambda spec, repo, token=None: fetched.append((spec.title, repo)) or Path("/nowhere"),
    )
    runner = CliRunner()
    assert runner.invoke(app, ["download"]).exit_code == 0
    assert [title for title, _ in fetched] == [REDUX.title, SCHNELL.title]
    fetched.clear()
    assert runner.invoke(app, ["download", "--with-text-encoders"]).exit_code == 0
    assert fetched[-1] == (TEXT_ENCODERS.title, SCHNELL.default_repo)
    help_text = runner.invoke(app, ["download", "--help"], env={"COLUMNS": "200"}).output
    assert "--with-text-encoders" in help_text and "9.8 GB" in help_text


def assert_helpful(error: WeightsNotFound) -> None:
    assert "fluxredux download" in error.message
    assert "gated" in error.message and "Non-Commercial" in error.message
    assert "--model demo" in error.message


def test_a_missing_local_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(str(tmp_path / "nowhere"), SCHNELL)
    assert str(tmp_path / "nowhere") in info.value.message
    assert_helpful(info.value)


def test_an_incomplete_folder_lists_what_is_missing(tmp_path: Path, model_cache_dir: Path) -> None:
    from fluxredux.pipeline.demo import demo_model_paths

    copy = tmp_path / "schnell"
    shutil.copytree(demo_model_paths(model_cache_dir).schnell, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (copy / "transformer" / "config.json").unlink()
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(str(copy), SCHNELL)
    assert info.value.detail["missing"] == ["transformer/config.json", "vae/*.safetensors"]
    assert_helpful(info.value)


def test_a_complete_folder_resolves(model_cache_dir: Path) -> None:
    from fluxredux.pipeline.demo import demo_model_paths

    paths = demo_model_paths(model_cache_dir)
    assert resolve_weights(str(paths.redux), REDUX) == paths.redux


def test_a_repo_missing_from_the_cache_is_reported_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights("black-forest-labs/FLUX.1-Redux-dev", REDUX)
    assert "'black-forest-labs/FLUX.1-Redux-dev' is not in the Hugging Face cache" in info.value.message
    assert info.value.message.startswith("FLUX.1 Redux prior weights not found")
    assert_helpful(info.value)


def test_with_a_gguf_the_bf16_transformer_is_neither_fetched_nor_needed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--quantize gguf reads the transformer's weights from the GGUF file: of the diffusers
    folder only its config is fetched (23 GB less) and required."""
    from typer.testing import CliRunner

    import fluxredux.cli.download
    from fluxredux.cli import app
    from fluxredux.pipeline.weights import SCHNELL_FOR_GGUF

    chosen = selected(SCHNELL_FOR_GGUF, SCHNELL_REPO_FILES)
    assert "transformer/config.json" in chosen
    assert not any(f.startswith("transformer/diffusion_pytorch_model") for f in chosen)
    specs: list[str] = []

    def fetch(spec: WeightsSpec, repo: str, token: str | None = None) -> Path:
        specs.append(",".join(spec.allow_patterns))
        return tmp_path

    monkeypatch.setattr(fluxredux.cli.download, "download_weights", fetch)
    monkeypatch.setattr(
        fluxredux.cli.download, "download_gguf", lambda repo, name, token=None: tmp_path / name
    )
    assert CliRunner().invoke(app, ["download", "--gguf", "Q8_0"]).exit_code == 0
    assert (
        ",".join(SCHNELL_FOR_GGUF.allow_patterns) in specs and ",".join(SCHNELL.allow_patterns) not in specs
    )
    # A folder with the transformer's config and no weights of it: enough for gguf only.
    folder = tmp_path / "schnell"
    for name in SCHNELL.required_files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert resolve_weights(str(folder), SCHNELL_FOR_GGUF) == folder
    with pytest.raises(WeightsNotFound, match="transformer"):
        resolve_weights(str(folder), SCHNELL)

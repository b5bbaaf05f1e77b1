"""Where the model weights come from: a local folder or the Hugging Face cache.

Loading never downloads (a surprise 24 GB download on server start is worse than a
clear error); ``fluxredux download`` fetches the weights once, on purpose. This module
imports no torch, so the download command and the error path stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fluxredux.config import REDUX_REPO, SCHNELL_REPO, TAEF1_REPO
from fluxredux.errors import TextEncodersMissing, WeightsNotFound

LICENSE_NOTE = (
    "FLUX.1-Redux-dev is gated on the Hugging Face hub and published under the FLUX.1 [dev] "
    "Non-Commercial License: accept it on https://huggingface.co/black-forest-labs/FLUX.1-Redux-dev "
    "with your account, then make a token available (HF_TOKEN=... or `hf auth login`). "
    "FLUX.1-schnell is Apache-2.0."
)


@dataclass(frozen=True)
class WeightsSpec:
    """One model folder: what to download and what must be there to load it."""

    title: str
    default_repo: str
    allow_patterns: tuple[str, ...]  # diffusers-format files only; no single-file checkpoints
    required_files: tuple[str, ...]
    weight_folders: tuple[str, ...]  # each must hold at least one .safetensors file


SCHNELL = WeightsSpec(
    title="FLUX.1 [schnell]",
    default_repo=SCHNELL_REPO,
    # Text encoders and tokenizers are left out (Redux conditions on the image alone; only
    # the optional prompt needs them: TEXT_ENCODERS below), saving ~9.8 GB. So is the 23 GB
    # single-file checkpoint at the root.
    allow_patterns=("model_index.json", "scheduler/*", "transformer/*", "vae/*"),
    required_files=(
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "vae/config.json",
    ),
    weight_folders=("transformer", "vae"),
)

# FLUX.1 [schnell] for --quantize gguf: the transformer's weights come from the GGUF file,
# so only its config is needed of the diffusers folder (23 GB less to fetch and keep).
SCHNELL_FOR_GGUF = replace(
    SCHNELL,
    allow_patterns=("model_index.json", "scheduler/*", "transformer/config.json", "vae/*"),
    weight_folders=("vae",),
)

# Only a prompt needs them; ``fluxredux download --with-text-encoders`` fetches them.
TEXT_ENCODERS = WeightsSpec(
    title="FLUX.1 [schnell] text encoders",
    default_repo=SCHNELL_REPO,
    allow_patterns=("text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"),
    required_files=(
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer_config.json",
    ),
    weight_folders=("text_encoder", "text_encoder_2"),
)
# What they add to a download, for the messages: T5-XXL (9.5 GB) + CLIP-L (0.25 GB), bf16.
TEXT_ENCODERS_SIZE = "about 9.8 GB"

REDUX = WeightsSpec(
    title="FLUX.1 Redux prior",
    default_repo=REDUX_REPO,
    allow_patterns=("model_index.json", "image_encoder/*", "feature_extractor/*", "image_embedder/*"),
    required_files=(
        "image_encoder/config.json",
        "feature_extractor/preprocessor_config.json",
        "image_embedder/config.json",
    ),
    weight_folders=("image_encoder", "image_embedder"),
)

# TAEF1, the tiny autoencoder of step previews (input preview): MIT, about 10 MB.
PREVIEWS = WeightsSpec(
    title="TAEF1 (step previews)",
    default_repo=TAEF1_REPO,
    allow_patterns=("config.json", "*.safetensors"),
    required_files=("config.json",),
    weight_folders=(),
)


def resolve_weights(ref: str, spec: WeightsSpec) -> Path:
    """The local folder holding ``spec``'s files for ``ref`` (a folder or a repo id)."""
    path = _local_folder(ref)
    if path is None:
        path = _cached_snapshot(ref, spec)
    missing = missing_files(path, spec)
    if missing:
        raise _not_found(
            ref, spec, f"{path} is missing {', '.join(missing)}", looked_in=str(path), missing=missing
        )
    return path


def resolve_text_encoders(ref: str) -> Path:
    """The local folder holding FLUX.1 [schnell]'s text encoders and tokenizers for ``ref``
    (the schnell folder or repo id), or TextEncodersMissing saying where it looked."""
    try:
        path = _local_folder(ref)
        if path is None:
            path = _cached_snapshot(ref, TEXT_ENCODERS)
    except WeightsNotFound as exc:  # the folder, or the repo in the cache, is gone
        looked_in = str(exc.detail.get("looked_in", ref))
        raise _text_encoders_missing(ref, f"nothing of {ref} in {looked_in}", looked_in, []) from exc
    missing = missing_files(path, TEXT_ENCODERS)
    if missing:
        raise _text_encoders_missing(ref, f"{path} is missing {', '.join(missing)}", str(path), missing)
    return path


def _text_encoders_missing(ref: str, what: str, looked_in: str, missing: list[str]) -> TextEncodersMissing:
    return TextEncodersMissing(
        f"A prompt needs the FLUX.1 [schnell] text encoders, which are not on this machine: {what}. "
        f"Fetch them with `fluxredux download --with-text-encoders` ({TEXT_ENCODERS_SIZE} more: "
        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ of FLUX.1-schnell, Apache-2.0), or put "
        "those folders into FLUXREDUX_SCHNELL_MODEL's folder. Requests without a prompt do not need them.",
        model=ref,
        looked_in=looked_in,
        missing=missing,
    )


def missing_files(folder: Path, spec: WeightsSpec) -> list[str]:
    missing = [name for name in spec.required_files if not (folder / name).is_file()]
    for sub in spec.weight_folders:
        if not any((folder / sub).glob("*.safetensors")):
            missing.append(f"{sub}/*.safetensors")
    return missing


def _local_folder(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") != 1:
        # Clearly a path (a repo id is exactly "owner/name"), and it is not there.
        raise _not_found(ref, _spec_for_message(ref), f"no folder at {path}", looked_in=str(path))
    return None


def _spec_for_message(ref: str) -> WeightsSpec:
    return REDUX if "redux" in ref.lower() else SCHNELL


def _cached_snapshot(repo_id: str, spec: WeightsSpec) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, local_files_only=True, allow_patterns=list(spec.allow_patterns))
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise _not_found(
            repo_id,
            spec,
            f"'{repo_id}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE})",
            looked_in=constants.HF_HUB_CACHE,
        ) from exc


def _not_found(ref: str, spec: WeightsSpec, what: str, **detail: object) -> WeightsNotFound:
    message = (
        f"{spec.title} weights not found: {what}. "
        "Get the weights with `fluxredux download` (about 24 GB; only the diffusers-format files "
        f"are fetched), or point FLUXREDUX_{'REDUX' if spec is REDUX else 'SCHNELL'}_MODEL at a local "
        f"diffusers folder. {LICENSE_NOTE} To try the service without weights, use --model demo "
        "(random weights: the outputs are noise)."
    )
    return WeightsNotFound(message, model=ref, **detail)


def download_weights(spec: WeightsSpec, repo_id: str, token: str | None = None) -> Path:
    """Fetch ``spec``'s files into the Hugging Face cache, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(spec.allow_patterns), token=token))
    except GatedRepoError as exc:
        raise WeightsNotFound(
            f"{repo_id} is gated and this account has not been granted access. {LICENSE_NOTE}",
            model=repo_id,
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsNotFound(
            f"{repo_id} was not found on the Hugging Face hub (or needs a token). {LICENSE_NOTE}",
            model=repo_id,
        ) from exc

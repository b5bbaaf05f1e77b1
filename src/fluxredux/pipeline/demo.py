"""The demo model: a tiny random-weight FLUX.1 Redux [schnell], written to disk in the
real diffusers layout and then loaded back through the real loader.

It runs on any machine in well under a second per image, so the whole service (and the
real loading code) can be exercised without a GPU or a 24 GB download. Its weights are
random: the images it makes are noise, and everything that shows them says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxPriorReduxPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fluxredux.pipeline.architecture import TINY, build_random_components, quiet_library_progress

log = logging.getLogger(__name__)

DEMO_NOTICE = "demo model: random weights, outputs are noise"
# Bump when the demo architecture changes, so stale copies in caches are rebuilt.
DEMO_VERSION = "v2"  # v2: tokenizers that read letters, with the real model_max_length
DEMO_SEED = 1234


@dataclass(frozen=True)
class DemoModelPaths:
    schnell: Path
    redux: Path


def demo_model_paths(cache_dir: Path) -> DemoModelPaths:
    root = Path(cache_dir) / f"demo-model-{DEMO_VERSION}"
    return DemoModelPaths(schnell=root / "FLUX.1-schnell", redux=root / "FLUX.1-Redux-dev")


def ensure_demo_model(cache_dir: Path) -> DemoModelPaths:
    """Write the demo model under ``cache_dir`` unless it is there already.

    Written to a temporary folder and renamed into place, so a crash or a concurrent
    writer never leaves a half-written model behind.
    """
    paths = demo_model_paths(cache_dir)
    if _written_once(paths.schnell.parent, write_demo_model):
        log.info("wrote the demo model to %s", paths.schnell.parent)
    return paths


def _written_once(folder: Path, write: Callable[[Path], object]) -> bool:
    """``write`` into a temporary folder beside ``folder``, then renamed into place, unless
    it is there already (False): a crash or a concurrent writer never leaves half a model."""
    if folder.is_dir():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # lost a race to another writer: theirs is identical
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


# The demo's TAEF1 (step previews): tiny and random too, apart from the demo model so that
# adding it rebuilt no cached demo model. Its own version for the same reason.
DEMO_PREVIEWS_VERSION = "v1"


def ensure_demo_previews(cache_dir: Path) -> Path:
    """A tiny random TAEF1 (``AutoencoderTiny`` with FLUX's 16 latent channels and 8x
    upscale), written once under ``cache_dir`` in the diffusers layout; its folder."""
    from diffusers import AutoencoderTiny

    folder = Path(cache_dir) / f"demo-taef1-{DEMO_PREVIEWS_VERSION}"

    def write(staging: Path) -> None:
        torch.manual_seed(DEMO_SEED)
        AutoencoderTiny(
            latent_channels=16,
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        ).save_pretrained(staging)

    _written_once(folder, write)
    return folder


def write_demo_model(root: Path) -> DemoModelPaths:
    """Build the tiny model deterministically and save it in the diffusers layout."""
    with quiet_library_progress():
        return _write_demo_model(root)


def _write_demo_model(root: Path) -> DemoModelPaths:
    parts = build_random_components(TINY, seed=DEMO_SEED)
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = _tiny_text_encoders()
    # Text encoders are saved too, exactly like the real FLUX.1-schnell folder holds
    # them: the loader skips them until a prompt needs them.
    FluxPipeline(
        scheduler=parts.scheduler,
        vae=parts.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=parts.transformer,
    ).save_pretrained(root / "FLUX.1-schnell")
    FluxPriorReduxPipeline(
        image_encoder=parts.image_encoder,
        feature_extractor=parts.feature_extractor,
        image_embedder=parts.image_embedder,
    ).save_pretrained(root / "FLUX.1-Redux-dev")
    (root / "README.txt").write_text(
        f"fluxredux {DEMO_NOTICE}.\nA tiny FLUX.1 Redux [schnell] built from configs for tests and demos.\n"
    )
    return DemoModelPaths(schnell=root / "FLUX.1-schnell", redux=root / "FLUX.1-Redux-dev")


def _tiny_text_encoders() -> tuple[CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast]:
    """CLIP-L and T5 shrunk, with tokenizers that read lower-case letters (one token each),
    so different prompts give different tokens, as with the real vocabularies."""
    torch.manual_seed(DEMO_SEED + 1)
    vocab_size = 64
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TINY.transformer["pooled_projection_dim"],
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            d_model=TINY.transformer["joint_attention_dim"],
            d_ff=37,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            vocab_size=vocab_size,
            decoder_start_token_id=0,
        )
    ).eval()
    # transformers 5 builds tokenizers offline from in-memory vocabularies (the
    # vocab_file= forms would silently build empty ones). model_max_length as the real
    # ones (77 and 512): FLUX pads CLIP's input to it.
    letters = string.ascii_lowercase
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    clip_vocab.update(
        {piece: len(clip_vocab) + i for i, piece in enumerate([*letters, *(c + "</w>" for c in letters)])}
    )
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_tokenizer = T5TokenizerFast(
        vocab=[
            ("<pad>", 0.0),
            ("</s>", 0.0),
            ("<unk>", 0.0),
            ("\u2581", -2.0),
            *((c, -3.0) for c in letters),
        ],
        extra_ids=0,
        model_max_length=512,
    )
    return clip, clip_tokenizer, t5, t5_tokenizer

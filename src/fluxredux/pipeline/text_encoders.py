"""FLUX.1 [schnell]'s text encoders, for the optional prompt: loaded on the worker when a
prompt first needs them, never for a request without one.

What a prompt becomes is what diffusers' ``FluxPipeline.encode_prompt`` computes (and so
``FluxPriorReduxPipeline`` given a prompt): T5's last hidden state over the prompt padded
to 512 tokens takes the place of the 512 zero "text" tokens, and CLIP's pooled output the
place of the zero pooled vector; the Redux image tokens stay appended after the 512 (see
``conditioning.with_text``). 512, not the 256 schnell also allows: the Redux prior pads to
512, so the image tokens sit where the prompt-less path puts them and
``attention_bias`` finds them there. A test compares the result with the prior's.

Where they live. With offload ``none`` on the model's device, beside the transformer
(T5-XXL is 9.1 GiB in bf16); with ``model`` in CPU RAM, moved to the device only while a
prompt is encoded; with ``sequential`` streamed layer by layer by accelerate, as diffusers
does for the other components. ``LazyTextEncoders`` holds them: one load however many
threads ask at once, and, when the setting says ``unload``, freed as soon as the prompt is
encoded, before the denoising that needs the memory.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from fluxredux.config import Offload, TextEncoderQuantization
from fluxredux.pipeline.conditioning import TEXT_SEQUENCE_LENGTH, Conditioning
from fluxredux.pipeline.quantization import nf4_config, quantize_text_encoder

log = logging.getLogger(__name__)


@dataclass
class TextEncoders:
    """CLIP (pooled vector) and T5 (token embeddings) with their tokenizers, placed to run
    on ``device`` as ``offload`` says."""

    clip: CLIPTextModel
    clip_tokenizer: CLIPTokenizer
    t5: T5EncoderModel
    t5_tokenizer: T5TokenizerFast
    device: torch.device
    offload: Offload = "none"

    @torch.inference_mode()
    def encode(self, prompt: str, *, sequence_length: int = TEXT_SEQUENCE_LENGTH) -> Conditioning:
        """The prompt's T5 embeddings (1, ``sequence_length``, d_model) and CLIP's pooled
        output (1, hidden), on ``device``, in the encoders' dtype."""
        with self._on_device():
            return Conditioning(
                prompt_embeds=self._t5_embeddings(prompt, sequence_length),
                pooled_prompt_embeds=self._clip_pooled(prompt),
            )

    def _clip_pooled(self, prompt: str) -> torch.Tensor:
        # As FluxPipeline._get_clip_prompt_embeds: padded to the tokenizer's length (77),
        # longer prompts cut there; the pooled output (the end-of-text token's state).
        ids = self.clip_tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled: torch.Tensor = self.clip(ids.to(self.device), output_hidden_states=False).pooler_output
        return pooled.to(dtype=self.clip.dtype, device=self.device)

    def _t5_embeddings(self, prompt: str, sequence_length: int) -> torch.Tensor:
        # As FluxPipeline._get_t5_prompt_embeds: padded (or cut) to sequence_length tokens.
        ids = self.t5_tokenizer(
            [prompt],
            padding="max_length",
            max_length=sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings: torch.Tensor = self.t5(ids.to(self.device), output_hidden_states=False)[0]
        return embeddings.to(dtype=self.t5.dtype, device=self.device)

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        """With offload ``model``: on the device for the encoding only, then back to CPU RAM."""
        if self.offload != "model":
            yield
            return
        self.clip.to(self.device)
        self.t5.to(self.device)
        try:
            yield
        finally:
            self.clip.to("cpu")
            self.t5.to("cpu")


def load_text_encoders(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    offload: Offload = "none",
    quantize: TextEncoderQuantization = "none",
) -> TextEncoders:
    """The four components from a FLUX.1 [schnell] folder (subfolders text_encoder, tokenizer,
    text_encoder_2, tokenizer_2); never downloads. ``quantize``: T5's weights (CLIP is small)."""
    weights = {"dtype": dtype, "local_files_only": True}
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **weights)
    t5_weights = dict(weights)
    if quantize == "nf4":  # quantised as it loads; int8 after (quantize_text_encoder)
        t5_weights["quantization_config"] = nf4_config(dtype, for_transformers=True)
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **t5_weights)
    quantize_text_encoder(t5, quantize)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    t5_tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True)
    models: list[torch.nn.Module] = [clip, t5]
    for model in models:
        model.eval().requires_grad_(False)
        if offload == "none" and not (model is t5 and quantize == "nf4"):  # nf4 loads onto the GPU
            model.to(device)
        elif offload in ("sequential", "group"):
            # Streamed layer by layer, with group offloading too: the cards that need it
            # cannot hold T5 (9 GiB in bf16) whole beside the rest.
            from accelerate import cpu_offload  # type: ignore[import-untyped]

            cpu_offload(model, execution_device=device)
    return TextEncoders(clip, clip_tokenizer, t5, t5_tokenizer, device=device, offload=offload)


TextEncoderLoader = Callable[[], TextEncoders]


class LazyTextEncoders:
    """The text encoders, loaded by ``load`` when a prompt first needs them.

    Thread-safe: the first prompt loads them, a second arriving meanwhile waits for that
    load instead of starting another. ``keep`` False frees them again after each encoding.
    """

    def __init__(self, load: TextEncoderLoader, *, keep: bool = True) -> None:
        self._load = load
        self.keep = keep
        self._encoders: TextEncoders | None = None
        self._loads = 0
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoders is not None

    @property
    def loads(self) -> int:
        """How many times they were loaded (more than once only when they are not kept)."""
        return self._loads

    def encode(self, prompt: str) -> Conditioning:
        """The prompt's text conditioning; loads the encoders first if they are not loaded."""
        with self._lock:  # held throughout: an unload never pulls them from under an encoding
            if self._encoders is None:
                started = time.perf_counter()
                self._encoders = self._load()
                self._loads += 1
                log.info("text encoders loaded in %.1f s", time.perf_counter() - started)
            try:
                return self._encoders.encode(prompt)
            finally:
                if not self.keep:
                    self._free()

    def unload(self) -> None:
        """Free them now (the next prompt loads them again)."""
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._encoders is None:
            return
        device = self._encoders.device
        self._encoders = None
        gc.collect()  # accelerate's hooks hold cycles: collect them now, not some time later
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back for the denoising that follows
        log.info("text encoders unloaded")

"""Loading FLUX.1 [schnell] + the Redux prior, and generating images with them.

The only module (with its siblings in this package) that imports torch and diffusers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from fluxredux.config import Offload, Settings
from fluxredux.errors import ModelUnavailable, PredictionCancelled, TextEncodersMissing
from fluxredux.pipeline.architecture import ArchitectureSpec, build_random_components, quiet_library_progress
from fluxredux.pipeline.conditioning import (
    Conditioning,
    mix_conditionings,
    redux_strength_bias,
    with_text,
)
from fluxredux.pipeline.conditioning_cache import ConditioningCache, cached_redux_conditioning
from fluxredux.pipeline.demo import DEMO_NOTICE, ensure_demo_model
from fluxredux.pipeline.text_encoders import LazyTextEncoders, TextEncoders, load_text_encoders
from fluxredux.weights import REDUX, SCHNELL, resolve_text_encoders, resolve_weights
from fluxredux.worker.predictor import CancelCheck, ProgressCallback, Reference

log = logging.getLogger(__name__)

ModelKind = Literal["flux", "demo"]


@dataclass(frozen=True)
class ModelInfo:
    kind: ModelKind
    device: str
    dtype: str
    schnell: str
    redux: str
    offload: str = "none"

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    @property
    def notice(self) -> str | None:
        """What every output display must say about this model, if anything."""
        return DEMO_NOTICE if self.is_demo else None

    def describe(self) -> str:
        name = "DEMO model (random weights, outputs are noise)" if self.is_demo else "FLUX.1 Redux [schnell]"
        return f"{name} on {self.device} ({self.dtype}, offload {self.offload})"


@dataclass
class Generation:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    seed: int
    # seconds: prior, denoise, decode (and prompt, when there was one)
    timings: dict[str, float] = field(default_factory=dict)


def choose_model_kind(choice: str, cuda_available: bool) -> ModelKind:
    if choice == "auto":
        return "flux" if cuda_available else "demo"
    if choice in ("flux", "demo"):
        return choice  # type: ignore[return-value]
    raise ModelUnavailable(f"unknown model choice {choice!r}; use auto, flux or demo")


def load_model(settings: Settings) -> ReduxModel:
    """Load the model the settings ask for, saying loudly which one it is."""
    cuda = torch.cuda.is_available()
    kind = choose_model_kind(settings.model, cuda)
    device = torch.device(settings.device or ("cuda" if cuda else "cpu"))
    if kind == "demo":
        paths = ensure_demo_model(settings.cache_dir)
        schnell_ref, redux_ref = str(paths.schnell), str(paths.redux)
        why = "no CUDA GPU found" if settings.model == "auto" else "--model demo"
        log.warning("Using the DEMO model (%s): random weights, outputs are noise.", why)
    else:
        schnell_ref, redux_ref = settings.schnell_model, settings.redux_model
    model = ReduxModel.load(
        schnell_ref,
        redux_ref,
        kind=kind,
        device=device,
        offload=settings.offload,
        conditioning_cache=ConditioningCache.from_megabytes(settings.conditioning_cache_mb),
        keep_text_encoders=settings.text_encoders == "keep",
    )
    log.info("model ready: %s", model.info.describe())
    return model


class ReduxModel:
    """FLUX.1 [schnell] conditioned on reference images through the Redux prior, and on
    an optional prompt through its text encoders (loaded when a prompt first needs them)."""

    def __init__(
        self,
        pipe: FluxPipeline,
        image_encoder: SiglipVisionModel,
        feature_extractor: SiglipImageProcessorPil,
        image_embedder: ReduxImageEncoder,
        info: ModelInfo,
        *,
        conditioning_cache: ConditioningCache | None = None,
        text_encoders: LazyTextEncoders | None = None,
    ) -> None:
        self.pipe = pipe
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.image_embedder = image_embedder
        self.info = info
        # Redux tokens of recent references (None: every reference is encoded anew).
        self.conditioning_cache = conditioning_cache
        # T5 + CLIP for prompts, not loaded yet (None: this model cannot take a prompt).
        self.text_encoders = text_encoders
        self.pipe.set_progress_bar_config(disable=True)  # progress goes through our callback

    @classmethod
    def load(
        cls,
        schnell_ref: str,
        redux_ref: str,
        *,
        kind: ModelKind,
        device: torch.device,
        offload: Offload = "none",
        conditioning_cache: ConditioningCache | None = None,
        keep_text_encoders: bool = True,
    ) -> ReduxModel:
        """Load from local folders or the Hugging Face cache; never downloads.

        Both locations are checked before any weight is read, so missing weights are
        reported within a second, not after minutes of loading the other half. The text
        encoders are not loaded here: the first prompt loads them (from the schnell
        folder, looked up again then, so a later ``download --with-text-encoders`` counts).
        """
        if offload != "none" and device.type != "cuda":
            raise ModelUnavailable(f"offload '{offload}' needs a CUDA device; this one is {device}")
        schnell_dir = resolve_weights(schnell_ref, SCHNELL)
        redux_dir = resolve_weights(redux_ref, REDUX)
        # bf16 on GPUs (the weights' own precision); fp32 on CPUs, where bf16 is ~15x slower.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        log.info("loading %s from %s and %s", kind, schnell_dir, redux_dir)
        with quiet_library_progress():
            pipe, image_encoder, feature_extractor, image_embedder = cls._load_components(
                schnell_dir, redux_dir, dtype
            )
        # The Redux prior is small (0.9 GiB) and runs once per prediction: it stays on the device.
        image_encoder.to(device).eval()
        image_embedder.to(device).eval()
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        info = ModelInfo(
            kind=kind,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            schnell=schnell_ref,
            redux=redux_ref,
            offload=offload,
        )
        load_encoders = functools.partial(
            _load_text_encoders, schnell_ref, dtype=dtype, device=device, offload=offload
        )
        return cls(
            pipe,
            image_encoder,
            feature_extractor,
            image_embedder,
            info,
            conditioning_cache=conditioning_cache,
            text_encoders=LazyTextEncoders(load_encoders, keep=keep_text_encoders),
        )

    @classmethod
    def from_random(
        cls,
        spec: ArchitectureSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        conditioning_cache: ConditioningCache | None = None,
    ) -> ReduxModel:
        """Random weights in memory, nothing on disk: with the FULL spec on a GPU this
        times exactly like the real model (the benchmark's --full-size-random). No text
        encoders: it takes no prompt."""
        parts = build_random_components(spec, seed=seed, device=device, dtype=dtype)
        pipe = FluxPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=parts.transformer,
        )
        info = ModelInfo(
            kind="demo",
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            schnell=f"random:{spec.name}",
            redux=f"random:{spec.name}",
        )
        return cls(
            pipe,
            parts.image_encoder,
            parts.feature_extractor,
            parts.image_embedder,
            info,
            conditioning_cache=conditioning_cache,
        )

    @staticmethod
    def _load_components(
        schnell_dir: Path, redux_dir: Path, dtype: torch.dtype
    ) -> tuple[FluxPipeline, SiglipVisionModel, SiglipImageProcessorPil, ReduxImageEncoder]:
        # Text encoders and tokenizers are passed as None: Redux conditions on the image
        # alone, and not loading T5-XXL saves 9 GiB and ~20 s.
        pipe = FluxPipeline.from_pretrained(
            schnell_dir,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            dtype=dtype,
            local_files_only=True,
        )
        image_encoder = SiglipVisionModel.from_pretrained(
            redux_dir, subfolder="image_encoder", dtype=dtype, local_files_only=True
        )
        feature_extractor = SiglipImageProcessorPil.from_pretrained(
            redux_dir, subfolder="feature_extractor", local_files_only=True
        )
        image_embedder = ReduxImageEncoder.from_pretrained(
            redux_dir, subfolder="image_embedder", dtype=dtype, local_files_only=True
        )
        return pipe, image_encoder, feature_extractor, image_embedder

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipe._execution_device)

    @property
    def text_encoders_loaded(self) -> bool:
        """Whether T5 and CLIP are in memory now (only ever after a prompt)."""
        return self.text_encoders is not None and self.text_encoders.loaded

    def encode_prompt(self, prompt: str) -> Conditioning:
        """The prompt's text conditioning (T5 tokens, CLIP pooled), loading the text
        encoders first if no prompt has loaded them yet."""
        if self.text_encoders is None:
            raise TextEncodersMissing(
                f"{self.info.describe()} was built without text encoders: it cannot take a prompt",
                model=self.info.schnell,
            )
        return self.text_encoders.encode(prompt)

    def conditioning(
        self,
        references: Sequence[Reference],
        prompt: str | None = None,
        *,
        timings: dict[str, float] | None = None,
    ) -> Conditioning:
        """The references mixed by their shares (see ``mix_conditionings``), with the
        prompt's encoding in place of the zero text if there is a prompt (``with_text``).
        Without a prompt the text encoders are never touched. ``timings`` gets the seconds
        of the prior and, with a prompt, of the text encoders."""
        timings = {} if timings is None else timings
        started = time.perf_counter()
        conditioning = mix_conditionings([(self.condition(image), share) for image, share in references])
        timings["prior"] = self._elapsed(started)
        if prompt is not None:
            started = time.perf_counter()
            conditioning = with_text(conditioning, self.encode_prompt(prompt))
            timings["prompt"] = self._elapsed(started)
        return conditioning

    def condition(self, image: Image.Image) -> Conditioning:
        config = self.pipe.transformer.config
        # The same conditioning, bit for bit, with or without a cache; with one, a reference
        # seen lately skips the encoder.
        return cached_redux_conditioning(
            image,
            cache=self.conditioning_cache,
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            image_embedder=self.image_embedder,
            joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=config.pooled_projection_dim,
            device=self.device,
        )

    @torch.inference_mode()
    def generate(
        self,
        references: Sequence[Reference],
        *,
        width: int,
        height: int,
        num_outputs: int,
        num_inference_steps: int,
        seed: int,
        strength: float = 1.0,
        prompt: str | None = None,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> Generation:
        """Generate ``num_outputs`` images as one batch from the references mixed by their
        shares (see ``mix_conditionings``) and the optional ``prompt`` (see ``with_text``);
        ``strength`` < 1 weakens the references' pull (see ``redux_strength_bias``).

        ``is_cancelled`` is checked before the work starts and after every denoising
        step; a cancel raises PredictionCancelled within one step.
        """
        multiple = self.pipe.vae_scale_factor * 2
        if width % multiple or height % multiple:
            # diffusers would silently resize; the size table never needs it.
            raise ValueError(f"width and height must be multiples of {multiple}, got {width}x{height}")
        cancelled = is_cancelled or (lambda: False)
        timings: dict[str, float] = {}

        def raise_if_cancelled() -> None:
            if cancelled():
                raise PredictionCancelled("the prediction was cancelled")

        raise_if_cancelled()
        conditioning = self.conditioning(references, prompt, timings=timings)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, num_inference_steps)
            raise_if_cancelled()
            return {}

        bias = redux_strength_bias(
            conditioning,
            strength,
            image_tokens=(width // multiple) * (height // multiple),
            dtype=self.pipe.transformer.dtype,  # the query's: some attention kernels insist
            device=self.device,
        )

        raise_if_cancelled()
        started = time.perf_counter()
        # The generator lives on the CPU: the same seed gives the same noise on any device.
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = self.pipe(
            prompt_embeds=conditioning.prompt_embeds,
            pooled_prompt_embeds=conditioning.pooled_prompt_embeds,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=0.0,  # schnell is guidance-distilled
            num_images_per_prompt=num_outputs,
            generator=generator,
            output_type="latent",
            callback_on_step_end=step_end,
            joint_attention_kwargs={"attention_mask": bias} if bias is not None else None,
        ).images
        timings["denoise"] = self._elapsed(started)

        raise_if_cancelled()
        started = time.perf_counter()
        images = self.decode(latents, width=width, height=height)
        timings["decode"] = self._elapsed(started)
        return Generation(images=images, seed=seed, timings=timings)

    def decode(self, latents: torch.Tensor, *, width: int, height: int) -> list[np.ndarray]:
        """Packed latents -> uint8 RGB arrays. Quantised on the device, where it is free."""
        vae = self.pipe.vae
        latents = FluxPipeline._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(device=self.device, dtype=vae.dtype), return_dict=False)[0]
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [np.ascontiguousarray(one) for one in array]

    def _elapsed(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest timings: wait for queued kernels
        return time.perf_counter() - started


def _load_text_encoders(
    schnell_ref: str, *, dtype: torch.dtype, device: torch.device, offload: Offload
) -> TextEncoders:
    """FLUX.1 [schnell]'s text encoders for ``schnell_ref`` (a folder or a repo id), or
    TextEncodersMissing naming where they were looked for and how to get them."""
    folder = resolve_text_encoders(schnell_ref)
    log.info("loading the text encoders from %s", folder)
    with quiet_library_progress():
        return load_text_encoders(folder, dtype=dtype, device=device, offload=offload)

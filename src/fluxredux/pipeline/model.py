"""Loading FLUX.1 [schnell] + the Redux prior, and generating images with them.

The only module (with its siblings in this package) that imports torch and diffusers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from fluxredux.config import CompileMode, Offload, Quantization, Settings
from fluxredux.errors import InvalidInput, ModelUnavailable, PredictionCancelled, TextEncodersMissing
from fluxredux.pipeline.architecture import ArchitectureSpec, build_random_components, quiet_library_progress
from fluxredux.pipeline.attention import AttentionChoice, choose_attention
from fluxredux.pipeline.compilation import (
    CompileTargets,
    compile_modules,
    compiled_graphs,
    eager_on_failure,
    graphs_from_disk,
    use_compile_cache,
)
from fluxredux.pipeline.conditioning import (
    TEXT_SEQUENCE_LENGTH,
    Conditioning,
    TokenLayout,
    after_zero_text,
    attention_bias,
    collapse_zero_text,
    mix_conditionings,
    redux_tokens,
    token_layout,
    with_text,
)
from fluxredux.pipeline.conditioning_cache import ConditioningCache, cached_redux_conditioning
from fluxredux.pipeline.demo import DEMO_NOTICE, ensure_demo_model
from fluxredux.pipeline.quantization import check_quantization, quantize_transformer
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
    speed: str = ""  # what the Tuning made of it: collapse, attention, compile, quantize

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    @property
    def notice(self) -> str | None:
        """What every output display must say about this model, if anything."""
        return DEMO_NOTICE if self.is_demo else None

    def describe(self) -> str:
        name = "DEMO model (random weights, outputs are noise)" if self.is_demo else "FLUX.1 Redux [schnell]"
        speed = f"; {self.speed}" if self.speed else ""
        return f"{name} on {self.device} ({self.dtype}, offload {self.offload}{speed})"


@dataclass(frozen=True)
class Tuning:
    """How the model is run for speed (docs/performance.md); the defaults are exact."""

    collapse_zero_tokens: bool = True
    attention_backend: str = "auto"
    compile: CompileMode = "none"
    quantize: Quantization = "none"
    compile_cache: Path | None = None  # where inductor keeps compiled code (None: its default)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tuning:
        return cls(
            collapse_zero_tokens=settings.collapse_zero_tokens,
            attention_backend=settings.attention_backend,
            compile=settings.compile,
            quantize=settings.quantize,
            compile_cache=settings.data_dir / "compile-cache",
        )


@dataclass(frozen=True)
class CompileReport:
    graphs: int  # graphs compiled by the warm-up
    seconds: float
    from_disk: int = 0  # of which inductor found the compiled code on disk (a restart)
    failed: str | None = None  # why it runs eager instead

    def describe(self, mode: str) -> str:
        if self.failed:
            return f"compile {mode} FAILED, running eager ({self.failed})"
        cached = f", {self.from_disk} from the disk cache" if self.from_disk else ""
        return f"compile {mode} ({self.graphs} graphs in {self.seconds:.1f} s{cached})"


@dataclass
class Generation:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    seed: int
    # seconds: prior, denoise, decode (and prompt, when there was one)
    timings: dict[str, float] = field(default_factory=dict)
    # The transformer's joint sequence, e.g. "730 text + 4096 image tokens" (the text
    # counts the Redux tokens: one collapsed zero token + 729).
    sequence: str | None = None


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
        tuning=Tuning.from_settings(settings),
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
        tuning: Tuning | None = None,
    ) -> None:
        """Takes the loaded components, then readies them for speed as ``tuning`` says
        (quantisation, attention backend, compilation with its warm-up: the worker takes
        no job before this is done); ``info`` then says what it made of them."""
        self.pipe = pipe
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.image_embedder = image_embedder
        # Redux tokens of recent references (None: every reference is encoded anew).
        self.conditioning_cache = conditioning_cache
        # T5 + CLIP for prompts, not loaded yet (None: this model cannot take a prompt).
        self.text_encoders = text_encoders
        self.pipe.set_progress_bar_config(disable=True)  # progress goes through our callback
        self.tuning = tuning or Tuning()
        self.attention = self._choose_attention()
        compiled = self._compile()
        self.info = replace(info, speed=self._describe_speed(compiled))

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
        tuning: Tuning | None = None,
    ) -> ReduxModel:
        """Load from local folders or the Hugging Face cache; never downloads.

        Both locations are checked before any weight is read, so missing weights are
        reported within a second, not after minutes of loading the other half. The text
        encoders are not loaded here: the first prompt loads them (from the schnell
        folder, looked up again then, so a later ``download --with-text-encoders`` counts).
        """
        if offload != "none" and device.type != "cuda":
            raise ModelUnavailable(f"offload '{offload}' needs a CUDA device; this one is {device}")
        tuning = tuning or Tuning()
        check_quantization(tuning.quantize, device)  # before minutes of loading, not after
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
            tuning=tuning,
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
        tuning: Tuning | None = None,
    ) -> ReduxModel:
        """Random weights in memory, nothing on disk: with the FULL spec on a GPU this
        times exactly like the real model (the benchmark's --full-size-random). No text
        encoders: it takes no prompt."""
        tuning = tuning or Tuning()
        check_quantization(tuning.quantize, device)
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
            tuning=tuning,
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
        ``strength`` < 1 weakens the references' pull (see ``attention_bias``).

        ``is_cancelled`` is checked before the work starts and after every denoising
        step; a cancel raises PredictionCancelled within one step.
        """
        image_tokens = self._image_tokens(width, height)
        if strength < 1 and not self.attention.takes_bias:
            raise InvalidInput(
                f"redux_strength below 1 needs an attention bias, which this worker's attention "
                f"backend ({self.attention.name}) does not take; use redux_strength 1",
                field="redux_strength",
            )
        cancelled = is_cancelled or (lambda: False)
        timings: dict[str, float] = {}

        def raise_if_cancelled() -> None:
            if cancelled():
                raise PredictionCancelled("the prediction was cancelled")

        raise_if_cancelled()
        conditioning = self.conditioning(references, prompt, timings=timings)
        multiplicity = 1
        if prompt is None and self.tuning.collapse_zero_tokens:
            conditioning, multiplicity = collapse_zero_text(conditioning), TEXT_SEQUENCE_LENGTH
        layout = token_layout(conditioning, image_tokens=image_tokens, text_multiplicity=multiplicity)

        def step_end(step: int) -> None:
            if on_step is not None:
                on_step(step + 1, num_inference_steps)
            raise_if_cancelled()

        raise_if_cancelled()
        images = self._denoise_and_decode(
            conditioning,
            layout,
            strength,
            width=width,
            height=height,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            seed=seed,
            on_step_end=step_end,
            before_decode=raise_if_cancelled,
            timings=timings,
        )
        return Generation(images=images, seed=seed, timings=timings, sequence=layout.describe())

    def _image_tokens(self, width: int, height: int) -> int:
        multiple = int(self.pipe.vae_scale_factor) * 2
        if width % multiple or height % multiple:
            # diffusers would silently resize; the size table never needs it.
            raise ValueError(f"width and height must be multiples of {multiple}, got {width}x{height}")
        return (width // multiple) * (height // multiple)

    def _denoise_and_decode(
        self,
        conditioning: Conditioning,
        layout: TokenLayout,
        strength: float,
        *,
        width: int,
        height: int,
        num_outputs: int,
        num_inference_steps: int,
        seed: int,
        on_step_end: Callable[[int], None] = lambda step: None,
        before_decode: Callable[[], None] = lambda: None,
        timings: dict[str, float] | None = None,
    ) -> list[np.ndarray]:
        timings = {} if timings is None else timings
        bias = attention_bias(
            layout, strength, dtype=self.pipe.transformer.dtype, device=self.device
        )  # the query's dtype: some attention kernels insist

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step_end(step)
            return {}

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

        before_decode()
        started = time.perf_counter()
        images = self.decode(latents, width=width, height=height)
        timings["decode"] = self._elapsed(started)
        return images

    # --- readying the model for speed (from __init__) ----------------------------------

    def _choose_attention(self) -> AttentionChoice:
        transformer = self.pipe.transformer
        quantize_transformer(transformer, self.tuning.quantize)
        choice = choose_attention(
            transformer, self.tuning.attention_backend, device=self.device, dtype=transformer.dtype
        )
        if self.tuning.collapse_zero_tokens and not choice.takes_bias:
            raise ModelUnavailable(
                f"attention backend {choice.name!r} does not take an attention bias, which "
                "collapse_zero_tokens needs: use --attention-backend auto (or native, flex, ...), "
                "or --no-collapse-zero-tokens"
            )
        return choice

    def _compile(self) -> CompileReport | None:
        mode = self.tuning.compile
        if mode == "none":
            return None
        if self.tuning.compile_cache is not None:
            use_compile_cache(self.tuning.compile_cache)
        compile_modules(CompileTargets(self.pipe.transformer, self.pipe.vae, self.image_encoder), mode)
        started, graphs_before, disk_before = time.perf_counter(), compiled_graphs(), graphs_from_disk()
        with eager_on_failure() as failures:
            self._warm_up()
        return CompileReport(
            graphs=compiled_graphs() - graphs_before,
            seconds=time.perf_counter() - started,
            from_disk=graphs_from_disk() - disk_before,
            failed=failures[0] if failures else None,
        )

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run every graph a request can take once, so that compiling happens now and not
        under a request: one or several outputs (a batch of 1 is its own graph), with an
        attention bias or without (both, unless every request has one: the collapsed path
        always does, and only a prompt at full strength goes without). The size does not
        matter (dynamic shapes): the smallest does. With "all", the image encoder too."""
        config = self.pipe.transformer.config
        if self.tuning.compile == "all":
            started = time.perf_counter()
            size = self.feature_extractor.size
            pixels = torch.zeros((1, 3, size["height"], size["width"]))
            redux_tokens(
                pixels,
                image_encoder=self.image_encoder,
                image_embedder=self.image_embedder,
                device=self.device,
            )
            log.info("compiled the image encoder in %.1f s", time.perf_counter() - started)
        dtype = self.pipe.transformer.dtype
        zero = after_zero_text(
            torch.zeros(
                (1, self._redux_token_count(), config.joint_attention_dim), device=self.device, dtype=dtype
            ),
            joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=config.pooled_projection_dim,
        )
        cases: list[tuple[Conditioning, int, float]] = []  # conditioning, text multiplicity, strength
        if self.tuning.collapse_zero_tokens:
            cases.append((collapse_zero_text(zero), TEXT_SEQUENCE_LENGTH, 1.0))
        elif self.attention.takes_bias:
            cases.append((zero, 1, 0.5))  # the bias of redux_strength < 1
        if not self.tuning.collapse_zero_tokens or self.text_encoders is not None:
            cases.append((zero, 1, 1.0))  # no bias: a prompt (or no collapse) at full strength
        side = self.pipe.vae_scale_factor * 2 * 16  # 256 px: 256 image tokens
        graphs = [(case, outputs) for case in cases for outputs in (1, 2)]
        for number, ((conditioning, multiplicity, strength), outputs) in enumerate(graphs, start=1):
            started = time.perf_counter()
            layout = token_layout(
                conditioning, image_tokens=self._image_tokens(side, side), text_multiplicity=multiplicity
            )
            self._denoise_and_decode(
                conditioning,
                layout,
                strength,
                width=side,
                height=side,
                num_outputs=outputs,
                num_inference_steps=1,
                seed=0,
            )
            bias = "with" if multiplicity > 1 or strength < 1 else "without"
            log.info(
                "compiling %d/%d: %d output(s), %s attention bias: %.1f s",
                number,
                len(graphs),
                outputs,
                bias,
                time.perf_counter() - started,
            )

    def _redux_token_count(self) -> int:
        size = int(self.feature_extractor.size["height"])
        patch = int(self.image_encoder.config.patch_size)
        return (size // patch) ** 2

    def _describe_speed(self, compiled: CompileReport | None) -> str:
        tuning = self.tuning
        parts = [
            f"collapse {'on' if tuning.collapse_zero_tokens else 'off'}",
            f"attention {self.attention.name}",
            compiled.describe(tuning.compile) if compiled else "compile none",
            f"quantize {tuning.quantize}",
        ]
        return ", ".join(parts)

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

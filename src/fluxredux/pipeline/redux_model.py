"""Loading FLUX.1 [schnell] + the Redux prior, and generating images with them.

The only module (with its siblings in this package) that imports torch and diffusers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionModel

from fluxredux.config import Offload, TextEncoderQuantization
from fluxredux.errors import InvalidInput, ModelUnavailable, PredictionCancelled, TextEncodersMissing
from fluxredux.pipeline.adapters import AdapterBudget, AdapterCache, Adapters, HotswapSlots
from fluxredux.pipeline.architecture import ArchitectureSpec, build_random_components, quiet_library_progress
from fluxredux.pipeline.attention import AttentionChoice
from fluxredux.pipeline.components import ReduxComponents
from fluxredux.pipeline.conditioning import (
    Conditioning,
    collapse_zero_text,
    mix_conditionings,
    token_layout,
    with_text,
)
from fluxredux.pipeline.conditioning_cache import ConditioningCache, cached_redux_conditioning
from fluxredux.pipeline.demo import DEMO_NOTICE
from fluxredux.pipeline.denoising import denoise_and_decode, elapsed, image_tokens
from fluxredux.pipeline.loading import ModelKind
from fluxredux.pipeline.previews import Estimates, PreviewDecoder, catching_estimates
from fluxredux.pipeline.protocol import (
    DECODING,
    CancelCheck,
    GenerationRequest,
    PhaseCallback,
    PreviewCallback,
    ProgressCallback,
    Reference,
)
from fluxredux.pipeline.quantization import nf4_config, quantize_transformer
from fluxredux.pipeline.speed import Tuning, check_tuning, ready_for_speed
from fluxredux.pipeline.text_encoders import LazyTextEncoders, TextEncoders, load_text_encoders
from fluxredux.pipeline.weights import (
    REDUX,
    SCHNELL,
    SCHNELL_FOR_GGUF,
    resolve_text_encoders,
    resolve_weights,
)
from fluxredux.schema import MAX_LORAS, refine_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    kind: ModelKind
    device: str
    dtype: str
    schnell: str
    redux: str
    offload: str = "none"
    speed: str = ""  # what the Tuning made of it: collapse, attention, compile, quantize
    memory_profile: str = ""  # which profile chose quantize and offload, and why (CUDA only)

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
        profile = f"; {self.memory_profile}" if self.memory_profile else ""
        return f"{name} on {self.device} ({self.dtype}, offload {self.offload}{speed}{profile})"


@dataclass
class Generation:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    seed: int
    # seconds: prior, denoise, decode (and prompt, when there was one)
    timings: dict[str, float] = field(default_factory=dict)
    # The transformer's joint sequence, e.g. "730 text + 4096 image tokens" (the text
    # counts the Redux tokens: one collapsed zero token + 729).
    sequence: str | None = None


class ReduxModel:
    """FLUX.1 [schnell] conditioned on reference images through the Redux prior, and on
    an optional prompt through its text encoders (loaded when a prompt first needs them)."""

    def __init__(
        self,
        parts: ReduxComponents,
        info: ModelInfo,
        *,
        conditioning_cache: ConditioningCache | None = None,
        text_encoders: LazyTextEncoders | None = None,
        tuning: Tuning | None = None,
        attention: AttentionChoice | None = None,
        adapters: Adapters | None = None,
        previews: PreviewDecoder | None = None,
    ) -> None:
        """Takes components readied for speed already (see ``_assemble``): ``tuning`` is
        what was asked, ``attention`` what it became; ``adapters``, the hotswap slots made
        before a compile (None: adapters loaded as they come, PEFT's way); ``previews``,
        TAEF1 for step previews (None: its weights are not here, no previews)."""
        self.parts = parts
        self.previews = previews
        # One catcher for every previewing run, hooked in and out by each: a compiled
        # transformer then sees the same hook each time (its graph with the hook is compiled
        # once, not once per request).
        self._estimates = Estimates()
        self.info = info
        # Redux tokens of recent references (None: every reference is encoded anew).
        self.conditioning_cache = conditioning_cache
        # T5 + CLIP for prompts, not loaded yet (None: this model cannot take a prompt).
        self.text_encoders = text_encoders
        self.tuning = tuning or Tuning()
        self.attention = attention or AttentionChoice("auto", takes_bias=True)
        parts.pipe.set_progress_bar_config(disable=True)  # progress goes through our callback
        # Drafts refined into finals (upscales): the same components (nothing loaded twice,
        # the compiled transformer included), diffusers' img2img schedule over them. Built
        # from them, not by from_pipe: that casts every part to one dtype, which diffusers
        # refuses for a quantised (GGUF) transformer.
        pipe = parts.pipe
        self.refiner = FluxImg2ImgPipeline(
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            transformer=pipe.transformer,
        )
        self.refiner.set_progress_bar_config(disable=True)
        # Style adapters go into the one transformer both pipelines share.
        self.adapters: Adapters = adapters or AdapterCache(pipe, AdapterBudget())

    @property
    def previews_available(self) -> bool:
        return self.previews is not None

    @classmethod
    def _assemble(
        cls,
        parts: ReduxComponents,
        info: ModelInfo,
        *,
        device: torch.device,
        tuning: Tuning,
        conditioning_cache: ConditioningCache | None,
        text_encoders: LazyTextEncoders | None = None,  # None: the model takes no prompt
        adapter_budget: AdapterBudget | None = None,
        previews: PreviewDecoder | None = None,
    ) -> ReduxModel:
        """Ready the loaded components for speed as ``tuning`` says (fp8, the attention
        backend, compile and its warm-up: the worker takes no job before this is done),
        then the model, whose description says what came of it."""
        budget = adapter_budget or AdapterBudget()
        adapters: Adapters = AdapterCache(parts.pipe, budget, compiled=tuning.compile != "none")
        if tuning.compile != "none" and budget.offered:
            # Before the compile, so that it compiles the slots in: no adapter compiles again.
            adapters = HotswapSlots.prepare(parts.pipe, budget, slots=MAX_LORAS)
        speed = ready_for_speed(parts, tuning, device=device, takes_prompts=text_encoders is not None)
        return cls(
            parts,
            replace(info, speed=speed.describe()),
            conditioning_cache=conditioning_cache,
            text_encoders=text_encoders,
            tuning=tuning,
            attention=speed.attention,
            adapters=adapters,
            previews=previews,
        )

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
        memory_profile: str = "",
        adapter_budget: AdapterBudget | None = None,
        preview_ref: str | None = None,
    ) -> ReduxModel:
        """Load from local folders or the Hugging Face cache; never downloads.
        ``preview_ref``: TAEF1's folder or repo, for step previews (absent: none).

        Both locations are checked before any weight is read, so missing weights are
        reported within a second, not after minutes of loading the other half. The text
        encoders are not loaded here: the first prompt loads them (from the schnell
        folder, looked up again then, so a later ``download --with-text-encoders`` counts).
        """
        if offload != "none" and device.type != "cuda":
            raise ModelUnavailable(f"offload '{offload}' needs a CUDA device; this one is {device}")
        tuning = tuning or Tuning()
        check_tuning(tuning, device, offload)  # before minutes of loading, not after
        schnell_dir = resolve_weights(schnell_ref, SCHNELL_FOR_GGUF if tuning.quantize == "gguf" else SCHNELL)
        redux_dir = resolve_weights(redux_ref, REDUX)
        # bf16 on GPUs (the weights' own precision); fp32 on CPUs, where bf16 is ~15x slower.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        log.info("loading %s from %s and %s", kind, schnell_dir, redux_dir)
        with quiet_library_progress():
            transformer = _quantized_transformer(schnell_dir, tuning, dtype)
            parts = cls._load_components(schnell_dir, redux_dir, dtype, transformer=transformer)
        # The Redux prior is small (0.9 GiB) and runs once per prediction: it stays on the device.
        parts.image_encoder.to(device).eval()
        parts.image_embedder.to(device).eval()
        # torchao's modes: quantised on the way to the device, layer by layer (they take no
        # offload), so the bf16 transformer never has to fit on the card at once.
        quantize_transformer(parts.pipe.transformer, tuning.quantize, device=device)
        if offload == "model":
            parts.pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            parts.pipe.enable_sequential_cpu_offload(device=device)
        elif offload == "group":
            # The transformer's blocks on the GPU a group at a time, the next one copied in
            # on a CUDA stream while this one computes (diffusers group offloading); the
            # rest of the pipeline (the VAE) stays on the device.
            parts.pipe.transformer.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
            parts.pipe.vae.to(device)
        else:
            parts.pipe.to(device)
        info = ModelInfo(
            kind=kind,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            schnell=schnell_ref,
            redux=redux_ref,
            offload=offload,
            memory_profile=memory_profile,
        )
        load_encoders = functools.partial(
            _load_text_encoders,
            schnell_ref,
            dtype=dtype,
            device=device,
            offload=offload,
            quantize=tuning.text_encoder_quantize,
        )
        return cls._assemble(
            parts,
            info,
            device=device,
            tuning=tuning,
            conditioning_cache=conditioning_cache,
            text_encoders=LazyTextEncoders(load_encoders, keep=keep_text_encoders),
            adapter_budget=adapter_budget,
            previews=_load_previews(preview_ref, parts.pipe, device),
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
        if tuning.quantize in ("nf4", "gguf"):  # quantised as real weights load: never a silent bf16
            raise ModelUnavailable(
                f"quantize={tuning.quantize} needs real weights (--model flux), not random ones"
            )
        check_tuning(tuning, device, "none")
        random = build_random_components(spec, seed=seed, device=device, dtype=dtype)
        pipe = FluxPipeline(
            scheduler=random.scheduler,
            vae=random.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=random.transformer,
        )
        info = ModelInfo(
            kind="demo",
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            schnell=f"random:{spec.name}",
            redux=f"random:{spec.name}",
        )
        parts = ReduxComponents(
            pipe=pipe,
            image_encoder=random.image_encoder,
            feature_extractor=random.feature_extractor,
            image_embedder=random.image_embedder,
        )
        return cls._assemble(parts, info, device=device, tuning=tuning, conditioning_cache=conditioning_cache)

    @staticmethod
    def _load_components(
        schnell_dir: Path, redux_dir: Path, dtype: torch.dtype, *, transformer: torch.nn.Module | None = None
    ) -> ReduxComponents:
        # Text encoders and tokenizers are passed as None: Redux conditions on the image
        # alone, and not loading T5-XXL saves 9 GiB and ~20 s. A transformer loaded apart
        # (quantised as it was read: nf4, gguf) is given; None would mean "none at all".
        given = {} if transformer is None else {"transformer": transformer}
        pipe = FluxPipeline.from_pretrained(
            schnell_dir,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            dtype=dtype,
            local_files_only=True,
            **given,
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
        return ReduxComponents(
            pipe=pipe,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            image_embedder=image_embedder,
        )

    @property
    def device(self) -> torch.device:
        return torch.device(self.parts.pipe._execution_device)

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
        if not references:  # a prompt alone: plain text-to-image, the Redux prior unused
            if prompt is None:
                raise ValueError("a generation needs a reference or a prompt")
            started = time.perf_counter()
            conditioning = self.encode_prompt(prompt)
            timings["prompt"] = elapsed(started, self.device)
            return conditioning
        started = time.perf_counter()
        conditioning = mix_conditionings([(self.condition(image), share) for image, share in references])
        timings["prior"] = elapsed(started, self.device)
        if prompt is not None:
            started = time.perf_counter()
            conditioning = with_text(conditioning, self.encode_prompt(prompt))
            timings["prompt"] = elapsed(started, self.device)
        return conditioning

    def condition(self, image: Image.Image) -> Conditioning:
        # The same conditioning, bit for bit, with or without a cache; with one, a reference
        # seen lately skips the encoder.
        return cached_redux_conditioning(image, self.parts, cache=self.conditioning_cache, device=self.device)

    @torch.inference_mode()
    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> Generation:
        """Generate ``request.num_outputs`` images as one batch from the references mixed by
        their shares (see ``mix_conditionings``) and the optional prompt (see ``with_text``);
        a strength < 1 weakens the references' pull (see ``attention_bias``).

        ``is_cancelled`` is checked before the work starts and after every denoising
        step; a cancel raises PredictionCancelled within one step. ``on_phase`` hears
        DECODING once the last step is done, as the VAE decode starts.
        """
        pipe = self.parts.pipe
        # A refine runs only the steps its strength leaves of the schedule (see
        # denoise_and_decode): those are the steps its progress counts.
        steps_run = (
            refine_steps(request.num_inference_steps, request.init_strength)
            if request.refines
            else request.num_inference_steps
        )
        tokens = image_tokens(pipe, request.width, request.height)
        # A prompt alone has no reference to weaken: its strength changes nothing, and must
        # not ask for a bias (nor be refused where the backend takes none).
        strength = request.strength if request.references else 1.0
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
        conditioning = self.conditioning(request.references, request.prompt, timings=timings)
        if request.prompt is None and self.tuning.collapse_zero_tokens:
            conditioning = collapse_zero_text(conditioning)
        refine = None
        if request.refines:
            assert request.init_image is not None
            refine = (self.refiner, request.init_image, request.init_strength)
        layout = token_layout(conditioning, image_tokens=tokens)

        # Previews: the transformer's x0 estimates, caught by a hook only while one is asked for.
        caught = self._estimates if on_preview is not None and self.previews is not None else None
        if caught is not None:
            caught.latest = None  # nothing of an earlier run's

        def step_end(step: int) -> None:
            if caught is not None and caught.latest is not None and self.previews is not None:
                assert on_preview is not None
                started = time.perf_counter()
                on_preview(step + 1, self.previews.jpeg(caught.latest, request.width, request.height))
                timings["previews"] = timings.get("previews", 0.0) + time.perf_counter() - started
            if on_step is not None:
                on_step(step + 1, steps_run)
            raise_if_cancelled()

        def before_decode() -> None:
            raise_if_cancelled()
            if on_phase is not None:
                on_phase(DECODING)

        raise_if_cancelled()
        started = time.perf_counter()
        # Before the timer of the steps: a first use loads its file (seconds), a cached one
        # only switches (milliseconds); the adapters' own share of each step is in "denoise".
        if self.adapters.activate(request.loras):
            timings["adapters"] = time.perf_counter() - started
        hooked = (
            catching_estimates(pipe.transformer, caught) if caught is not None else contextlib.nullcontext()
        )
        with hooked:
            images = denoise_and_decode(
                pipe,
                conditioning,
                layout,
                strength,
                width=request.width,
                height=request.height,
                num_outputs=request.num_outputs,
                num_inference_steps=request.num_inference_steps,
                seed=request.seed,
                device=self.device,
                on_step_end=step_end,
                before_decode=before_decode,
                timings=timings,
                refine=refine,
            )
        return Generation(images=images, seed=request.seed, timings=timings, sequence=layout.describe())


def _load_previews(ref: str | None, pipe: FluxPipeline, device: torch.device) -> PreviewDecoder | None:
    """TAEF1 from ``ref`` (a folder, or a repo in the Hugging Face cache), or None, said
    once in the log: a worker without it makes images all the same, only no previews."""
    if ref is None:
        return None
    try:
        with quiet_library_progress():
            return PreviewDecoder.load(ref, int(pipe.vae_scale_factor), device)
    except (OSError, ValueError) as exc:
        log.info("no step previews: TAEF1 (%s) is not here (%s); fluxredux download --previews", ref, exc)
        return None


def _quantized_transformer(schnell_dir: Path, tuning: Tuning, dtype: torch.dtype) -> torch.nn.Module | None:
    """The transformer quantised as it is read (nf4, gguf), or None: loaded with the rest
    (and quantised afterwards by torchao for fp8 and int8, in ``ready_for_speed``)."""
    if tuning.quantize == "nf4":
        from diffusers import FluxTransformer2DModel

        try:
            transformer: torch.nn.Module = FluxTransformer2DModel.from_pretrained(
                schnell_dir,
                subfolder="transformer",
                quantization_config=nf4_config(dtype),
                torch_dtype=dtype,
                local_files_only=True,
            )
        except (ImportError, RuntimeError, ValueError) as exc:  # bitsandbytes' CUDA build, memory
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelUnavailable(
                f"quantize=nf4: the transformer could not be loaded in 4-bit ({first}); check bitsandbytes' "
                "CUDA build (pip install 'fluxredux[nf4]'), or use --quantize int8"
            ) from exc
        return transformer
    if tuning.quantize == "gguf":
        from fluxredux.pipeline.gguf import load_gguf_transformer, resolve_transformer_file

        assert tuning.transformer_file is not None  # check_quantization said so already
        file = resolve_transformer_file(tuning.transformer_file)
        gguf_transformer: torch.nn.Module = load_gguf_transformer(file, schnell_dir, dtype)
        return gguf_transformer
    return None


def _load_text_encoders(
    schnell_ref: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    offload: Offload,
    quantize: TextEncoderQuantization = "none",
) -> TextEncoders:
    """FLUX.1 [schnell]'s text encoders for ``schnell_ref`` (a folder or a repo id), or
    TextEncodersMissing naming where they were looked for and how to get them."""
    folder = resolve_text_encoders(schnell_ref)
    log.info("loading the text encoders from %s", folder)
    with quiet_library_progress():
        return load_text_encoders(folder, dtype=dtype, device=device, offload=offload, quantize=quantize)

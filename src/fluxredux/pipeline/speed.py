"""Readying loaded components for speed, as the settings say (docs/performance.md):
fp8, the attention backend, torch.compile and its warm-up. Runs once, before the model
takes its first job; what it made of them is said in the model's description.

Every choice is checked where it can fail: ``check_tuning`` before any weight is read
(fp8 without a GPU for it, combinations offloading cannot run), ``ready_for_speed``
while the worker starts (an attention backend that does not run here, a compiler that
fails: the latter leaves an eager model that says so).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxredux.config import CompileMode, Offload, Quantization, Settings, TextEncoderQuantization
from fluxredux.errors import ModelUnavailable
from fluxredux.pipeline.attention import AttentionChoice, choose_attention
from fluxredux.pipeline.compilation import (
    compile_modules,
    compiled_graphs,
    eager_on_failure,
    graphs_from_disk,
    use_compile_cache,
)
from fluxredux.pipeline.components import ReduxComponents
from fluxredux.pipeline.conditioning import (
    after_zero_text,
    collapse_zero_text,
    redux_tokens,
    token_layout,
)
from fluxredux.pipeline.denoising import denoise_and_decode, image_tokens
from fluxredux.pipeline.quantization import (
    check_quantization,
    check_text_encoder_quantization,
    quantize_transformer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuning:
    """How the model is run for speed; the defaults are exact and need nothing special."""

    collapse_zero_tokens: bool = True
    attention_backend: str = "auto"
    compile: CompileMode = "none"
    quantize: Quantization = "none"
    compile_cache: Path | None = None  # where inductor keeps compiled code (None: its default)
    transformer_file: str | None = None  # quantize=gguf: the checkpoint
    text_encoder_quantize: TextEncoderQuantization = "none"

    @classmethod
    def from_settings(cls, settings: Settings) -> Tuning:
        return cls(
            collapse_zero_tokens=settings.collapse_zero_tokens,
            attention_backend=settings.attention_backend,
            compile=settings.compile,
            quantize=settings.quantize,
            compile_cache=settings.data_dir / "compile-cache",
            transformer_file=settings.transformer_file,
            text_encoder_quantize=settings.text_encoder_quantize,
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


@dataclass(frozen=True)
class SpeedSetup:
    tuning: Tuning
    attention: AttentionChoice
    compiled: CompileReport | None

    def describe(self) -> str:
        tuning = self.tuning
        compiled = self.compiled.describe(tuning.compile) if self.compiled else "compile none"
        collapse = "on" if tuning.collapse_zero_tokens else "off"
        return f"collapse {collapse}, attention {self.attention.name}, {compiled}, quantize {tuning.quantize}"


def check_tuning(tuning: Tuning, device: torch.device, offload: Offload) -> None:
    """Before any weight is read: what cannot run with this device and offload mode."""
    check_quantization(tuning.quantize, device, offload=offload, transformer_file=tuning.transformer_file)
    check_text_encoder_quantization(tuning.text_encoder_quantize, device, offload)
    if tuning.compile != "none" and offload in ("sequential", "group"):
        # A hook on every layer (accelerate's, or group offloading's onload) breaks the graph
        # at each one: compiling would cost minutes and gain nothing.
        raise ModelUnavailable(f"compile={tuning.compile} cannot be combined with offload={offload}")


def ready_for_speed(
    parts: ReduxComponents, tuning: Tuning, *, device: torch.device, takes_prompts: bool
) -> SpeedSetup:
    """fp8 first (the attention check and the compile must see the final weights), then the
    attention backend, then compile and the warm-up that compiles every graph. ``device``:
    where the parts run; ``takes_prompts``: whether a request may bring T5 tokens (the
    uncollapsed, unbiased path)."""
    transformer = parts.pipe.transformer
    quantize_transformer(transformer, tuning.quantize)
    attention = choose_attention(
        transformer, tuning.attention_backend, device=device, dtype=transformer.dtype
    )
    if tuning.collapse_zero_tokens and not attention.takes_bias:
        raise ModelUnavailable(
            f"attention backend {attention.name!r} does not take an attention bias, which "
            "collapse_zero_tokens needs: use --attention-backend auto (or native, flex, ...), "
            "or --no-collapse-zero-tokens"
        )
    compiled = None
    if tuning.compile != "none":
        if tuning.compile_cache is not None:
            use_compile_cache(tuning.compile_cache)
        compile_modules(transformer, parts.image_encoder, tuning.compile)
        started, graphs_before, disk_before = time.perf_counter(), compiled_graphs(), graphs_from_disk()
        with eager_on_failure() as failures:
            warm_up(parts, tuning, attention, device=device, takes_prompts=takes_prompts)
        compiled = CompileReport(
            graphs=compiled_graphs() - graphs_before,
            seconds=time.perf_counter() - started,
            from_disk=graphs_from_disk() - disk_before,
            failed=failures[0] if failures else None,
        )
    return SpeedSetup(tuning=tuning, attention=attention, compiled=compiled)


@torch.inference_mode()
def warm_up(
    parts: ReduxComponents,
    tuning: Tuning,
    attention: AttentionChoice,
    *,
    device: torch.device,
    takes_prompts: bool,
) -> None:
    """Run every graph a request can take once, so that compiling happens now and not
    under a request. The transformer is compiled with dynamic shapes, so the output's
    size and the sequence's length do not matter; what does: one output or several (a
    batch of 1 is its own graph), and an attention bias or none (both, unless every
    request has one: the collapsed path always does, and only a prompt, or no collapse,
    at full strength goes without). With "all", the image encoder too (one fixed size)."""
    pipe = parts.pipe
    config, dtype = pipe.transformer.config, pipe.transformer.dtype
    if tuning.compile == "all":
        started = time.perf_counter()
        size = parts.feature_extractor.size
        pixels = torch.zeros((1, 3, size["height"], size["width"]))
        redux_tokens(
            pixels, image_encoder=parts.image_encoder, image_embedder=parts.image_embedder, device=device
        )
        log.info("compiled the image encoder in %.1f s", time.perf_counter() - started)
    patch = int(parts.image_encoder.config.patch_size)
    redux = (int(parts.feature_extractor.size["height"]) // patch) ** 2
    zero = after_zero_text(
        torch.zeros((1, redux, config.joint_attention_dim), device=device, dtype=dtype),
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim,
    )
    cases = []  # (conditioning, strength)
    if tuning.collapse_zero_tokens:
        cases.append((collapse_zero_text(zero), 1.0))
    elif attention.takes_bias:
        cases.append((zero, 0.5))  # the bias of redux_strength < 1
    if not tuning.collapse_zero_tokens or takes_prompts:
        cases.append((zero, 1.0))  # no bias
    side = int(pipe.vae_scale_factor) * 2 * 16  # 256 image tokens: the smallest that is cheap
    graphs = [(case, outputs) for case in cases for outputs in (1, 2)]
    for number, ((conditioning, strength), outputs) in enumerate(graphs, start=1):
        started = time.perf_counter()
        layout = token_layout(conditioning, image_tokens=image_tokens(pipe, side, side))
        denoise_and_decode(
            pipe,
            conditioning,
            layout,
            strength,
            width=side,
            height=side,
            num_outputs=outputs,
            num_inference_steps=1,
            seed=0,
            device=device,
        )
        bias = "with" if conditioning.collapsed or strength < 1 else "without"
        log.info(
            "compiling %d/%d: %d output(s), %s attention bias: %.1f s",
            number,
            len(graphs),
            outputs,
            bias,
            time.perf_counter() - started,
        )

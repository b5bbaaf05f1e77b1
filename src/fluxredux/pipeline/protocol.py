"""The model contract: what the worker asks of a model, torch-free.

Every model (the real FLUX one, the demo model, the fake one in tests) has ``info`` and
``generate``; the worker and the CLI program against this protocol only, so importing it
never pulls in torch or diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

# The one definition of each, for every model (real, demo, fake) and every caller.
ProgressCallback = Callable[[int, int], None]  # (steps done, total steps), after each step
CancelCheck = Callable[[], bool]  # asked at every step: True stops the run there
# (step, a small JPEG of what the image will look like), after each step and before its
# progress call, so that the worker records both in one write.
PreviewCallback = Callable[[int, bytes], None]
# What a run does after its last denoising step, in this order: the model reports the
# first (the VAE decode, inside its generate), the worker's post stage the others.
Phase = Literal["decoding", "safety check", "encoding", "storing"]
DECODING: Phase = "decoding"
SAFETY_CHECK: Phase = "safety check"
ENCODING: Phase = "encoding"
STORING: Phase = "storing"
# Called once as a run enters each phase: a handful of calls per run, never one per image.
PhaseCallback = Callable[[Phase], None]
# A reference image, made square for the image encoder, and its share of the mix (the
# shares of one prediction sum to 1).
Reference = tuple[Image.Image, float]


@dataclass(frozen=True)
class AdapterFile:
    """A style adapter (LoRA) a generation runs with: its checked safetensors file (local,
    or fetched from an allowed hub repo by the worker) and its scale."""

    name: str  # as the request named it
    path: str
    scale: float
    index: int  # its place in the request's loras (errors name input.loras.N.name)


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation makes: the same request gives the same images, on any model.

    The progress, phase and cancel callbacks are not in it but keyword arguments of ``generate``:
    they are the caller's hooks into one run (the worker's close over its job), not part of
    what is asked for, so a request stays a plain value that compares, prints and can be
    run again as it is."""

    # Made square already, their shares summing to 1. None (empty): the prompt alone
    # conditions (plain FLUX.1 [schnell] text-to-image, no Redux prior).
    references: Sequence[Reference]
    width: int
    height: int
    num_outputs: int  # generated as one batch
    num_inference_steps: int
    seed: int
    strength: float = 1.0  # the references' pull; < 1 weakens it (see conditioning.attention_bias)
    prompt: str | None = None
    # A draft to refine into this (an upscale): resized to width x height already, encoded
    # by the VAE, noised to ``init_strength`` and denoised by the share of the steps that
    # strength leaves. None (or a strength of 1): generated from noise, as without one.
    init_image: Image.Image | None = None
    init_strength: float = 1.0
    # Style adapters, in the request's order; none: the model runs exactly as without them.
    loras: tuple[AdapterFile, ...] = ()

    @property
    def refines(self) -> bool:
        """Starts from ``init_image`` rather than from pure noise."""
        return self.init_image is not None and self.init_strength < 1


class ModelInfoLike(Protocol):
    @property
    def is_demo(self) -> bool: ...
    @property
    def notice(self) -> str | None: ...
    def describe(self) -> str: ...


class GenerationLike(Protocol):
    images: list[np.ndarray]
    seed: int
    timings: dict[str, float]
    sequence: str | None  # the transformer's, e.g. "730 text + 4096 image tokens" (None: no transformer)


class ImageModel(Protocol):
    @property
    def info(self) -> ModelInfoLike: ...

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,  # told DECODING once the last step is done
        on_preview: PreviewCallback | None = None,  # each step's preview, where it makes them
    ) -> GenerationLike: ...


@runtime_checkable
class HasPreviews(Protocol):
    """A model that can decode step previews (its TAEF1 weights are there): real and demo."""

    @property
    def previews_available(self) -> bool: ...


@runtime_checkable
class HasPostStageWork(Protocol):
    """A model that asks for CPU work of its own in the post stage: the fake model, given a
    fixed CPU time per job (``fake_cpu_seconds``) to stand in for a real checker and
    encoder in tests and benchmarks of the worker's overlap."""

    def post_stage_work(self) -> None: ...

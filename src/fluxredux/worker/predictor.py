"""One prediction, end to end: reference image -> model -> safety -> encoded files.

Two stages: ``generate`` (the model: the GPU's part) and ``finish`` (safety check and
encode, on CPU threads), so that the worker can run one job's ``finish`` while the next
job's ``generate`` runs; ``predict`` is both, one after the other.

The model is anything with ``info`` and ``generate`` (the real FLUX model, the demo
model, or a fake in tests); this module itself never imports torch.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from fluxredux.errors import AllOutputsUnsafe, InvalidLora
from fluxredux.images import CONTENT_TYPES, EXTENSIONS, encode_image, square_reference
from fluxredux.loras.fetch import AdapterFiles
from fluxredux.pipeline.protocol import (
    ENCODING,
    SAFETY_CHECK,
    AdapterFile,
    CancelCheck,
    GenerationRequest,
    HasPostStageWork,
    HasPreviews,
    ImageModel,
    Phase,
    PhaseCallback,
    PreviewCallback,
    ProgressCallback,
)
from fluxredux.safety import SafetyChecker, SafetyVerdict
from fluxredux.schema import PredictionInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputImage:
    index: int  # position in the generated batch (unsafe ones leave gaps)
    data: bytes
    output_format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.output_format]


@dataclass
class Generated:
    """The model stage's product: the decoded images, not yet checked or encoded. Held
    between the stages, so the worker keeps at most two jobs' worth (see worker/loop.py)."""

    inputs: PredictionInput
    images: list[np.ndarray]
    seed: int
    timings: dict[str, float]
    sequence: str | None = None  # the transformer's token counts (see GenerationLike)


@dataclass
class PredictionResult:
    outputs: list[OutputImage]
    seed: int
    timings: dict[str, float]
    # One verdict per generated image; empty when the checker was disabled.
    safety: list[SafetyVerdict] = field(default_factory=list)
    notice: str | None = None  # e.g. the demo model's "outputs are noise"
    sequence: str | None = None  # the transformer's token counts (see GenerationLike)


def random_seed() -> int:
    return secrets.randbelow(2**32)


class Predictor:
    def __init__(
        self, model: ImageModel, safety: SafetyChecker | None, *, adapters: AdapterFiles | None = None
    ) -> None:
        """``adapters`` resolves a request's ``loras`` to checked files (None: this predictor
        offers none, and a request that names one fails saying so)."""
        self.model = model
        self.safety = safety
        self.adapters = adapters
        # Pillow's WebP/PNG encoders release the GIL: four 1 MP WebP files encode in
        # 149 ms on 2 threads instead of 297 ms one after another (2-core CPU).
        self._encoders = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="encode"
        )

    def predict(
        self,
        inputs: PredictionInput,
        images: Sequence[Image.Image],
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,
    ) -> PredictionResult:
        """Both stages, one after the other (the CLI, benchmarks, a worker without overlap)."""
        generated = self.generate(
            inputs, images, on_step=on_step, is_cancelled=is_cancelled, on_phase=on_phase
        )
        return self.finish(generated, on_phase=on_phase)

    def generate(
        self,
        inputs: PredictionInput,
        images: Sequence[Image.Image],
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> Generated:
        """The model stage (the GPU's part): references -> decoded images, nothing checked
        yet. ``on_phase`` hears the model's own phase after its steps (decoding);
        ``on_preview`` each step's preview, when the input asks for them (``preview``) and
        the model can make them (else none: the images are made all the same)."""
        seed = inputs.seed if inputs.seed is not None else random_seed()
        # An upscale's draft comes after its references (as the create stored them).
        draft: Image.Image | None = None
        if inputs.upscale_from is not None:
            if not images:
                raise ValueError("an upscale needs its draft image")
            *images, draft = images
        if len(images) != len(inputs.references):
            raise ValueError(f"{len(inputs.references)} references asked for, {len(images)} images given")
        if draft is not None:
            width, height = inputs.upscaled_size(draft.size)
            draft = draft.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        else:  # match_input: the first reference's proportions
            width, height = inputs.size(images[0].size if images else None)
        loras: tuple[AdapterFile, ...] = ()
        if inputs.loras:
            if self.adapters is None:
                raise InvalidLora("lora_not_found", "this worker offers no LoRA adapters", index=0)
            loras = self.adapters.files(inputs.loras)
        request = GenerationRequest(
            references=[
                (square_reference(image, inputs.redux_image_crop), weight)
                for image, (_, weight) in zip(images, inputs.references, strict=True)
            ],
            width=width,
            height=height,
            num_outputs=inputs.num_outputs,
            num_inference_steps=inputs.num_inference_steps,
            seed=seed,
            strength=inputs.redux_strength,
            prompt=inputs.prompt,
            init_image=draft,
            init_strength=inputs.upscale_strength if draft is not None else 1.0,
            loras=loras,
        )
        previewing = inputs.preview and isinstance(self.model, HasPreviews) and self.model.previews_available
        # Asked for only when previewing: a model that makes none need not take the argument.
        generation = self.model.generate(
            request,
            on_step=on_step,
            is_cancelled=is_cancelled,
            on_phase=on_phase,
            **({"on_preview": on_preview} if previewing and on_preview is not None else {}),
        )
        return Generated(
            inputs=inputs,
            images=list(generation.images),
            seed=seed,
            timings=dict(generation.timings),
            sequence=generation.sequence,
        )

    def finish(self, generated: Generated, *, on_phase: PhaseCallback | None = None) -> PredictionResult:
        """The post stage (CPU threads): safety check and encode. Raises AllOutputsUnsafe
        when nothing is left to return. ``on_phase`` hears each phase as it starts (once
        per job, whatever the number of images): SAFETY_CHECK (unless disabled), ENCODING."""
        inputs = generated.inputs
        timings = dict(generated.timings)
        pixels = list(enumerate(generated.images))
        checking = not inputs.disable_safety_checker
        report = on_phase or _unheard
        # The fake model's stand-in for the checker's and the encoder's CPU time counts as
        # the first phase: the one a real checker (or, unchecked, encoder) would be in.
        report(SAFETY_CHECK if checking else ENCODING)
        if isinstance(self.model, HasPostStageWork):
            started = time.perf_counter()
            self.model.post_stage_work()
            timings["post_work"] = time.perf_counter() - started

        verdicts: list[SafetyVerdict] = []
        if checking:
            if self.safety is None:
                raise RuntimeError("the safety checker is enabled but none is configured")
            started = time.perf_counter()
            verdicts = self.safety.check_all([array for _, array in pixels])
            timings["safety"] = time.perf_counter() - started
            kept = [
                (i, array) for (i, array), verdict in zip(pixels, verdicts, strict=True) if not verdict.unsafe
            ]
            if not kept:
                raise AllOutputsUnsafe(
                    "All generated images were flagged as NSFW by the safety checker. "
                    "Try again with a different seed or reference image.",
                    flagged=len(pixels),
                )
            if len(kept) < len(pixels):
                log.info("safety checker dropped %d of %d images", len(pixels) - len(kept), len(pixels))
            pixels = kept
            report(ENCODING)

        started = time.perf_counter()
        encoded = self._encoders.map(
            lambda pair: encode_image(pair[1], inputs.output_format, inputs.output_quality), pixels
        )
        outputs = [
            OutputImage(
                index=i,
                data=data,
                output_format=inputs.output_format,
                width=array.shape[1],
                height=array.shape[0],
            )
            for (i, array), data in zip(pixels, encoded, strict=True)
        ]
        timings["encode"] = time.perf_counter() - started
        return PredictionResult(
            outputs=outputs,
            seed=generated.seed,
            timings=timings,
            safety=verdicts,
            notice=self.model.info.notice,
            sequence=generated.sequence,
        )


def _unheard(phase: Phase) -> None:
    """Where phases go when nobody listens (the CLI, benchmarks)."""

"""A model with the real model's interface that takes no time: API, queue and
benchmark runs use it to measure and test everything but the model.

Each image is one flat colour derived from the seed (and the prompt, if any) and its
index, so tests can tell outputs apart and check that the same seed gives the same files.
"""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from fluxredux.errors import PredictionCancelled
from fluxredux.pipeline.protocol import (
    DECODING,
    CancelCheck,
    GenerationRequest,
    PhaseCallback,
    PreviewCallback,
    ProgressCallback,
)


@dataclass(frozen=True)
class FakeModelInfo:
    is_demo: bool = True
    notice: str | None = "fake model: flat colours, no model ran"

    def describe(self) -> str:
        return "FAKE model (flat colours, no model ran)"


@dataclass
class FakeGeneration:
    images: list[np.ndarray]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    sequence: str | None = None  # no transformer


def _grey_jpeg(level: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (level, level, level)).save(out, "JPEG")
    return out.getvalue()


class FakeModel:
    previews_available = True  # its previews cost nothing: a tiny grey JPEG per step

    def __init__(self, step_seconds: float = 0.0, cpu_seconds: float = 0.0) -> None:
        self.info = FakeModelInfo()
        # > 0 makes runs slow enough to cancel mid-way: the run's "GPU time" is
        # steps x step_seconds, shared out evenly between the steps and the decode after them.
        self.step_seconds = step_seconds
        # A fixed "CPU time" per job, spent in the post stage (after the model), so tests
        # and benchmarks can give a job fixed model and CPU times (worker/loop.py overlaps them).
        self.cpu_seconds = cpu_seconds

    def post_stage_work(self) -> None:
        """The post stage's share of a job. A sleep, not busy work: a real checker and
        encoder (onnxruntime, Pillow) release the GIL while they work, as a sleep does, so the
        model stage of the next job goes on meanwhile; a busy Python loop would hold the GIL
        and measure GIL contention instead, and busy native work would measure how loaded
        this machine's cores happen to be. (The fake's "GPU time" is a sleep for the same reason.)"""
        if self.cpu_seconds:
            time.sleep(self.cpu_seconds)

    def generate(
        self,
        request: GenerationRequest,  # its strength is ignored: no model, nothing to steer
        *,
        on_step: ProgressCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: PhaseCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> FakeGeneration:
        steps = request.num_inference_steps
        # One share per step and one for the decode, so that the decode can be seen (as the
        # real VAE decode can) while the whole run still takes steps x step_seconds: the
        # model time that the overlap benchmark and tests count on.
        share = self.step_seconds * steps / (steps + 1)
        cancelled = is_cancelled or (lambda: False)
        for step in range(1, steps + 1):
            if cancelled():
                raise PredictionCancelled("the prediction was cancelled")
            if share:
                time.sleep(share)
            if on_preview is not None:  # a grey that lightens as the steps go
                on_preview(step, _grey_jpeg(round(255 * step / steps)))
            if on_step is not None:
                on_step(step, steps)
        if cancelled():  # as the real model checks before its decode
            raise PredictionCancelled("the prediction was cancelled")
        if on_phase is not None:
            on_phase(DECODING)
        if share:
            time.sleep(share)
        # A prompt or an adapter changes the colours, as they change a real model's images;
        # without them (or with adapters at scale 0) the colours are what they always were.
        seed, prompt = request.seed, request.prompt
        styles = [f"{lora.name}@{lora.scale:g}" for lora in request.loras if lora.scale != 0]
        rng = random.Random(seed if prompt is None and not styles else f"{seed}:{prompt}:{styles}")
        images = []
        for _ in range(request.num_outputs):
            colour = np.array([rng.randrange(256) for _ in range(3)], dtype=np.uint8)
            image = np.broadcast_to(colour, (request.height, request.width, 3)).copy()
            if request.refines:  # a refined draft keeps its picture, as far as the strength says
                assert request.init_image is not None
                draft = np.asarray(request.init_image.convert("RGB"), dtype=np.float32)
                mixed = (1 - request.init_strength) * draft + request.init_strength * image
                image = mixed.round().clip(0, 255).astype(np.uint8)
            images.append(image)
        return FakeGeneration(images=images, seed=seed, timings={"prior": 0.0, "denoise": 0.0, "decode": 0.0})

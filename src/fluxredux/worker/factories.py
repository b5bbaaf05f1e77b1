"""What runs a prediction, built from settings: the image model and the safety checker.

Shared by everything that predicts: the worker process and ``fluxredux predict``. The
heavy imports (torch and diffusers for the model, onnxruntime for the checker) happen
inside the calls, so importing this module stays light.
"""

from __future__ import annotations

from fluxredux.config import Settings
from fluxredux.pipeline.protocol import ImageModel
from fluxredux.safety import SafetyChecker


def build_model(settings: Settings) -> ImageModel:
    """The model ``settings.model`` names: ``fake`` (no torch), else the real or demo FLUX."""
    if settings.model == "fake":
        from fluxredux.pipeline.fake import FakeModel

        return FakeModel(step_seconds=settings.fake_step_seconds, cpu_seconds=settings.fake_cpu_seconds)
    from fluxredux.pipeline.loading import load_model

    return load_model(settings)


def build_checker(settings: Settings) -> SafetyChecker:
    from fluxredux.safety.nudenet_detector import NudeNetDetector

    return SafetyChecker(NudeNetDetector(), threshold=settings.safety_threshold)

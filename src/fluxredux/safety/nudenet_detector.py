"""The real, offline detector: NudeNet's ONNX model, shipped inside its wheel."""

from __future__ import annotations

from typing import Any

import numpy as np

from fluxredux.safety.checker import Detection


class NudeNetDetector:
    def __init__(self) -> None:
        # Imported here: onnxruntime + opencv cost ~0.3 s and are needed by the worker only.
        from nudenet import NudeDetector

        self._model: Any = NudeDetector()

    def detect(self, pixels: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])  # NudeNet reads OpenCV-style BGR arrays
        return [Detection(label=d["class"], score=float(d["score"])) for d in self._model.detect(bgr)]

"""The safety rule: which detections make a generated image unsafe.

The detector (a model) only reports labelled regions with scores; this module decides.
It fails closed: if the detector raises on an image, that image counts as unsafe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# Explicit nudity only. Covered body parts, faces, feet, bellies, armpits and bare male
# chests are not unsafe by themselves.
UNSAFE_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    }
)


@dataclass(frozen=True)
class Detection:
    label: str
    score: float


class Detector(Protocol):
    def detect(self, pixels: np.ndarray) -> list[Detection]:
        """Detections in one (H, W, 3) RGB uint8 image."""


@dataclass(frozen=True)
class SafetyVerdict:
    unsafe: bool
    reasons: list[str] = field(default_factory=list)  # e.g. ["FEMALE_BREAST_EXPOSED:0.83"]
    checker_error: bool = False


def unsafe_detections(detections: Sequence[Detection], threshold: float) -> list[Detection]:
    """The detections that make an image unsafe: an explicit label at or above threshold."""
    return [d for d in detections if d.label in UNSAFE_LABELS and d.score >= threshold]


class SafetyChecker:
    def __init__(self, detector: Detector, threshold: float = 0.5) -> None:
        self.detector = detector
        self.threshold = threshold

    def check(self, pixels: np.ndarray) -> SafetyVerdict:
        try:
            detections = self.detector.detect(pixels)
        except Exception:
            # Fail closed: an image we could not check is not shown.
            log.exception("safety checker failed; treating the image as unsafe")
            return SafetyVerdict(unsafe=True, reasons=["checker_error"], checker_error=True)
        flagged = unsafe_detections(detections, self.threshold)
        return SafetyVerdict(unsafe=bool(flagged), reasons=[f"{d.label}:{d.score:.2f}" for d in flagged])

    def check_all(self, images: Sequence[np.ndarray]) -> list[SafetyVerdict]:
        return [self.check(pixels) for pixels in images]

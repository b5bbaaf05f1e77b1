"""Safety checking of generated images: a small detector protocol, the rule, fail-closed."""

from fluxredux.safety.checker import (
    UNSAFE_LABELS,
    Detection,
    Detector,
    SafetyChecker,
    SafetyVerdict,
    unsafe_detections,
)

__all__ = [
    "UNSAFE_LABELS",
    "Detection",
    "Detector",
    "SafetyChecker",
    "SafetyVerdict",
    "unsafe_detections",
]

"""The safety rule, fail-closed behaviour, and what a prediction does with flagged images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from fluxredux.errors import AllOutputsUnsafe
from fluxredux.pipeline.fake import FakeModel
from fluxredux.safety import Detection, SafetyChecker, unsafe_detections
from fluxredux.schema import PredictionInput
from fluxredux.worker.predictor import Predictor

IMAGE = Image.new("RGB", (32, 32))
INPUT = "data:,x"


class ScriptedDetector:
    """Returns chosen detections per call, in order; counts calls."""

    def __init__(self, script: list[list[Detection]] | Callable[[int], list[Detection]]) -> None:
        self.script = script
        self.calls = 0

    def detect(self, pixels: np.ndarray) -> list[Detection]:
        self.calls += 1
        if callable(self.script):
            return self.script(self.calls - 1)
        return self.script[self.calls - 1]


class BrokenDetector:
    def detect(self, pixels: np.ndarray) -> list[Detection]:
        raise RuntimeError("onnxruntime exploded")


@pytest.mark.parametrize(
    ("detections", "unsafe"),
    [
        ([], False),
        ([Detection("FEMALE_GENITALIA_EXPOSED", 0.51)], True),
        ([Detection("MALE_GENITALIA_EXPOSED", 0.9)], True),
        ([Detection("FEMALE_BREAST_EXPOSED", 0.5)], True),  # at the threshold counts
        ([Detection("ANUS_EXPOSED", 0.7)], True),
        ([Detection("BUTTOCKS_EXPOSED", 0.6)], True),
        ([Detection("FEMALE_BREAST_EXPOSED", 0.49)], False),  # below the threshold
        ([Detection("FEMALE_BREAST_COVERED", 0.99)], False),
        ([Detection("MALE_BREAST_EXPOSED", 0.99)], False),
        ([Detection("FACE_FEMALE", 0.99), Detection("BELLY_EXPOSED", 0.9)], False),
        ([Detection("FEET_EXPOSED", 0.99), Detection("ANUS_EXPOSED", 0.8)], True),
    ],
)
def test_the_rule(detections: list[Detection], unsafe: bool) -> None:
    verdict = SafetyChecker(ScriptedDetector([detections]), threshold=0.5).check(
        np.zeros((4, 4, 3), np.uint8)
    )
    assert verdict.unsafe is unsafe
    assert verdict.reasons == [f"{d.label}:{d.score:.2f}" for d in unsafe_detections(detections, 0.5)]


def test_a_failing_checker_counts_as_unsafe() -> None:
    verdict = SafetyChecker(BrokenDetector()).check(np.zeros((4, 4, 3), np.uint8))
    assert verdict.unsafe and verdict.checker_error


def run(detector: object, **fields: object) -> object:
    predictor = Predictor(FakeModel(), SafetyChecker(detector, threshold=0.5))  # type: ignore[arg-type]
    return predictor.predict(PredictionInput(redux_image=INPUT, seed=1, **fields), [IMAGE])  # type: ignore[arg-type]


def test_unsafe_images_are_dropped_and_flags_reported_per_image() -> None:
    flagged = {1, 3}
    detector = ScriptedDetector(lambda i: [Detection("ANUS_EXPOSED", 0.9)] if i in flagged else [])
    result = run(detector, num_outputs=4)
    assert [o.index for o in result.outputs] == [0, 2]  # type: ignore[attr-defined]
    assert [v.unsafe for v in result.safety] == [False, True, False, True]  # type: ignore[attr-defined]


def test_every_image_unsafe_fails_the_prediction_clearly() -> None:
    with pytest.raises(AllOutputsUnsafe) as info:
        run(ScriptedDetector(lambda i: [Detection("FEMALE_GENITALIA_EXPOSED", 0.8)]), num_outputs=2)
    assert "flagged as NSFW" in info.value.message
    assert info.value.code == "nsfw_content"


def test_a_broken_checker_withholds_every_image() -> None:
    with pytest.raises(AllOutputsUnsafe):
        run(BrokenDetector(), num_outputs=3)


def test_disable_safety_checker_skips_it() -> None:
    detector = ScriptedDetector(lambda i: [Detection("ANUS_EXPOSED", 0.99)])
    result = run(detector, num_outputs=2, disable_safety_checker=True)
    assert detector.calls == 0
    assert len(result.outputs) == 2  # type: ignore[attr-defined]
    assert result.safety == []  # type: ignore[attr-defined]


def test_the_real_detector_runs_offline_on_a_harmless_image() -> None:
    from fluxredux.safety.nudenet_detector import NudeNetDetector

    landscape = np.zeros((256, 256, 3), np.uint8)
    landscape[:128] = (120, 170, 235)  # sky
    landscape[128:] = (50, 110, 60)  # grass
    detections = NudeNetDetector().detect(landscape)
    assert isinstance(detections, list)
    assert not unsafe_detections(detections, 0.5)

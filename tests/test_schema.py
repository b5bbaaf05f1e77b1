"""The input contract: what peers may send, what they get back when it is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from fluxredux.schema import ASPECT_RATIOS, TABLE_ASPECT_RATIOS, PredictionInput, field_errors, output_size

IMAGE = "https://example.com/cat.jpg"

# DESIGN section 2: the hosted model's fixed size table at 1 MP.
EXPECTED_1MP = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}


def errors_of(**fields: object) -> list[str]:
    with pytest.raises(ValidationError) as info:
        PredictionInput(**fields)  # type: ignore[arg-type]
    return [str(e) for e in field_errors(info.value)]


def test_defaults_match_the_hosted_model() -> None:
    inputs = PredictionInput(redux_image=IMAGE)
    assert inputs.model_dump() == {
        "redux_image": IMAGE,
        "aspect_ratio": "1:1",
        "megapixels": "1",
        "num_outputs": 1,
        "num_inference_steps": 4,
        "seed": None,
        "output_format": "webp",
        "output_quality": 80,
        "disable_safety_checker": False,
        "prompt": None,  # beyond the hosted API: defaults that change nothing
        "redux_images": None,
        "redux_strength": 1.0,
        "redux_image_crop": "squash",
        "width": None,
        "height": None,
        "upscale_from": None,
        "scale": None,
        "upscale_strength": 0.35,
        "loras": None,
        "preview": False,
    }
    assert inputs.size() == (1024, 1024)


def test_the_spec_pages_own_example_input_is_accepted() -> None:
    # Verbatim from the hosted API's example: numbers as strings, seed null.
    body = json.loads(
        '{"seed": null, "megapixels": "1", "num_outputs": "1", "redux_image": "https://x.test/a.jpg",'
        ' "aspect_ratio": "1:1", "output_format": "webp", "output_quality": "80",'
        ' "num_inference_steps": "4", "disable_safety_checker": false}'
    )
    inputs = PredictionInput.model_validate(body)
    assert (inputs.num_outputs, inputs.output_quality, inputs.num_inference_steps) == (1, 80, 4)
    assert inputs.seed is None


def test_numeric_strings_and_numbers_are_both_accepted() -> None:
    inputs = PredictionInput.model_validate(
        {"redux_image": IMAGE, "num_outputs": "2", "seed": "7", "megapixels": 0.25, "output_quality": 55}
    )
    assert (inputs.num_outputs, inputs.seed, inputs.megapixels, inputs.output_quality) == (2, 7, "0.25", 55)
    assert PredictionInput.model_validate({"redux_image": IMAGE, "megapixels": 1}).megapixels == "1"


def test_unknown_fields_are_rejected_by_name() -> None:
    messages = errors_of(redux_image=IMAGE, num_output=2, negative_prompt="blurry")
    assert any("unknown field 'num_output'" in m for m in messages)
    assert any("unknown field 'negative_prompt'" in m for m in messages)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("num_outputs", 0, "num_outputs: Input should be greater than or equal to 1"),
        ("num_outputs", "5", "num_outputs: Input should be less than or equal to 4"),
        ("num_outputs", 2.5, "num_outputs: Input should be a valid integer"),
        ("num_inference_steps", 5, "num_inference_steps: Input should be less than or equal to 4"),
        ("output_quality", 101, "output_quality: Input should be less than or equal to 100"),
        ("output_quality", "-1", "output_quality: Input should be greater than or equal to 0"),
        ("seed", -1, "seed: Input should be greater than or equal to 0"),
        ("seed", "abc", "seed: Input should be a valid integer"),
        ("aspect_ratio", "5:7", "aspect_ratio: Input should be '1:1', '16:9'"),
        ("megapixels", "2", "megapixels: Input should be '1' or '0.25'"),
        ("output_format", "gif", "output_format: Input should be 'webp', 'jpg' or 'png'"),
        ("disable_safety_checker", "maybe", "disable_safety_checker: Input should be a valid boolean"),
        # JSON true/false is no number, and a string or a number no boolean (no lax guessing).
        ("num_outputs", True, "num_outputs: Input should be a valid integer"),
        ("seed", False, "seed: Input should be a valid integer"),
        ("redux_strength", True, "redux_strength: Input should be a valid number"),
        ("disable_safety_checker", "yes", "disable_safety_checker: Input should be a valid boolean"),
        ("disable_safety_checker", 0, "disable_safety_checker: Input should be a valid boolean"),
    ],
)
def test_each_bad_value_names_its_field(field: str, value: object, expected: str) -> None:
    messages = errors_of(redux_image=IMAGE, **{field: value})
    assert len(messages) == 1
    assert messages[0].startswith(expected), messages


@pytest.mark.parametrize("ref", ["", "cat.jpg", "/etc/passwd", "ftp://host/a.jpg", "file:///etc/passwd"])
def test_redux_image_must_be_a_url_data_uri_or_file_id(ref: str) -> None:
    (message,) = errors_of(redux_image=ref)
    assert message.startswith("redux_image:")


@pytest.mark.parametrize(
    "ref", [IMAGE, "http://host/a.png", "data:image/png;base64,AAAA", "f_0123456789abcdef"]
)
def test_redux_image_accepts_each_kind_of_reference(ref: str) -> None:
    assert PredictionInput(redux_image=ref).redux_image == ref


def test_redux_image_is_required() -> None:
    assert errors_of() == ["redux_image: Field required (or give redux_images, or a prompt alone)"]


@pytest.mark.parametrize("aspect_ratio", TABLE_ASPECT_RATIOS)
def test_output_size_table(aspect_ratio: str) -> None:
    width, height = EXPECTED_1MP[aspect_ratio]
    assert output_size(aspect_ratio, "1") == (width, height)
    assert output_size(aspect_ratio, "0.25") == (width // 2, height // 2)
    assert PredictionInput(redux_image=IMAGE, aspect_ratio=aspect_ratio, megapixels="0.25").size() == (  # type: ignore[arg-type]
        width // 2,
        height // 2,
    )
    # FLUX packs 2x2 latents of an 8x VAE: every side must be a multiple of 16.
    assert all(side % 16 == 0 for side in (width, height, width // 2, height // 2))


def test_schema_importing_costs_no_torch_pil_or_fastapi() -> None:
    code = (
        "import sys, fluxredux.schema, fluxredux.errors, fluxredux.config; "
        "print([m for m in ('torch', 'PIL', 'fastapi', 'diffusers', 'numpy') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_json_schema_drives_forms_with_choices_ranges_and_defaults() -> None:
    properties = PredictionInput.model_json_schema()["properties"]
    assert properties["aspect_ratio"]["enum"] == list(ASPECT_RATIOS)
    assert (properties["num_outputs"]["minimum"], properties["num_outputs"]["maximum"]) == (1, 4)
    assert properties["output_quality"]["default"] == 80


# --- beyond the hosted API ---------------------------------------------------------------


@pytest.mark.parametrize("megapixels", ["1", "0.25"])
@pytest.mark.parametrize(
    "reference",
    [
        (1024, 1024),
        (3000, 2000),
        (2000, 3000),
        (1920, 1080),
        (1080, 1920),
        (4000, 3000),
        (613, 409),
        (35, 31),
    ],
)
def test_match_input_keeps_the_references_proportions(reference: tuple[int, int], megapixels: str) -> None:
    width, height = output_size("match_input", megapixels, reference)
    assert width % 16 == 0 and height % 16 == 0
    target = 1024 * 1024 if megapixels == "1" else 512 * 512
    assert abs(width * height / target - 1) < 0.04  # within 10% promised, 4% delivered
    # The proportions are the reference's, but for one rounding step of 16 on a side.
    assert abs(width / height - reference[0] / reference[1]) <= (width / height) * (16 / min(width, height))


def test_match_input_narrows_extreme_proportions_to_21_9() -> None:
    assert output_size("match_input", "1", (5000, 500)) == output_size("match_input", "1", (2400, 1000))
    wide, tall = output_size("match_input", "1", (5000, 500)), output_size("match_input", "1", (500, 5000))
    assert wide == tall[::-1] and 2.3 < wide[0] / wide[1] < 2.5


def test_match_input_needs_a_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        PredictionInput(redux_image=IMAGE, aspect_ratio="match_input").size()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"redux_strength": 1.5}, "input.redux_strength"),
        ({"redux_strength": -0.1}, "input.redux_strength"),
        ({"redux_strength": "strong"}, "input.redux_strength"),
        ({"redux_image_crop": "stretch"}, "input.redux_image_crop"),
        ({"aspect_ratio": "match"}, "input.aspect_ratio"),
        ({"prompt": "x" * 2001}, "input.prompt"),
        ({"prompt": 42}, "input.prompt"),
    ],
)
def test_bad_controls_are_named(fields: dict[str, object], named: str) -> None:
    from fluxredux.api.eachlabs.shapes import PredictionRequest

    with pytest.raises(ValidationError) as info:
        PredictionRequest(input={"redux_image": IMAGE, **fields})  # type: ignore[arg-type]
    assert [e.field for e in field_errors(info.value)] == [named]


def test_controls_arrive_as_numbers_or_strings() -> None:
    inputs = PredictionInput(redux_image=IMAGE, redux_strength="0.5", redux_image_crop="pad")  # type: ignore[arg-type]
    assert inputs.redux_strength == 0.5 and inputs.redux_image_crop == "pad"


def test_a_prompt_is_optional_text_of_at_most_2000_characters() -> None:
    assert PredictionInput(redux_image=IMAGE, prompt=" a red fox\n").prompt == "a red fox"
    assert PredictionInput(redux_image=IMAGE, prompt="x" * 2000).prompt == "x" * 2000
    for blank in ("", "   ", "\n\t"):  # an emptied form field: no prompt, the zero-text path
        assert PredictionInput(redux_image=IMAGE, prompt=blank).prompt is None
    [message] = errors_of(redux_image=IMAGE, prompt="x" * 2001)
    assert message == "prompt: String should have at most 2000 characters"
    schema = PredictionInput.model_json_schema()["properties"]["prompt"]
    assert schema["examples"] and schema["x-fluxredux-advanced"] is True
    assert {"type": "string", "maxLength": 2000} in schema["anyOf"]


def two(weights: tuple[float, float] = (1, 1)) -> list[dict[str, object]]:
    return [{"image": IMAGE, "weight": weights[0]}, {"image": "data:,x", "weight": weights[1]}]


def test_several_references_are_mixed_by_normalised_weights() -> None:
    inputs = PredictionInput(redux_images=two((3, 1)))  # type: ignore[arg-type]
    assert inputs.references == [(IMAGE, 0.75), ("data:,x", 0.25)]
    assert PredictionInput(redux_image=IMAGE).references == [(IMAGE, 1.0)]


@pytest.mark.parametrize(
    ("fields", "named", "says"),
    [
        ({}, "input.redux_image", "Field required"),
        ({"redux_image": IMAGE, "redux_images": two()}, "input.redux_images", "not both"),
        ({"redux_images": []}, "input.redux_images", "at least 1"),
        ({"redux_images": two() * 3}, "input.redux_images", "at most 4"),
        ({"redux_images": two((1, -1))}, "input.redux_images.1.weight", "greater than or equal to 0"),
        ({"redux_images": two((0, 0))}, "input.redux_images", "at least one weight"),
        ({"redux_images": [{"image": "ftp://x/y.png"}]}, "input.redux_images.0.image", "http(s) URL"),
        ({"redux_images": [{"image": IMAGE, "scale": 1}]}, "input.redux_images.0.scale", "unknown field"),
    ],
)
def test_bad_reference_lists_are_named(fields: dict[str, object], named: str, says: str) -> None:
    from fluxredux.api.eachlabs.shapes import PredictionRequest

    with pytest.raises(ValidationError) as info:
        PredictionRequest(input=fields)  # type: ignore[arg-type]
    [error] = field_errors(info.value)
    assert named in error.field and says in error.message, error

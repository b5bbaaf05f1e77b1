"""The input contract: one pydantic model that validates requests and drives the
OpenAPI schema, the CLI flags and the web form.

This module imports pydantic and the standard library only: the HTTP process, the
client and the CLI import it without paying for torch, PIL or FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

MODEL_NAME = "flux-redux-schnell"
MODEL_VERSION = "0.0.1"

AspectRatio = Literal[
    "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "match_input"
]  # fmt: skip
Megapixels = Literal["1", "0.25"]
OutputFormat = Literal["webp", "jpg", "png"]
ReduxImageCrop = Literal["squash", "center", "pad"]

ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
MEGAPIXELS: tuple[str, ...] = get_args(Megapixels)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
MATCH_INPUT = "match_input"

# (width, height) at 1 megapixel. A fixed table, not a formula, exactly as the hosted
# model serves it; 0.25 MP halves both sides. Every side is a multiple of 16 (the
# FLUX latent grid) even when halved, so nothing is silently resized downstream.
_SIZES_1MP: dict[str, tuple[int, int]] = {
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

# The aspect ratios with a fixed size (all but match_input).
TABLE_ASPECT_RATIOS: tuple[str, ...] = tuple(_SIZES_1MP)

MAX_SEED = 2**63 - 1

# An uploaded file's id (issued by the server); URLs and data: URIs are told apart by
# their scheme.
_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# A data: URI may carry an image up to the decoder's byte limit; base64 adds a third.
MAX_REDUX_IMAGE_CHARS = 64 * 1024 * 1024
# A URL is stored with the prediction and echoed on every poll, so it gets a bound of its
# own: long enough for signed object-store URLs, far below what a data: URI may carry.
MAX_URL_CHARS = 8192
# Free-form strings that are stored and echoed (model, version): generous, not unbounded.
MAX_NAME_CHARS = 64
# A prompt: far more than the text encoders read (CLIP 77 tokens, T5 512), still bounded.
MAX_PROMPT_CHARS = 2000


# FLUX's latent grid: both sides of an output are multiples of this.
SIDE_MULTIPLE = 16
# The widest and tallest proportions match_input gives: those of the table (21:9, 9:21).
_MATCH_RATIOS = (640 / 1536, 1536 / 640)


def output_size(
    aspect_ratio: str, megapixels: str, reference: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(width, height) of the images generated for these settings.

    ``match_input`` takes the proportions of ``reference`` (width, height): the sides are
    the ideal ones for the asked area (1024² or 512² pixels), each rounded to the nearest
    multiple of 16, so the area stays within 4% of the target (10% is the promise) and
    the proportions within a rounding step of the reference's. Proportions past 21:9 or
    9:21 are narrowed to those (the model's trained range; the table's extremes)."""
    if aspect_ratio == MATCH_INPUT:
        if reference is None:
            raise ValueError("match_input needs the reference image's size")
        return _matching_size(reference, 1024 * 1024 if megapixels == "1" else 512 * 512)
    width, height = _SIZES_1MP[aspect_ratio]
    if megapixels == "0.25":
        return width // 2, height // 2
    return width, height


def _matching_size(reference: tuple[int, int], area: int) -> tuple[int, int]:
    ratio = min(max(reference[0] / reference[1], _MATCH_RATIOS[0]), _MATCH_RATIOS[1])

    def side(ideal: float) -> int:
        return max(SIDE_MULTIPLE, round(ideal / SIDE_MULTIPLE) * SIDE_MULTIPLE)

    return side((area * ratio) ** 0.5), side((area / ratio) ** 0.5)


def check_image_reference(value: str) -> str:
    """An http(s) URL (bounded), a data: URI, or an uploaded file's id."""
    value = value.strip()
    lowered = value[:16].lower()
    if lowered.startswith(("http://", "https://")):
        if len(value) > MAX_URL_CHARS:
            raise ValueError(f"a URL must be at most {MAX_URL_CHARS:,} characters")
        return value
    if lowered.startswith("data:") or _FILE_ID.match(value):
        return value
    raise ValueError("must be an http(s) URL, a data: URI, or the id of an uploaded file")


MAX_REFERENCES = 4


def no_bool(value: Any, error_type: Literal["int_type", "float_type"]) -> Any:
    """``value`` unless it is a JSON true/false given for a number (then pydantic's own
    ``error_type`` error, as for any other non-number). Numbers may arrive as JSON
    numbers or numeric strings (the hosted API's own example sends "num_outputs": "1"),
    but lax parsing would also take ``"num_outputs": true`` for 1, ``"seed": false`` for 0."""
    if isinstance(value, bool):
        raise PydanticKnownError(error_type)
    return value


class WeightedImage(BaseModel):
    """One reference of several, and its share of the mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(
        description="An http(s) URL, a data: URI, or the id of an uploaded file.",
        min_length=1,
        max_length=MAX_REDUX_IMAGE_CHARS,
    )
    weight: float = Field(1.0, ge=0, le=100, description="Its share of the mix (weights are normalised).")

    @field_validator("image")
    @classmethod
    def _reference(cls, value: str) -> str:
        return check_image_reference(value)

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_not_bool(cls, value: Any) -> Any:
        return no_bool(value, "float_type")


class PredictionInput(BaseModel):
    """Inputs of one flux-redux-schnell prediction.

    Numbers may arrive as JSON numbers or numeric strings (the hosted API's own
    example sends ``"num_outputs": "1"``), never as true/false; booleans are JSON
    true/false only; unknown fields are rejected by name.
    """

    model_config = ConfigDict(extra="forbid", title="Input", frozen=True)

    # Required unless redux_images is given (checked below); the hosted API's one image.
    redux_image: str | None = Field(
        None,
        description="Reference image: an http(s) URL, a data: URI, or the id of an uploaded file. "
        "JPEG, PNG, WEBP or GIF (first frame).",
        min_length=1,
        max_length=MAX_REDUX_IMAGE_CHARS,
        json_schema_extra={"x-fluxredux-kind": "image"},
    )
    aspect_ratio: AspectRatio = Field(
        "1:1",
        description="Aspect ratio of the generated images; match_input: the reference image's own "
        "(sides rounded to multiples of 16, between 21:9 and 9:21).",
        examples=["16:9", "match_input"],
    )
    megapixels: Megapixels = Field("1", description="Approximate size of the generated images.")
    num_outputs: int = Field(1, ge=1, le=4, description="Number of images to generate.")
    num_inference_steps: int = Field(
        4, ge=1, le=4, description="Denoising steps. More steps: more detail, more time."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Random seed for reproducible results. Leave empty for a random seed; "
        "the seed used is returned.",
    )
    output_format: OutputFormat = Field("webp", description="File format of the images.")
    output_quality: int = Field(
        80, ge=0, le=100, description="Quality when saving webp or jpg (0-100). Ignored for png."
    )
    # StrictBool: JSON true/false only. Lax parsing would read "yes", "off", 1 or 0 as a
    # boolean, and a typo could turn the safety checker off.
    disable_safety_checker: StrictBool = Field(
        False, description="Skip the safety checker on generated images."
    )
    # --- beyond the hosted API: optional, and when absent every output is as before ----
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Text blended with the reference image, read by FLUX's text encoders (T5: up to 512 "
        "tokens, CLIP: 77) where the hosted API gives them nothing. The reference still steers; a lower "
        "redux_strength lets the text steer more. Empty or absent: no text.",
        examples=["a watercolour painting, soft morning light"],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    redux_strength: float = Field(
        1.0,
        ge=0,
        le=1,
        description="How much the reference image steers the result: 1 fully (as the hosted API), "
        "lower values weaken its pull, 0 ignores it.",
        examples=[0.6],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    redux_images: list[WeightedImage] | None = Field(
        None,
        min_length=1,
        max_length=MAX_REFERENCES,
        description="Instead of redux_image: 1-4 references mixed into one conditioning, each by its "
        "weight (normalised to sum to 1; weights [1, 0] give the first image alone). match_input "
        "takes the first one's proportions.",
        examples=[
            [{"image": "https://example.com/a.jpg", "weight": 0.7}, {"image": "upload-id", "weight": 0.3}]
        ],
        json_schema_extra={"x-fluxredux-kind": "images", "x-fluxredux-advanced": True},
    )
    redux_image_crop: ReduxImageCrop = Field(
        "squash",
        description="How the reference is made square for the image encoder: squash (stretch, as "
        "the hosted API), center (crop the middle square), pad (fit inside a grey square).",
        examples=["pad"],
        json_schema_extra={"x-fluxredux-advanced": True},
    )

    @field_validator("num_outputs", "num_inference_steps", "seed", "output_quality", mode="before")
    @classmethod
    def _integer_not_bool(cls, value: Any) -> Any:
        return no_bool(value, "int_type")

    @field_validator("redux_strength", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        return no_bool(value, "float_type")

    @field_validator("megapixels", mode="before")
    @classmethod
    def _megapixels_from_number(cls, value: Any) -> Any:
        # The choices are strings ("1", "0.25") but clients send 1, 0.25 or 1.0 too.
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return {1.0: "1", 0.25: "0.25"}.get(float(value), str(value))
        return value

    @field_validator("redux_image")
    @classmethod
    def _redux_image_reference(cls, value: str | None) -> str | None:
        return None if value is None else check_image_reference(value)

    @field_validator("prompt")
    @classmethod
    def _blank_prompt_is_none(cls, value: str | None) -> str | None:
        # A blank prompt (an emptied form field) means no prompt: the zero-text path.
        if value is None or not value.strip():
            return None
        return value.strip()

    @field_validator("redux_images")
    @classmethod
    def _some_weight(cls, value: list[WeightedImage] | None) -> list[WeightedImage] | None:
        if value is not None and not any(item.weight > 0 for item in value):
            raise ValueError("at least one weight must be above 0")
        return value

    @model_validator(mode="after")
    def _one_way_to_give_the_reference(self) -> PredictionInput:
        # Custom error types: field_errors() names the field each one is about.
        if self.redux_image is None and self.redux_images is None:
            raise PydanticCustomError("reference_missing", "Field required (or give redux_images)")
        if self.redux_image is not None and self.redux_images is not None:
            raise PydanticCustomError("reference_twice", "give redux_image or redux_images, not both")
        return self

    @property
    def references(self) -> list[tuple[str, float]]:
        """Every reference with its share of the mix (normalised weights, summing to 1)."""
        if self.redux_images is None:
            assert self.redux_image is not None  # one of the two: checked above
            return [(self.redux_image, 1.0)]
        total = sum(item.weight for item in self.redux_images)
        return [(item.image, item.weight / total) for item in self.redux_images]

    def size(self, reference: tuple[int, int] | None = None) -> tuple[int, int]:
        """(width, height) of each generated image; ``reference`` is the reference image's
        (width, height), which ``match_input`` needs."""
        return output_size(self.aspect_ratio, self.megapixels, reference)


@dataclass(frozen=True)
class FieldError:
    """One invalid input, in words a user can act on."""

    field: str
    message: str
    type: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def shorten(value: str, limit: int = 64) -> str:
    """At most ``limit`` characters of ``value``, marked when cut: an error names a bad
    value (or a bad field name: JSON keys can be megabytes too) without echoing all of it."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value):,} characters)"


def field_path(loc: Iterable[int | str]) -> str:
    """``input.num_outputs`` from pydantic's location tuple, each part shortened."""
    return ".".join(shorten(str(part)) for part in loc)


# The field a whole-model check is about (pydantic places those errors on the model).
_ABOUT = {"reference_missing": ("redux_image",), "reference_twice": ("redux_images",)}


def error_field(loc: Iterable[int | str], error_type: str) -> str:
    """The dotted field an error is about: its location, plus the field a whole-model
    check names (a missing reference is about ``redux_image``)."""
    return field_path([*loc, *_ABOUT.get(error_type, ())])


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Turn pydantic's errors into one message per field, naming unknown fields."""
    errors = []
    for err in exc.errors(include_url=False):
        field = error_field(err["loc"], err["type"])
        if err["type"] == "extra_forbidden":
            message = f"unknown field '{field}'"
            allowed = ", ".join(PredictionInput.model_fields)
            message += f" (allowed: {allowed})"
        else:
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        errors.append(FieldError(field=field, message=message, type=err["type"]))
    return errors

"""The input contract: one pydantic model that validates requests and drives the
OpenAPI schema, the CLI flags and the web form.

This module imports pydantic and the standard library only: the HTTP process, the
client and the CLI import it without paying for torch, PIL or FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
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
# Custom sizes (width and height): each side in this range, a multiple of SIDE_MULTIPLE.
MIN_SIDE, MAX_SIDE = 256, 2048
# The largest image made, custom or upscaled: 4 MP in this API's megapixels (1 MP is the
# table's 1024 x 1024), e.g. a 0.25 MP 16:9 draft upscaled 4x (2688 x 1536). Also the most
# a custom or upscaled prediction makes in all (num_outputs x width x height): what the
# hosted sizes reach at most (4 outputs of about 1 MP), so no request needs more memory.
MAX_AREA = 4 * 1024 * 1024
UPSCALE_SCALES = (2, 4)
# One side of a custom size.
CustomSide = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
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


def refine_steps(num_inference_steps: int, strength: float) -> int:
    """The steps a refine (an upscale) at ``strength`` runs of ``num_inference_steps``: the
    schedule's last ones, as diffusers' FluxImg2ImgPipeline.get_timesteps cuts it (at
    least one). Here, torch-free: the API reports a final's step count too."""
    start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
    return max(1, num_inference_steps - start)


def _too_many_pixels(width: int, height: int, outputs: int) -> str:
    return (
        f"{outputs} outputs of {width}x{height} are {width * height * outputs:,} pixels; at most "
        f"{MAX_AREA:,} (4 MP) in all: ask fewer outputs or a smaller size"
    )


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


class UpscaleSource(BaseModel):
    """Which finished output of one of the caller's own predictions a final starts from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prediction: str = Field(
        description="The draft's prediction id.", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"
    )
    index: int = Field(0, ge=0, le=3, description="Which of its outputs (0: the first).")

    @field_validator("index", mode="before")
    @classmethod
    def _index_not_bool(cls, value: Any) -> Any:
        return no_bool(value, "int_type")


MAX_LORAS = 3
MIN_LORA_SCALE, MAX_LORA_SCALE = -2.0, 2.0


class LoraUse(BaseModel):
    """One style adapter (LoRA) a prediction runs with, and how strongly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="An adapter this server offers (GET /v1/loras): a local adapter's name, or an "
        "allowed Hugging Face repo's owner/repo[/file.safetensors].",
        min_length=1,
        max_length=300,
    )
    scale: float = Field(
        1.0,
        ge=MIN_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="How strongly it applies (0: not at all; negative: away from its style).",
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _scale_not_bool(cls, value: Any) -> Any:
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
    width: CustomSide | None = Field(
        None,
        description=f"A custom size instead of aspect_ratio and megapixels: the width in pixels "
        f"({MIN_SIDE}-{MAX_SIDE}, a multiple of {SIDE_MULTIPLE}); give height too.",
        examples=[1536],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    height: CustomSide | None = Field(
        None,
        description=f"The custom size's height in pixels ({MIN_SIDE}-{MAX_SIDE}, a multiple of "
        f"{SIDE_MULTIPLE}); give width too.",
        examples=[512],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    upscale_from: UpscaleSource | None = Field(
        None,
        description="Make a final from a draft: one output of your own finished prediction, "
        "resized to the target size (scale, or megapixels, or width and height) and refined at that "
        "size under the draft's own conditioning (its references, prompt, strength and crop, which "
        "fields given here override) and seed (unless one is given). No reference needed.",
        examples=[{"prediction": "abc123", "index": 0}],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    # An int checked against the choices, not a Literal: numbers may come as numeric
    # strings ("scale": "2"), as every other number of the input may.
    scale: Annotated[int, WithJsonSchema({"type": "integer", "enum": list(UPSCALE_SCALES)})] | None = Field(
        None,
        description="With upscale_from: the final's sides are this many times the draft's (default 2).",
        examples=[2],
        json_schema_extra={"x-fluxredux-advanced": True},
    )
    upscale_strength: float = Field(
        0.35,
        gt=0,
        le=1,
        description="With upscale_from: how far from the draft the final may go (1: a fresh image at "
        "the target size; low values keep the draft's composition and add detail).",
        examples=[0.35],
        json_schema_extra={"x-fluxredux-advanced": True},
    )

    loras: list[LoraUse] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"Style adapters (LoRA) to run with, up to {MAX_LORAS}, each with its scale "
        f"({MIN_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, default 1).",
        examples=[[{"name": "watercolor", "scale": 0.8}]],
        json_schema_extra={"x-fluxredux-kind": "loras", "x-fluxredux-advanced": True},
    )

    preview: StrictBool = Field(
        False,
        description="Show the image as it denoises: each step's preview (a small JPEG, from TAEF1) "
        "in the event stream and as progress.preview while it runs. Needs the previews' weights "
        "on the worker (fluxredux download --previews).",
        json_schema_extra={"x-fluxredux-advanced": True},
    )

    @field_validator(
        "num_outputs",
        "num_inference_steps",
        "seed",
        "output_quality",
        "width",
        "height",
        "scale",
        mode="before",
    )
    @classmethod
    def _integer_not_bool(cls, value: Any) -> Any:
        return no_bool(value, "int_type")

    @field_validator("scale")
    @classmethod
    def _scale_is_a_choice(cls, value: int | None) -> int | None:
        if value is not None and value not in UPSCALE_SCALES:
            raise ValueError(f"must be one of {', '.join(map(str, UPSCALE_SCALES))}")
        return value

    @field_validator("redux_strength", "upscale_strength", mode="before")
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

    @field_validator("loras")
    @classmethod
    def _no_loras_is_none(cls, value: list[LoraUse] | None) -> list[LoraUse] | None:
        # An empty list (an emptied form) is no adapter: the prediction runs, and is
        # recorded, exactly as one that never named the field.
        return value or None

    @field_validator("redux_images")
    @classmethod
    def _some_weight(cls, value: list[WeightedImage] | None) -> list[WeightedImage] | None:
        if value is not None and not any(item.weight > 0 for item in value):
            raise ValueError("at least one weight must be above 0")
        return value

    @model_validator(mode="after")
    def _one_way_to_give_the_reference(self) -> PredictionInput:
        # Custom error types: field_errors() names the field each one is about.
        if self.redux_image is not None and self.redux_images is not None:
            raise PydanticCustomError("reference_twice", "give redux_image or redux_images, not both")
        if self.redux_image is None and self.redux_images is None:
            if self.upscale_from is None and self.prompt is None:
                raise PydanticCustomError(
                    "reference_missing", "Field required (or give redux_images, or a prompt alone)"
                )
            if self.aspect_ratio == MATCH_INPUT and self.upscale_from is None:
                raise PydanticCustomError(
                    "match_input_without_reference", "match_input needs a reference image to match"
                )
        return self

    @model_validator(mode="after")
    def _one_way_to_give_the_size(self, info: ValidationInfo) -> PredictionInput:
        # What a caller sent; a recorded input (``from_record``) holds every field.
        given = set() if (info.context or {}).get("recorded") else self.model_fields_set
        if (self.width is None) != (self.height is None):
            missing = "height" if self.height is None else "width"
            raise PydanticCustomError(f"size_needs_{missing}", "width and height go together: give both")
        if self.width is not None and self.height is not None:
            for earlier in ("aspect_ratio", "megapixels"):
                if earlier in given:
                    raise PydanticCustomError("size_twice", f"give width and height, or {earlier}, not both")
            if self.width * self.height > MAX_AREA:
                raise PydanticCustomError(
                    "size_too_large",
                    f"width x height is {self.width * self.height:,} pixels; at most {MAX_AREA:,} (4 MP)",
                )
            if self.width * self.height * self.num_outputs > MAX_AREA:
                raise PydanticCustomError(
                    "outputs_too_large", _too_many_pixels(self.width, self.height, self.num_outputs)
                )
        if self.upscale_from is None:
            for field in ("scale", "upscale_strength"):
                if field in given:
                    raise PydanticCustomError(f"{field}_without_upscale", f"{field} needs upscale_from")
        elif "aspect_ratio" in given:
            raise PydanticCustomError(
                "aspect_ratio_with_upscale",
                "a final keeps its draft's proportions: give scale, megapixels, or width and height",
            )
        elif self.scale is not None and ("megapixels" in given or self.width is not None):
            raise PydanticCustomError("scale_twice", "give scale, or megapixels, or width and height: one")
        return self

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> PredictionInput:
        """An input as a prediction recorded it (``model_dump``: every field, defaults
        included). The checks of what a caller may send together (a custom size with an
        aspect ratio, ...) were made at create and are not repeated: a dump holds both."""
        return cls.model_validate(recorded, context={"recorded": True})

    @property
    def references(self) -> list[tuple[str, float]]:
        """Every reference with its share of the mix (normalised weights, summing to 1);
        none for a prompt alone (or an upscale that takes its draft's)."""
        if self.redux_images is None:
            return [] if self.redux_image is None else [(self.redux_image, 1.0)]
        total = sum(item.weight for item in self.redux_images)
        return [(item.image, item.weight / total) for item in self.redux_images]

    @property
    def custom_size(self) -> tuple[int, int] | None:
        """(width, height) when given as such."""
        if self.width is None or self.height is None:
            return None
        return self.width, self.height

    def size(self, reference: tuple[int, int] | None = None) -> tuple[int, int]:
        """(width, height) of each generated image; ``reference`` is the reference image's
        (width, height), which ``match_input`` needs. (An upscale's is ``upscaled_size``.)"""
        return self.custom_size or output_size(self.aspect_ratio, self.megapixels, reference)

    def upscaled_size(self, draft: tuple[int, int]) -> tuple[int, int]:
        """The final's (width, height) from a ``draft`` of that size: width and height as
        given, or its sides times scale, or (scale None) the draft's proportions at
        megapixels. (A create makes the choice explicit: ``with_upscale_scale``.)
        ValueError naming the field when it is past MAX_AREA."""
        if self.custom_size is not None:
            return self.custom_size
        if self.scale is not None:
            width, height = draft[0] * self.scale, draft[1] * self.scale
            field = "scale"
        else:
            width, height = _matching_size(draft, 1024 * 1024 if self.megapixels == "1" else 512 * 512)
            field = "megapixels"
        if width * height > MAX_AREA:
            raise ValueError(
                f"{field}: the final would be {width}x{height} ({width * height:,} pixels); at most "
                f"{MAX_AREA:,} (4 MP)"
            )
        if width * height * self.num_outputs > MAX_AREA:
            raise ValueError(f"num_outputs: {_too_many_pixels(width, height, self.num_outputs)}")
        return width, height

    def with_upscale_scale(self) -> PredictionInput:
        """This upscale with its size choice made explicit, as it is recorded: scale 2 when
        the caller chose neither a scale, nor megapixels, nor width and height."""
        if self.upscale_from is None or self.scale is not None or self.custom_size is not None:
            return self
        if "megapixels" in self.model_fields_set:
            return self
        return self.model_copy(update={"scale": 2})


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
_ABOUT = {
    "reference_missing": ("redux_image",),
    "reference_twice": ("redux_images",),
    "match_input_without_reference": ("aspect_ratio",),
    "size_needs_width": ("width",),
    "size_needs_height": ("height",),
    "size_twice": ("width",),
    "size_too_large": ("height",),
    "scale_without_upscale": ("scale",),
    "upscale_strength_without_upscale": ("upscale_strength",),
    "scale_twice": ("scale",),
    "aspect_ratio_with_upscale": ("aspect_ratio",),
    "outputs_too_large": ("num_outputs",),
}


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

"""Command-line flags generated from the input model, so they can never drift from it.

Every field of PredictionInput except the image becomes ``--field-name``; its help
(value type, choices, range, default) comes from the model's JSON schema, and its value
is validated by the model itself, so a bad flag gets the same message the API gives.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from fluxredux.cli.options import Expansion, expand
from fluxredux.errors import InvalidInput
from fluxredux.schema import FieldError, PredictionInput, field_errors

F = TypeVar("F", bound=Callable[..., Any])

# Fields given another way than a flag: the image is the positional argument, and
# ``run --preview DIR`` names where the previews go (it sets preview).
NOT_FLAGS = frozenset({"redux_image", "preview"})


def _is_json(schema: dict[str, Any]) -> bool:
    """A list or an object (a nested model is a ``$ref``), alone or or-None."""
    return any(
        s.get("type") in ("array", "object") or "$ref" in s for s in [schema, *schema.get("anyOf", [])]
    )


# Fields whose value is a list or an object (redux_images, upscale_from): their flag takes
# it as JSON.
JSON_FLAGS = frozenset(
    name for name, schema in PredictionInput.model_json_schema()["properties"].items() if _is_json(schema)
)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


# The metavar of each JSON schema type, in the style typer gives its own typed options
# (``--server <str>``, ``-o <path>``), so ``--help`` says a flag takes a number.
_METAVARS = {"integer": "<int>", "number": "<float>", "string": "<str>", "array": "<json>"}
# Choices longer than this (aspect_ratio's twelve) are left to the help text: in the
# metavar they would push every flag's help onto a line of its own.
_MAX_CHOICES_METAVAR = 12


def _choices(schema: dict[str, Any]) -> list[Any] | None:
    """The field's choices, also those of an or-None one (``Literal[2, 4] | None``)."""
    return next((s["enum"] for s in [schema, *schema.get("anyOf", [])] if s.get("enum")), None)


# The fields given as flags.
FLAG_FIELDS = frozenset(PredictionInput.model_fields) - NOT_FLAGS


def _metavar(schema: dict[str, Any]) -> str:
    """What ``--help`` shows a flag takes: its choices when they are short, else its type
    (for ``int | None``, the non-null one)."""
    choices = _choices(schema)
    if choices:
        shown = "|".join(str(c) for c in choices)
        return f"<{shown}>" if len(shown) <= _MAX_CHOICES_METAVAR else "<choice>"
    if _is_json(schema):
        return "<json>"
    types = [schema.get("type"), *(s.get("type") for s in schema.get("anyOf", []))]
    return next((_METAVARS[t] for t in types if t in _METAVARS), "<str>")


def _help(schema: dict[str, Any]) -> str:
    parts = [schema.get("description", "")]
    choices = _choices(schema)
    if choices:
        parts.append("One of: " + ", ".join(str(c) for c in choices) + ".")
    if "minimum" in schema and "maximum" in schema and schema["maximum"] < 2**32:
        parts.append(f"Range {schema['minimum']}-{schema['maximum']}.")
    if schema.get("default") is not None:
        parts.append(f"Default: {schema['default']}.")
    if _is_json(schema) and schema.get("examples"):
        parts.append(f"As JSON, e.g. '{json.dumps(schema['examples'][0])}'.")
    return " ".join(p for p in parts if p)


def _flag_parameters() -> list[inspect.Parameter]:
    properties = PredictionInput.model_json_schema()["properties"]
    params = []
    for name, field in PredictionInput.model_fields.items():
        if name in NOT_FLAGS:
            continue
        schema = properties[name]
        is_bool = field.annotation is bool
        # The value reaches the model as typed (a numeric string is a number to it), so
        # a bad one gets the API's message, every bad flag at once; the metavar shows
        # what it takes.
        metavar = None if is_bool else _metavar(schema)
        option = typer.Option(
            flag_name(name), help=_help(schema), metavar=metavar, rich_help_panel="Model inputs"
        )
        # Every flag defaults to None ("not given"), so the model's own defaults apply.
        value_type = bool | None if is_bool else str | None
        annotation = Annotated[value_type, option]  # type: ignore[valid-type]  # built at run time
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return params


def with_input_flags(func: F) -> F:
    """Add the input flags to a typer command, in place of its ``inputs`` parameter; it
    receives them as ``inputs: dict`` (only those given)."""
    flags = Expansion(_flag_parameters(), lambda values: {k: v for k, v in values.items() if v is not None})
    return expand(func, {"inputs": flags})


# The image is given apart from the flags; this placeholder only lets the input model
# validate the flags (it accepts any data: URI).
IMAGE_PLACEHOLDER = "data:,image-given-apart"


def parse_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags as the input model takes them: JSON ones decoded (an error names the flag)."""
    parsed = dict(flags)
    for name in JSON_FLAGS & parsed.keys():
        try:
            parsed[name] = json.loads(parsed[name])
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{flag_name(name)}: not valid JSON ({exc.msg})") from None
    return parsed


def check_reference_choice(image_given: bool, flags: dict[str, Any]) -> None:
    """One positional IMAGE, or several references with --redux-images, not both; or
    neither, for a prompt alone (text to image) or a final made from a draft
    (--upscale-from: the draft's references are the final's)."""
    listed = "redux_images" in flags
    if image_given and listed:
        raise InvalidInput("give a reference IMAGE, or several with --redux-images (not both)")
    prompt = flags.get("prompt")
    prompted = isinstance(prompt, str) and bool(prompt.strip())  # a blank one is no prompt
    if not (image_given or listed or prompted or "upscale_from" in flags):
        raise InvalidInput("give a reference IMAGE (or several with --redux-images), or a --prompt alone")


def validate_flags(flags: dict[str, Any], *, image_given: bool = True) -> PredictionInput:
    """The (parsed) flags checked by the input model itself; errors name the flag.

    The images are checked apart (local files here, not what the API takes): the
    positional one (when ``image_given``), or each of --redux-images, stands in as a
    placeholder."""
    given: dict[str, Any] = {"redux_image": IMAGE_PLACEHOLDER} if image_given else {}
    listed = flags.get("redux_images")
    if listed is not None:
        given = {}
        if isinstance(listed, list):
            # Only a given image (a string) stands in: a missing or non-string one is left
            # for the model to name (``--redux-images 0.image: Field required``).
            stand_in = [
                {**item, "image": IMAGE_PLACEHOLDER}
                if isinstance(item, dict) and isinstance(item.get("image"), str)
                else item
                for item in listed
            ]
            flags = {**flags, "redux_images": stand_in}
    try:
        return PredictionInput(**given, **flags)
    except ValidationError as exc:
        raise InvalidInput("; ".join(_named(e, flags) for e in field_errors(exc))) from None


def _named(error: FieldError, flags: dict[str, Any]) -> str:
    """The error with its field named as the flag that gave it (``--redux-images 0.weight``),
    or that is missing (``--height``, when only --width was given)."""
    head, _, rest = error.field.partition(".")
    if head not in flags and head not in FLAG_FIELDS:
        return str(error)
    return f"{flag_name(head)}{' ' + rest if rest else ''}: {error.message}"

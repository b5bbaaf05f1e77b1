"""Command-line flags generated from the input model, so they can never drift from it.

Every field of PredictionInput except the image becomes ``--field-name``; its help
(choices, range, default) comes from the model's JSON schema, and its value is
validated by the model itself, so a bad flag gets the same message the API gives.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from fluxredux.errors import InvalidInput
from fluxredux.schema import PredictionInput, field_errors

F = TypeVar("F", bound=Callable[..., Any])

# Fields given another way than a flag: the image is the positional argument. Several
# weighted references have no command-line form yet (the API and the client take them).
NOT_FLAGS = frozenset({"redux_image", "redux_images"})


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _help(schema: dict[str, Any]) -> str:
    parts = [schema.get("description", "")]
    choices = schema.get("enum")
    if choices:
        parts.append("One of: " + ", ".join(str(c) for c in choices) + ".")
    if "minimum" in schema and "maximum" in schema and schema["maximum"] < 2**32:
        parts.append(f"Range {schema['minimum']}-{schema['maximum']}.")
    if schema.get("default") is not None:
        parts.append(f"Default: {schema['default']}.")
    return " ".join(p for p in parts if p)


def _flag_parameters() -> list[inspect.Parameter]:
    properties = PredictionInput.model_json_schema()["properties"]
    params = []
    for name, field in PredictionInput.model_fields.items():
        if name in NOT_FLAGS:
            continue
        schema = properties[name]
        is_bool = field.annotation is bool
        option = typer.Option(flag_name(name), help=_help(schema), rich_help_panel="Model inputs")
        # Every flag defaults to None ("not given"), so the model's own defaults apply.
        value_type = bool | None if is_bool else str | None
        annotation = Annotated[value_type, option]  # type: ignore[valid-type]  # built at run time
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return params


def with_input_flags(func: F) -> F:
    """Add the input flags to a typer command; it receives them as ``inputs: dict``."""
    flag_params = _flag_parameters()
    flag_names = {p.name for p in flag_params}
    signature = inspect.signature(func)
    # Resolve the command's own (string, postponed) annotations where they were written,
    # so typer sees real types and Annotated options on the wrapper.
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != "inputs"
    ]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in flag_names}
        return func(inputs={k: v for k, v in inputs.items() if v is not None}, **kwargs)

    new_params = own + flag_params
    wrapper.__signature__ = signature.replace(parameters=new_params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new_params}
    return wrapper  # type: ignore[return-value]


# The image is given apart from the flags; this placeholder only lets the input model
# validate the flags (it accepts any data: URI).
IMAGE_PLACEHOLDER = "data:,image-given-apart"


def validate_flags(flags: dict[str, Any]) -> PredictionInput:
    """The flags checked by the input model itself; errors name the flag."""
    try:
        return PredictionInput(redux_image=IMAGE_PLACEHOLDER, **flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{flag_name(e.field)}: {e.message}" if e.field in flags else str(e) for e in field_errors(exc)
        )
        raise InvalidInput(problems) from None

"""The ONE mapping from errors to HTTP responses.

Domain errors carry a code and a message; here they get a status and a body, in the
shape of the API surface the request came to (chosen by its path, see ``surface_of``):

- Eachlabs (``/v1/prediction/...`` and the rest): ``{"error": "<message>", "code":
  "<machine-readable>", ...detail}``, invalid input a 400.
- Replicate (``/v1/predictions``, ``/v1/models/...``, ``/v1/files/{id}``,
  ``/v1/webhooks/...``): RFC 7807 problem details ``{"title", "detail", "status"}`` (what
  the official client reads into ``ReplicateError``) plus the same ``code`` and detail
  keys; invalid input a 422, an unknown model a 404.
- ``POST /v1/files``, which both surfaces' clients call: both shapes in one body.

Anything unexpected is logged with its stack trace and answered with a generic 500 that
reveals nothing.
"""

from __future__ import annotations

import email.message
import json
import logging
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxredux import errors
from fluxredux.schema import error_field, shorten

log = logging.getLogger(__name__)

# An error names the bad value or field, never all of it: a 30 MB field (or JSON key)
# must come back as a small 400, not as a 30 MB echo.
MAX_MESSAGE_CHARS = 2048
MAX_DETAIL_CHARS = 256
# A body with a million unknown keys is one mistake, not a million-line answer.
MAX_FIELD_ERRORS = 20

Surface = Literal["eachlabs", "replicate", "shared"]

# The paths of the Replicate-compatible surface. ``/v1/prediction/`` (Eachlabs) is not
# among them: it does not start with ``/v1/predictions``.
_REPLICATE_PATHS = ("/v1/predictions", "/v1/models/", "/v1/webhooks/", "/v1/files/")
_SHARED_PATHS = ("/v1/files",)


def surface_of(path: str) -> Surface:
    """Which API surface a request path belongs to: it decides the error shape."""
    if path in _SHARED_PATHS:
        return "shared"
    return "replicate" if path.startswith(_REPLICATE_PATHS) else "eachlabs"


JSON = "application/json"


class UnsupportedMediaType(errors.ClientError):
    """A JSON route's body came without ``Content-Type: application/json``: curl's ``-d``
    sends ``application/x-www-form-urlencoded``, and FastAPI then reads the body as bytes
    and answers that it is not an object. Here the answer says what to send instead."""

    code = "unsupported_media_type"

    def __init__(self, received: str | None) -> None:
        sent = f"this one came as {shorten(received, MAX_DETAIL_CHARS)}" if received else "this one had none"
        super().__init__(
            f"the request body must be JSON, sent with the header 'Content-Type: {JSON}' ({sent}); "
            f"with curl, add -H 'Content-Type: {JSON}'",
            header="Content-Type",
            expected=JSON,
        )


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON, as FastAPI decides it: application/json or
    application/*+json, parameters (charset) aside."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


# Most specific first: the first matching class decides.
STATUS_BY_ERROR: list[tuple[type[errors.FluxReduxError], int]] = [
    (errors.PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (errors.IdempotencyConflict, 409),
    (errors.TooManyShares, 409),
    (errors.ImageFileNotFound, 404),
    (errors.ClientError, 400),
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.RateLimited, 429),
    (errors.QueueFull, 503),
    (errors.WeightsNotFound, 503),
    (errors.ModelUnavailable, 503),
    (errors.Unavailable, 503),
]


def status_for(exc: errors.FluxReduxError, surface: Surface = "eachlabs") -> int:
    status = next((status for cls, status in STATUS_BY_ERROR if isinstance(exc, cls)), 500)
    if surface == "replicate":
        # Replicate answers an unknown model with 404 and a bad input with 422.
        if isinstance(exc, errors.UnknownModel):
            return 404
        if status == 400:
            return 422
    return status


# Replicate's title for 422; the other titles are the statuses' reason phrases.
_TITLES = {422: "Input validation failed"}


def problem_title(status: int) -> str:
    return _TITLES.get(status) or HTTPStatus(status).phrase


def error_body(exc: errors.FluxReduxError) -> dict[str, Any]:
    """``exc.to_dict()`` with every string cut short: domain errors quote what they were
    given (an unknown model, a cursor, an id from the path)."""
    body = exc.to_dict()
    for key, value in body.items():
        if isinstance(value, str):
            body[key] = shorten(value, MAX_MESSAGE_CHARS if key == "error" else MAX_DETAIL_CHARS)
    return body


def shaped_body(body: dict[str, Any], status: int, surface: Surface) -> dict[str, Any]:
    """An Eachlabs error body (``{"error", "code", ...}``) in the surface's shape."""
    if surface == "eachlabs":
        return body
    problem = {"title": problem_title(status), "detail": body.get("error", ""), "status": status}
    if surface == "shared":
        return {**body, **problem}
    rest = {key: value for key, value in body.items() if key != "error"}
    return {**problem, **rest}


def error_response(exc: errors.FluxReduxError, surface: Surface = "eachlabs") -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None) or exc.detail.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    status = status_for(exc, surface)
    return JSONResponse(shaped_body(error_body(exc), status, surface), status_code=status, headers=headers)


def _validation_fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    fields = []
    for err in exc.errors()[:MAX_FIELD_ERRORS]:
        loc = [part for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":
            loc = ["body"]  # its location is a character position, not a field
        # No field at all: the body as a whole (missing, or not an object).
        field = shorten(error_field(loc, str(err.get("type"))) or "body", MAX_DETAIL_CHARS)
        if err.get("type") == "extra_forbidden":
            message = f"unknown field '{field}'"
        else:
            message = shorten(str(err.get("msg", "invalid")).removeprefix("Value error, "), MAX_DETAIL_CHARS)
        fields.append({"field": field, "message": message, "type": err.get("type")})
    return fields


def _body_not_sent_as_json(request: Request, exc: RequestValidationError) -> bool:
    """A JSON route's body that was there but not declared JSON: FastAPI hands the route
    the raw bytes then, and they fail as "not an object". A body that was declared JSON
    (an array, say) or not sent at all is an invalid input as usual."""
    if is_json(request.headers.get("content-type")):
        return False
    return any(
        tuple(err.get("loc", ())) == ("body",) and err.get("type") != "missing" for err in exc.errors()
    )


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. input.num_outputs.")
    message: str
    type: str | None = Field(None, description="pydantic's error type, e.g. int_parsing.")


class ErrorBody(BaseModel):
    """Every error answer. ``code`` is stable and machine-readable; more keys may follow."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="What went wrong, in words a user can act on.")
    code: str = Field(
        description="invalid_input, unknown_model, image_* and url_* reasons, unauthorized, "
        "not_found, payload_too_large, unsupported_media_type, rate_limited, queue_full, ..."
    )
    fields: list[FieldProblem] | None = Field(None, description="invalid_input: one entry per invalid field.")
    retry_after: int | None = Field(None, description="429 and 503: seconds until a retry may succeed.")


class Problem(BaseModel):
    """Every error answer of the Replicate-compatible surface: RFC 7807 problem details,
    plus the machine-readable ``code`` (and ``fields`` for invalid input) of ``ErrorBody``."""

    model_config = ConfigDict(extra="allow")

    title: str = Field(description="A short summary of the kind of problem.")
    detail: str = Field(description="What went wrong, in words a user can act on.")
    status: int = Field(description="The HTTP status.")
    code: str = Field(description="Machine-readable, as in ErrorBody.")
    fields: list[FieldProblem] | None = Field(None, description="Input errors: one entry per invalid field.")
    retry_after: int | None = Field(None, description="429 and 503: seconds until a retry may succeed.")


_ERROR_DESCRIPTIONS = {
    400: "Invalid input (each field named), an unusable image or URL (the specific reason in `code`)",
    401: "Missing, unknown or revoked API key",
    404: "No such prediction or file (or not yours)",
    409: "The Idempotency-Key was used before with a different request, or the prediction has as many "
    "share links as it may (`too_many_shares`, its `limit` given)",
    413: "Request body over the server's limit",
    415: "The body was not sent as JSON: send it with `Content-Type: application/json`",
    422: "Invalid input (each field named in `detail` and `fields`), an unusable image or URL",
    429: "Over a per-key limit; retry after `Retry-After` seconds",
    503: "Queue full or the server cannot take work now; retry after `Retry-After` seconds",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for routes (or routers) that can answer these errors, so
    generated clients know every status and the shape of the error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[status] = entry
    return responses


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``error_responses`` for the Replicate-compatible surface: the ``Problem`` body."""
    responses = error_responses(*statuses)
    for entry in responses.values():
        entry["model"] = Problem
    if 400 in responses:  # here, invalid input is a 422: a 400 is a body that cannot be read at all
        responses[400]["description"] = "A request that cannot be read at all (e.g. a body nested too deeply)"
    return responses


def _ref(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}


def _validation_errors_as_answered(schema: dict[str, Any]) -> None:
    """FastAPI documents request validation as 422 with its own body; this app answers
    400 with ``ErrorBody`` on the Eachlabs surface and 422 with ``Problem`` on the
    Replicate one (see ``_invalid``), so the schema says that instead; and an operation
    that takes a JSON body can answer 415 (the body not sent as JSON)."""
    for path, operations in schema.get("paths", {}).items():
        replicate = surface_of(path) == "replicate"
        for operation in operations.values():
            responses = operation.get("responses", {})
            if JSON in operation.get("requestBody", {}).get("content", {}) and "415" not in responses:
                model = "Problem" if replicate else "ErrorBody"
                responses["415"] = {"description": _ERROR_DESCRIPTIONS[415], "content": _ref(model)}
            if responses.pop("422", None) is None:
                continue
            status, model = ("422", "Problem") if replicate else ("400", "ErrorBody")
            if status not in responses:
                responses[status] = {"description": _ERROR_DESCRIPTIONS[int(status)], "content": _ref(model)}
    components = schema.get("components", {}).get("schemas", {})
    for name, model_class in (("ErrorBody", ErrorBody), ("Problem", Problem)):
        if name not in components:
            defs = model_class.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(defs.pop("$defs", {}))
            components[name] = defs
    schema.setdefault("components", {})["schemas"] = components
    text = json.dumps(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in text:
            components.pop(unused, None)


class ErrorDocumentingFastAPI(FastAPI):
    """FastAPI whose OpenAPI schema documents the errors as this app answers them."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:  # FastAPI caches the schema it generates; fix it once
            _validation_errors_as_answered(super().openapi())
        return self.openapi_schema or {}


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.FluxReduxError)
    async def _domain(request: Request, exc: errors.FluxReduxError) -> JSONResponse:
        if status_for(exc) >= 500 and not isinstance(exc, errors.QueueFull):
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc, surface_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _body_not_sent_as_json(request, exc):
            return error_response(
                UnsupportedMediaType(request.headers.get("content-type")), surface_of(request.url.path)
            )
        fields = _validation_fields(exc)
        summary = "; ".join(f"{f['field']}: {f['message']}" if f["field"] else f["message"] for f in fields)
        if len(exc.errors()) > len(fields):
            summary += f"; and {len(exc.errors()) - len(fields):,} more"
        error = errors.InvalidInput(f"invalid request: {summary}", fields=fields)
        return error_response(error, surface_of(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": shorten(str(exc.detail), MAX_MESSAGE_CHARS), "code": code}
        # The exception's headers matter: Allow on a 405, WWW-Authenticate and the like.
        return JSONResponse(
            shaped_body(body, exc.status_code, surface_of(request.url.path)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"error": "internal server error", "code": "internal"}
        return JSONResponse(shaped_body(body, 500, surface_of(request.url.path)), status_code=500)

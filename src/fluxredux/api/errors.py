"""The ONE mapping from errors to HTTP responses.

Domain errors carry a code and a message; here they get a status. Every error body is
``{"error": "<message>", "code": "<machine-readable>", ...detail}``. Anything unexpected
is logged with its stack trace and answered with a generic 500 that reveals nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxredux import errors
from fluxredux.schema import field_path, shorten

log = logging.getLogger(__name__)

# An error names the bad value or field, never all of it: a 30 MB field (or JSON key)
# must come back as a small 400, not as a 30 MB echo.
MAX_MESSAGE_CHARS = 2048
MAX_DETAIL_CHARS = 256
# A body with a million unknown keys is one mistake, not a million-line answer.
MAX_FIELD_ERRORS = 20

# Most specific first: the first matching class decides.
STATUS_BY_ERROR: list[tuple[type[errors.FluxReduxError], int]] = [
    (errors.PayloadTooLarge, 413),
    (errors.ClientError, 400),
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.RateLimited, 429),
    (errors.QueueFull, 503),
    (errors.WeightsNotFound, 503),
    (errors.ModelUnavailable, 503),
    (errors.Unavailable, 503),
]


def status_for(exc: errors.FluxReduxError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: errors.FluxReduxError) -> dict[str, Any]:
    """``exc.to_dict()`` with every string cut short: domain errors quote what they were
    given (an unknown model, a cursor, an id from the path)."""
    body = exc.to_dict()
    for key, value in body.items():
        if isinstance(value, str):
            body[key] = shorten(value, MAX_MESSAGE_CHARS if key == "error" else MAX_DETAIL_CHARS)
    return body


def error_response(exc: errors.FluxReduxError) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None) or exc.detail.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)


def _validation_fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    fields = []
    for err in exc.errors()[:MAX_FIELD_ERRORS]:
        field = shorten(field_path(part for part in err.get("loc", ()) if part != "body"), MAX_DETAIL_CHARS)
        if err.get("type") == "extra_forbidden":
            message = f"unknown field '{field}'"
        else:
            message = shorten(str(err.get("msg", "invalid")).removeprefix("Value error, "), MAX_DETAIL_CHARS)
        fields.append({"field": field, "message": message, "type": err.get("type")})
    return fields


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
        "not_found, payload_too_large, rate_limited, queue_full, ..."
    )
    fields: list[FieldProblem] | None = Field(None, description="invalid_input: one entry per invalid field.")
    retry_after: int | None = Field(None, description="429 and 503: seconds until a retry may succeed.")


_ERROR_DESCRIPTIONS = {
    400: "Invalid input (each field named), an unusable image or URL (the specific reason in `code`)",
    401: "Missing, unknown or revoked API key",
    404: "No such prediction or file (or not yours)",
    413: "Request body over the server's limit",
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


def _validation_errors_are_400(schema: dict[str, Any]) -> None:
    """FastAPI documents request validation as 422 with its own body; this app answers
    400 with ``ErrorBody`` (see ``_invalid``), so the schema says that instead."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {
                    "description": _ERROR_DESCRIPTIONS[400],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    components = schema.get("components", {}).get("schemas", {})
    if "ErrorBody" not in components:
        defs = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(defs.pop("$defs", {}))
        components["ErrorBody"] = defs
        schema.setdefault("components", {})["schemas"] = components
    text = json.dumps(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in text:
            components.pop(unused, None)


class ErrorDocumentingFastAPI(FastAPI):
    """FastAPI whose OpenAPI schema documents the errors as this app answers them."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:  # FastAPI caches the schema it generates; fix it once
            _validation_errors_are_400(super().openapi())
        return self.openapi_schema or {}


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.FluxReduxError)
    async def _domain(request: Request, exc: errors.FluxReduxError) -> JSONResponse:
        if status_for(exc) >= 500 and not isinstance(exc, errors.QueueFull):
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _validation_fields(exc)
        summary = "; ".join(f"{f['field']}: {f['message']}" if f["field"] else f["message"] for f in fields)
        if len(exc.errors()) > len(fields):
            summary += f"; and {len(exc.errors()) - len(fields):,} more"
        error = errors.InvalidInput(f"invalid request: {summary}", fields=fields)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # The exception's headers matter: Allow on a 405, WWW-Authenticate and the like.
        return JSONResponse(
            {"error": shorten(str(exc.detail), MAX_MESSAGE_CHARS), "code": code},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)

"""The ONE mapping from errors to HTTP responses.

Domain errors carry a code and a message; here they get a status. Every error body is
``{"error": "<message>", "code": "<machine-readable>", ...detail}``. Anything unexpected
is logged with its stack trace and answered with a generic 500 that reveals nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxredux import errors

log = logging.getLogger(__name__)

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
]


def status_for(exc: errors.FluxReduxError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: errors.FluxReduxError) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(exc.to_dict(), status_code=status_for(exc), headers=headers)


def _validation_fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    fields = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        field = ".".join(loc)
        if err.get("type") == "extra_forbidden":
            message = f"unknown field '{field}'"
        else:
            message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        fields.append({"field": field, "message": message, "type": err.get("type")})
    return fields


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
        error = errors.InvalidInput(f"invalid request: {summary}", fields=fields)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": str(exc.detail), "code": code}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)

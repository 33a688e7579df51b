"""Domain errors become HTTP answers here, and only here. Every error body is ``{"error", "message"}``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import errors
from shared.models import ErrorBody
from shared.routes import allowed_methods

log = logging.getLogger(__name__)

_STATUS: dict[type[errors.FleetError], int] = {
    errors.NoCapacity: 503,
    errors.NoMatchingWorker: 503,
    errors.StoreUnavailable: 503,
    errors.SessionPending: 503,
    errors.WorkerUnknown: 404,
    errors.SessionNotFound: 404,
    errors.WorkerConflict: 409,
    errors.WorkerAlive: 409,
    errors.SessionKeyInUse: 409,
    errors.WorkerCredentialInvalid: 403,
    errors.RateLimited: 429,
}

def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` documenting these status codes with the error body."""
    return {code: {"model": ErrorBody} for code in codes}


def error_response(status: int, code: str, message: str, *, retry_after_s: float | None = None,
                   headers: Mapping[str, str] | None = None, **extra: object) -> JSONResponse:
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=all_headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.FleetError)
    async def _domain(_: Request, exc: errors.FleetError) -> JSONResponse:
        status = _STATUS.get(type(exc), 400)
        retry = getattr(exc, "retry_after_s", None) or (1.0 if exc.retryable else None)
        return error_response(status, exc.code, exc.message, retry_after_s=retry)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, detail = errors.describe_invalid(exc.errors())
        return error_response(422, "invalid_request", message, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return error_response(exc.status_code, errors.http_error_code(exc.status_code),
                              errors.describe_http_error(str(exc.detail), exc.__cause__), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "the hub could not handle this request")

"""Domain errors become HTTP answers here, and only here. Every error body is ``{"error", "message"}``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import errors
from shared.models import ErrorBody
from shared.routes import framework_answer

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

#: What each error status means, for the OpenAPI contract: the ``error`` codes a client may branch on.
ERROR_DESCRIPTIONS = {
    400: "`bad_request`: the body is not JSON the hub can read (invalid UTF-8, a number with too many digits, "
         "nesting too deep).",
    401: "`unauthorized`: no bearer token, or not this route's.",
    403: "`worker_credential_invalid`: the worker's `X-Worker-Secret` is missing or not its current one.",
    404: "`not_found`: no such route; or the resource's own code (`session_not_found`, `worker_unknown`).",
    409: "A conflict named by its code (`session_key_in_use`, `worker_conflict`, `worker_alive`).",
    413: "`body_too_large`: the body is over `FLEET_MAX_BODY_BYTES`.",
    422: "`invalid_request`: `message` says what is wrong with the first problem, `detail` lists up to ten.",
    429: "`rate_limited`: this client's request rate; try again after `Retry-After` seconds.",
    503: "The hub cannot answer now. With `Retry-After`, try again after it: `store_unavailable` (Redis), and for "
         "a session request `no_capacity` (no live worker with the labels has a free slot) or `session_pending` "
         "(another request is placing this `session_key`). Without it, `no_matching_worker`: no live worker has "
         "the labels asked for, and retrying soon will not change that.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again (absent on "
                                               "`no_matching_worker`).", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` documenting these status codes with the error body, what each means, and the
    ``Retry-After`` header where it comes."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code],
                   **({"headers": _RETRY_AFTER} if code in (429, 503) else {})} for code in codes}


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
        code, message, headers = framework_answer(app, request.scope, exc)
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error(request.scope, exc)


def unexpected_error(scope: Scope, exc: Exception) -> JSONResponse:
    """The answer to a bug or a library's surprise: logged for the SRE with its traceback; the caller learns nothing
    of its cause (the exception's text may carry a Redis URL with its password, a token, a path). The log names the
    route's template, not the path: a session's path holds its id, which ends the session."""
    route = getattr(scope.get("route"), "path", "an unrouted path")
    log.error("unhandled %s on %s %s", type(exc).__name__, scope.get("method"), route, exc_info=exc)
    return error_response(500, "internal_error", "the hub could not handle this request")


class UnexpectedErrorsInside:
    """Answers an unexpected error inside the middlewares added after it, rather than in the framework's outermost
    layer: the CORS middleware then adds its headers to the 500, and a page sees the hub's answer instead of a CORS
    failure that says nothing. A response already begun is left to the framework."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = False

        async def noting_the_start(message: Message) -> None:
            nonlocal began
            began = began or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_the_start)
        except Exception as exc:
            if began:
                raise
            await unexpected_error(scope, exc)(scope, receive, send)

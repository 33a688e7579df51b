"""The worker's HTTP API: hubs dispatch and stop sessions here; operators read health and metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from annotated_types import MaxLen
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.auth import bearer_token, secret_matches
from shared.body_limit import BodySizeLimit
from shared.errors import describe_invalid
from shared.models import ErrorBody, SessionDispatch, WorkerSessionInfo
from shared.routes import framework_answer
from worker.sessions import SessionManager, SessionRefused


def _longest(field: str) -> int:
    """The most characters a SessionDispatch takes in ``field``."""
    return next(m.max_length for m in SessionDispatch.model_fields[field].metadata if isinstance(m, MaxLen))


#: The largest body a hub sends a worker: a SessionDispatch with every field at its longest. The id and the token (a
#: JWT) are ASCII, a byte a character; any other character may take 6 bytes as JSON (``\u001f``); 1 KiB covers the
#: names and punctuation. About 15 KiB: a larger body is refused unread, before the token is checked.
MAX_BODY_BYTES = (_longest("session_id") + _longest("token")
                  + 6 * sum(map(_longest, ("session_key", "room", "livekit_url"))) + 1024)


class _ApiError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        self.status, self.error, self.message = status, error, message


def _error(status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "message": message}, headers=headers)


def create_worker_app(manager: SessionManager, worker_token: str,
                      status: Callable[[], Mapping[str, Any]] | None = None) -> FastAPI:
    """``status`` says what the agent knows at the moment (worker id, whether a hub holds its registration); GET
    /health shows it with the sessions."""
    # No redirect from a path with a trailing slash: it would answer an empty 307 instead of an error body.
    app = FastAPI(title="gpu-fleet worker", version="1.0.0", redirect_slashes=False)
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)

    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not secret_matches(bearer_token(authorization), worker_token):
            raise _ApiError(401, "unauthorized", "a valid worker bearer token is required")

    _install_error_handlers(app)
    errors: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 422: {"model": ErrorBody}}

    @app.post("/sessions", status_code=201, response_model=WorkerSessionInfo, dependencies=[Depends(require_token)],
              responses={**errors, 400: {"model": ErrorBody}, 409: {"model": ErrorBody}, 413: {"model": ErrorBody},
                         503: {"model": ErrorBody}})
    async def create_session(spec: SessionDispatch) -> WorkerSessionInfo:
        """Start a session if a local slot is free: 409 when full, draining or already running."""
        try:
            return await manager.start(spec)
        except SessionRefused as exc:
            status_code = 503 if exc.code == "engine_error" else 409
            code = "worker_full" if exc.code == "full" else exc.code
            raise _ApiError(status_code, code, exc.message) from None

    @app.delete("/sessions/{session_id}", status_code=204, dependencies=[Depends(require_token)],
                responses={**errors, 404: {"model": ErrorBody}})
    async def delete_session(session_id: str) -> Response:
        if not await manager.stop(session_id):
            raise _ApiError(404, "session_not_found", f"no session {session_id} here")
        return Response(status_code=204)

    @app.get("/sessions", response_model=list[WorkerSessionInfo], dependencies=[Depends(require_token)],
             responses=errors)
    async def list_sessions() -> list[WorkerSessionInfo]:
        return list(manager.sessions.values())

    @app.get("/health")
    async def get_health() -> dict[str, Any]:
        known = status() if status is not None else {}
        return {**known, "state": "draining" if manager.draining else "ready", "engine": manager.engine.name,
                "sessions": len(manager.sessions), "max_streams": manager.max_streams}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        manager.metrics.observe(manager.engine)
        return Response(generate_latest(manager.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    extra = manager.engine.router()
    if extra is not None:
        app.include_router(extra)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error body is ``{"error", "message"}``, as the hub's are."""

    @app.exception_handler(_ApiError)
    async def _api_error(_: Request, exc: _ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, detail = describe_invalid(exc.errors())
        return JSONResponse(status_code=422, content={"error": "invalid_request", "message": message, "detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, *framework_answer(app, request.scope, exc))

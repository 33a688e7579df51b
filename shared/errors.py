"""Small domain exceptions. The HTTP layer maps them to answers; nothing below it knows about HTTP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class FleetError(Exception):
    """Base of every domain error. ``code`` is the stable machine-readable error code."""

    code = "fleet_error"
    retryable = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()


class NoCapacity(FleetError):
    """No eligible worker has a free stream slot."""

    code = "no_capacity"
    retryable = True


class StoreUnavailable(FleetError):
    """The shared store (Redis) is unreachable; try again shortly."""

    code = "store_unavailable"
    retryable = True


class WorkerUnknown(FleetError):
    """The hub does not know this worker; it must register again."""

    code = "worker_unknown"


class WorkerConflict(FleetError):
    """A live worker already holds this id and the request does not carry its credential."""

    code = "worker_conflict"


class WorkerAlive(FleetError):
    """The worker is live: it would register again at its next heartbeat. Stop its process (or drain it) first."""

    code = "worker_alive"


class WorkerCredentialInvalid(FleetError):
    """The per-worker secret is missing or wrong."""

    code = "worker_credential_invalid"


class SessionNotFound(FleetError):
    """No live session has this id."""

    code = "session_not_found"


class SessionPending(FleetError):
    """Another request is still placing a session for this session_key; try again shortly."""

    code = "session_pending"
    retryable = True


class RateLimited(FleetError):
    """Too many session requests from this client; slow down."""

    code = "rate_limited"
    retryable = True

    def __init__(self, retry_after_s: float) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s


def describe_invalid(errors: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A 422 body's message and detail from pydantic's errors: where and why, never the offending input (it may
    be huge, binary or a secret, such as the LiveKit token in a dispatch)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in errors[:10]]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return (f"{where}: {first['msg']}" if where else str(first["msg"])), detail

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


class NoMatchingWorker(FleetError):
    """No worker in the fleet carries the labels asked for: no retry places the session until one registers."""

    code = "no_matching_worker"


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


class SessionKeyInUse(FleetError):
    """This session_key's live session belongs to another participant identity."""

    code = "session_key_in_use"


class RateLimited(FleetError):
    """Too many session requests from this client; slow down."""

    code = "rate_limited"
    retryable = True

    def __init__(self, retry_after_s: float) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s


def describe_problem(error: Mapping[str, Any]) -> str:
    """One of pydantic's errors as ``where: why`` (the request's ``body`` is not a place worth naming), never the
    offending input: it may be huge, binary or a secret, such as the LiveKit token in a dispatch."""
    loc, kind = tuple(error.get("loc", ())), error.get("type")
    if kind == "json_invalid":  # its loc is ("body", <character offset>), which read like a field name
        at = next((p for p in loc if isinstance(p, int)), None)
        return "the body is not valid JSON" + (f" (at character {at})" if at is not None else "")
    if loc == ("body",) and kind in _NOT_AN_OBJECT:  # most often a JSON body sent without its Content-Type
        return "the body must be a JSON object, sent with Content-Type: application/json"
    where = ".".join(str(p) for p in loc if p != "body")
    return f"{where}: {reason(error)}" if where else reason(error)


def reason(error: Mapping[str, Any]) -> str:
    """Why pydantic refused a value: its message, less the "Value error, " it puts before what one of our
    validators said."""
    return str(error.get("msg", "")).removeprefix("Value error, ")


#: pydantic's error types for a body that is not an object at all.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")


def describe_problems(errors: Sequence[Mapping[str, Any]]) -> str:
    """Every one of pydantic's errors, as ``describe_problem`` writes each, on one line."""
    return "; ".join(describe_problem(e) for e in errors)


def describe_invalid(errors: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A 422 body's message (the first problem) and detail (the first ten) from pydantic's errors."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in errors[:10]]
    return (describe_problem(detail[0]) if detail else "invalid request"), detail


#: Error codes of the answers the HTTP framework gives by itself, by status; the hub's and the worker's alike.
HTTP_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                    405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}

#: What FastAPI answers (400) for a JSON body its parser raised on with anything but a syntax error.
UNREADABLE_BODY_DETAIL = "There was an error parsing the body"


def http_error_code(status: int) -> str:
    return HTTP_ERROR_CODES.get(status, f"http_{status}")


def describe_http_error(detail: str, cause: BaseException | None) -> str:
    """The message of a framework's error answer: its own, unless it is the catch-all for a body the JSON parser
    raised on (``cause``), which says why without quoting the body."""
    if detail != UNREADABLE_BODY_DETAIL or cause is None:
        return detail
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int("9" * 5000): Python's conversion limit
        return "a number in the body has too many digits"
    return "the body could not be read as JSON"

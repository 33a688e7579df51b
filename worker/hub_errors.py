"""What can go wrong talking to a hub, and how to say it without giving a secret away."""

from __future__ import annotations

from pydantic import ValidationError

from shared.errors import reason


class HubUnavailable(Exception):
    """No hub answered usefully; retryable."""


class WorkerForgotten(Exception):
    """The hub does not know this worker (404) or refused its secret (403): register again."""


def describe_error(exc: BaseException) -> str:
    """An error for logs and messages. Never ``repr``: aiohttp's response errors carry the request's headers there,
    and those hold the worker token and secret. Nor a validation error's text: it quotes the input, and a
    registration answer holds the worker secret."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'answer'}: {reason(error)}"
                             for error in exc.errors(include_url=False, include_input=False, include_context=False))
        return f"{type(exc).__name__}: {problems}"
    return f"{type(exc).__name__}: {exc}"

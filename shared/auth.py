"""Secret handling shared by hub and worker: constant-time checks and one-way digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: Values a production deployment must replace; dev mode may use them.
DEFAULT_WORKER_TOKEN = "dev-worker-token"  # noqa: S105 - refused in prod
DEFAULT_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105 - refused in prod


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def secret_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing value never matches."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the hub stores instead of a per-worker secret."""
    return hashlib.sha256(secret.encode()).hexdigest()

"""The embedded redis-server: a server that cannot start says so at once, with its exit code."""

from __future__ import annotations

import pytest

from shared.redis_server import EmbeddedRedis


def test_a_server_that_exits_at_start_is_reported_at_once_not_after_the_timeout() -> None:
    """A redis-server that refuses its arguments exits at once: ``start()`` says it exited, and does not wait out
    its whole timeout to report a server that "did not answer" (``fleet hub`` would hang, then mislead)."""
    server = EmbeddedRedis(extra_args=["--no-such-option", "yes"])
    try:
        with pytest.raises(RuntimeError, match="exited with code"):
            server.start(timeout_s=30)
    finally:
        server.cleanup()

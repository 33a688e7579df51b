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


def test_a_server_whose_port_another_redis_server_holds_is_not_taken_for_started() -> None:
    """Another redis-server on the port answers INFO as the one started would, with its own process id: ``start()``
    reports the exit of the server that could not bind, not a URL to the other one's store."""
    with EmbeddedRedis() as other:
        server = EmbeddedRedis(port=other.port)
        try:
            with pytest.raises(RuntimeError, match="exited with code"):
                server.start(timeout_s=30)
        finally:
            server.cleanup()


def test_a_server_whose_port_another_one_took_is_not_taken_for_started() -> None:
    """A port found free can be taken before redis-server binds it. Whatever answers there then is not the server
    that was started (which exits, unable to bind): ``start()`` reports that exit, and does not hand out a URL to
    someone else's store. Here the port's taker answers PONG to anything, as another redis-server would."""
    import socket
    import threading

    taker = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer_pong() -> None:
        taker.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = taker.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=answer_pong, daemon=True)
    thread.start()
    server = EmbeddedRedis(port=taker.getsockname()[1])
    try:
        with pytest.raises(RuntimeError, match="exited with code"):
            server.start(timeout_s=30)
    finally:
        stop.set()
        thread.join()
        taker.close()
        server.cleanup()


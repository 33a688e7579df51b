"""A Redis Cluster of embedded redis-servers on loopback, for the tests that run on one."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from shared.redis_server import EmbeddedRedis, redis_server_binary


def start_cluster(masters: int = 3, timeout_s: float = 20.0) -> list[EmbeddedRedis]:
    """A Redis Cluster of ``masters`` nodes on loopback, slots split evenly, ready for clients."""
    nodes = [EmbeddedRedis(cluster=True).start() for _ in range(masters)]
    try:
        cli = Path(redis_server_binary()).with_name("redis-cli")
        if cli.exists():
            subprocess.run(
                [str(cli), "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout_s,
            )
        else:
            _create_cluster_by_hand(nodes)
        _wait_cluster_ok(nodes[0].port, timeout_s)
    except BaseException:  # a Ctrl-C too: the nodes run in their own sessions and never hear it
        for node in nodes:
            node.cleanup()
        raise
    return nodes


def _command(port: int, *args: str) -> bytes:
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(payload.encode())
        return sock.recv(65536)


def _create_cluster_by_hand(nodes: list[EmbeddedRedis]) -> None:
    per = 16384 // len(nodes)
    for i, node in enumerate(nodes):
        end = 16383 if i == len(nodes) - 1 else (i + 1) * per - 1
        _command(node.port, "CLUSTER", "ADDSLOTSRANGE", str(i * per), str(end))
    for node in nodes[1:]:
        _command(nodes[0].port, "CLUSTER", "MEET", "127.0.0.1", str(node.port))


def _wait_cluster_ok(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if b"cluster_state:ok" in _command(port, "CLUSTER", "INFO"):
            return
        time.sleep(0.1)
    raise RuntimeError("redis cluster did not reach cluster_state:ok")

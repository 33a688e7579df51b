"""The SRE CLI against a real hub served by uvicorn over HTTP, with workers registered through the API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from rich.console import Console
from typer.testing import CliRunner

from cli import admin
from cli.main import app
from hub.main import create_app
from shared.redis_server import EmbeddedRedis, free_port
from tests.conftest import ADMIN_TOKEN, WORKER_AUTH, WORKER_TOKEN, hub_settings, registration
from tests.fakes import FakeWorker, serving

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not wrap table cells


class LiveHub:
    """A hub served over real HTTP by uvicorn in a background thread, plus fake worker endpoints on its loop."""

    def __init__(self, redis_url: str, fake_workers: int = 0, **overrides: Any) -> None:
        settings = dict(worker_ttl_s=60.0, heartbeat_interval_s=5.0)  # tests outlive the 2 s test TTL
        settings.update(overrides)
        self.app = create_app(hub_settings(redis_url, **settings))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fake_workers: list[FakeWorker] = []
        self._n_fakes = fake_workers
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="on"))
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.secrets: dict[str, str] = {}

    async def _main(self) -> None:
        self.fake_workers = [await FakeWorker(token=WORKER_TOKEN).start() for _ in range(self._n_fakes)]
        serving = asyncio.create_task(self._server.serve())
        while not self._server.started and not serving.done():
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await serving
        finally:
            for worker in self.fake_workers:
                await worker.stop()

    def __enter__(self) -> LiveHub:
        self._thread.start()
        assert self._ready.wait(15), "the hub did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def register(self, worker_id: str, url: str = "http://127.0.0.1:9", *, region: str = "us-east-1",
                 max_streams: int = 4, heartbeat: dict[str, Any] | None = None, **extra: Any) -> None:
        """Register a worker and heartbeat it once (its url need not answer unless sessions go there)."""
        with httpx.Client(base_url=self.url, headers=WORKER_AUTH, timeout=5) as client:
            resp = client.post("/api/v1/workers", json=registration(worker_id, url, region=region,
                                                                    max_streams=max_streams, **extra))
            assert resp.status_code == 200, resp.text
            self.secrets[worker_id] = resp.json()["worker_secret"]
            self.heartbeat(worker_id, **(heartbeat or {}))

    def heartbeat(self, worker_id: str, sessions: list[str] | None = None, **fields: Any) -> None:
        with httpx.Client(base_url=self.url, headers=WORKER_AUTH, timeout=5) as client:
            resp = client.post(f"/api/v1/workers/{worker_id}/heartbeat",
                               json={"active_sessions": sessions or [], **fields},
                               headers={"X-Worker-Secret": self.secrets[worker_id]})
            assert resp.status_code == 200, resp.text

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)


def seed(hub: LiveHub) -> None:
    """Three workers in two regions; one session placed on the reachable fake worker in Frankfurt."""
    hub.register("gpu-use1-a", region="us-east-1", location={"lat": 38.9, "lon": -77.4},
                 heartbeat={"latency_ms": 41.0, "gpu_utilization": 30.0})
    hub.register("gpu-use1-b", region="us-east-1", location={"lat": 38.9, "lon": -77.4}, max_streams=8)
    hub.register("gpu-euc1-a", hub.fake_workers[0].url, region="eu-central-1", location={"lat": 50.1, "lon": 8.7})
    with hub.admin() as client:
        for _ in range(50):  # wait for the hub's board mirror to see the registrations
            if len(client.get("/api/v1/route/explain", params={"lat": 50.1, "lon": 8.7}).json()["candidates"]) == 3:
                break
            time.sleep(0.05)
        placed = client.post("/api/v1/sessions", json={"location": {"lat": 48.85, "lon": 2.35}, "region": None})
        assert placed.status_code == 201, placed.text
        assert placed.json()["worker"]["id"] == "gpu-euc1-a"


@pytest.fixture
def live_hub(redis_url: str) -> Iterator[LiveHub]:
    with LiveHub(redis_url, fake_workers=1) as hub:
        seed(hub)
        yield hub


def fleet(hub: LiveHub, *args: str, token: str = ADMIN_TOKEN, columns: int = 200) -> Any:
    return runner.invoke(app, [*args], env={"FLEET_HUB_URL": hub.url, "FLEET_ADMIN_TOKEN": token,
                                            "COLUMNS": str(columns)})


def test_workers_table_and_json_show_the_registry(live_hub: LiveHub) -> None:
    table = fleet(live_hub, "workers")
    assert table.exit_code == 0, table.output
    for text in ("gpu-use1-a", "gpu-use1-b", "gpu-euc1-a", "eu-central-1", "NVIDIA A10G", "ready", "0/8", "41 ms"):
        assert text in table.output
    assert "last heartbeat" not in table.output  # the stale workers' note, with none stale

    listed = json.loads(fleet(live_hub, "workers", "--json").output)
    assert {w["worker_id"] for w in listed["workers"]} == {"gpu-use1-a", "gpu-use1-b", "gpu-euc1-a"}
    euc = next(w for w in listed["workers"] if w["worker_id"] == "gpu-euc1-a")
    assert euc["used_streams"] == 1 and euc["alive"]

    only_eu = json.loads(fleet(live_hub, "workers", "--region", "eu-central-1", "--json").output)
    assert [w["worker_id"] for w in only_eu["workers"]] == ["gpu-euc1-a"]


def test_what_workers_registered_is_printed_as_it_is(live_hub: LiveHub) -> None:
    """Regression: cells were read as rich markup, so one worker registering a GPU named "[/x]" made ``fleet
    workers`` a traceback for every SRE; and ":100:" printed as an emoji."""
    live_hub.register("gpu-odd-a", gpus=[{"name": "[/x] [bold]odd :100:", "vram_total_mb": 1}])
    for args in (["workers"], ["worker", "gpu-odd-a"]):
        result = fleet(live_hub, *args)
        assert result.exit_code == 0, result.output
        assert "[/x] [bold]odd :100:" in result.output


def test_drain_and_resume_steer_the_worker_and_the_state_filter_sees_it(live_hub: LiveHub) -> None:
    drained = fleet(live_hub, "drain", "gpu-use1-a")
    assert drained.exit_code == 0, drained.output
    assert "gpu-use1-a is draining" in drained.output
    draining = json.loads(fleet(live_hub, "workers", "--state", "draining", "--json").output)
    assert [w["worker_id"] for w in draining["workers"]] == ["gpu-use1-a"]
    with live_hub.admin() as client:
        assert client.get("/api/v1/workers/gpu-use1-a").json()["state"] == "draining"

    resumed = fleet(live_hub, "resume", "gpu-use1-a")
    assert resumed.exit_code == 0 and "ready" in resumed.output
    assert json.loads(fleet(live_hub, "workers", "--state", "draining", "--json").output)["workers"] == []


def test_capacity_is_per_region_with_a_total(live_hub: LiveHub) -> None:
    data = json.loads(fleet(live_hub, "capacity", "--json").output)
    regions = {r["region"]: r for r in data["regions"]}
    assert regions["us-east-1"]["max_streams"] == 12 and regions["us-east-1"]["workers"] == 2
    assert regions["eu-central-1"]["used_streams"] == 1 and regions["eu-central-1"]["free_streams"] == 3
    assert data["total"]["max_streams"] == 16
    table = fleet(live_hub, "capacity")
    assert table.exit_code == 0 and "eu-central-1" in table.output and "us-east-1" in table.output


def test_sessions_lists_placed_sessions_with_their_origin(live_hub: LiveHub) -> None:
    data = json.loads(fleet(live_hub, "sessions", "--json").output)
    assert len(data["sessions"]) == 1
    session = data["sessions"][0]
    assert session["worker_id"] == "gpu-euc1-a" and session["location"] == {"lat": 48.85, "lon": 2.35}
    table = fleet(live_hub, "sessions")
    assert table.exit_code == 0 and "gpu-euc1-a" in table.output and "48.9, 2.4" in table.output


def test_listings_follow_every_page_of_the_hub(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub answers a page per request; the CLI lists the whole fleet, sessions oldest first across pages."""
    monkeypatch.setattr(admin, "MAX_PAGE", 1)
    with LiveHub(redis_url, fake_workers=2) as hub:
        for n, worker in enumerate(hub.fake_workers):
            hub.register(f"gpu-{n}", worker.url, region="eu-central-1", location={"lat": 50.1, "lon": 8.7})
        with hub.admin() as client:
            placed = []
            for _ in range(4):
                resp = client.post("/api/v1/sessions", json={"location": {"lat": 48.85, "lon": 2.35}})
                assert resp.status_code == 201, resp.text
                placed.append(resp.json()["session_id"])
            assert client.get("/api/v1/workers", params={"limit": 1}).json()["next_cursor"] is not None
        workers = json.loads(fleet(hub, "workers", "--json").output)["workers"]
        sessions = json.loads(fleet(hub, "sessions", "--json").output)["sessions"]
    assert [w["worker_id"] for w in workers] == ["gpu-0", "gpu-1"]
    assert {s["worker_id"] for s in sessions} == {"gpu-0", "gpu-1"}  # both workers' pages
    assert [s["session_id"] for s in sessions] == placed  # oldest first, across the pages


def test_a_listing_asks_for_the_largest_pages_and_ends_when_the_hub_repeats_a_cursor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page is asked with its filters, the largest limit and the cursor the page before gave; a hub that gives
    the same cursor again ends the listing instead of holding the CLI in a loop of the same page."""
    pages = {None: (["a", "b"], "c1"), "c1": (["c"], "c2"), "c2": (["d"], "c2")}
    asked: list[dict[str, Any]] = []

    def call(hub: str, token: str, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        asked.append(params)
        assert len(asked) <= len(pages), "the same page asked again and again"
        items, cursor = pages[params["cursor"]]
        return {"workers": items, "next_cursor": cursor}

    monkeypatch.setattr(admin, "call", call)
    listed = admin.every_page("http://hub", "t", "/api/v1/workers", "workers", {"region": "eu-west-1"})
    assert listed == {"workers": ["a", "b", "c", "d"]}
    assert asked == [{"region": "eu-west-1", "limit": admin.MAX_PAGE, "cursor": c} for c in (None, "c1", "c2")]


def test_fleet_workers_and_sessions_list_every_page_with_the_filters_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet larger than the hub's page is listed whole, and each page is asked with the operator's filters."""
    asked: list[tuple[str, dict[str, Any]]] = []

    def call(hub: str, token: str, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        asked.append((path, {k: v for k, v in params.items() if k not in ("limit", "cursor")}))
        last = params["cursor"] is not None
        if path == "/api/v1/workers":
            return {"workers": [{"worker_id": "gpu-2" if last else "gpu-1"}], "next_cursor": None if last else "x"}
        return {"sessions": [{"session_id": "s-2" if last else "s-1", "created_at": 1.0 if last else 2.0}],
                "next_cursor": None if last else "x"}

    monkeypatch.setattr(admin, "call", call)
    env = {"FLEET_HUB_URL": "http://hub.invalid", "FLEET_ADMIN_TOKEN": ADMIN_TOKEN}
    listed = runner.invoke(app, ["workers", "--region", "eu-west-1", "--state", "ready", "--json"], env=env)
    assert [w["worker_id"] for w in json.loads(listed.output)["workers"]] == ["gpu-1", "gpu-2"], listed.output
    held = runner.invoke(app, ["sessions", "--worker", "gpu-1", "--region", "eu-west-1", "--json"], env=env)
    assert [s["session_id"] for s in json.loads(held.output)["sessions"]] == ["s-2", "s-1"], held.output
    assert asked == [*[("/api/v1/workers", {"region": "eu-west-1", "state": "ready"})] * 2,
                     *[("/api/v1/sessions", {"worker_id": "gpu-1", "region": "eu-west-1"})] * 2]


def _ids_listed(hub: LiveHub) -> list[str]:
    """Every worker and session id the hub holds, after adding a worker with an EC2 instance id (19 characters)."""
    hub.register("i-0a1b2c3d4e5f60718", region="eu-central-1",
                 gpus=[{"name": "NVIDIA Tesla T4", "vram_total_mb": 15360}])
    workers = json.loads(fleet(hub, "workers", "--json").output)["workers"]
    sessions = json.loads(fleet(hub, "sessions", "--json").output)["sessions"]
    assert sessions and "i-0a1b2c3d4e5f60718" in {w["worker_id"] for w in workers}
    return [w["worker_id"] for w in workers] + [s["session_id"] for s in sessions]


def test_ids_print_whole_when_the_output_is_piped_at_80_columns(live_hub: LiveHub) -> None:
    """Regression: piped (rich assumes 80 columns) or in an 80-column terminal, ids printed as ``i-0a1…``, which
    ``fleet drain ID`` cannot take and grep cannot find."""
    ids = _ids_listed(live_hub)
    printed = "".join(fleet(live_hub, command, columns=80).output for command in ("workers", "sessions"))
    for an_id in ids:
        assert an_id in printed, printed
    explained = fleet(live_hub, "explain", "--region", "eu-central-1", columns=80).output
    assert "i-0a1b2c3d4e5f60718" in explained, explained


def test_ids_stay_whole_in_an_80_column_terminal_and_the_other_columns_shrink(
        live_hub: LiveHub, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _ids_listed(live_hub)
    screen = io.StringIO()
    monkeypatch.setattr(admin, "_out", Console(file=screen, width=80, force_terminal=True, color_system=None,
                                               highlight=False))
    for command in ("workers", "sessions"):
        assert fleet(live_hub, command, columns=80).exit_code == 0
    printed = screen.getvalue()
    for an_id in ids:
        assert an_id in printed, printed
    assert max(len(line) for line in printed.splitlines()) <= 80, printed


def test_explain_ranks_candidates_with_every_factor(live_hub: LiveHub) -> None:
    data = json.loads(fleet(live_hub, "explain", "--lat", "50", "--lon", "8", "--policy", "spread", "--json").output)
    assert data["policy"] == "spread" and data["location"] == {"lat": 50.0, "lon": 8.0}
    ranked = data["candidates"]
    assert ranked[0]["worker_id"] == "gpu-euc1-a"  # Frankfurt beats Virginia for a user in Germany
    assert [c["score"] for c in ranked] == sorted((c["score"] for c in ranked), reverse=True)
    assert set(ranked[0]["factors"]) == {"distance_km", "rtt_ms", "distance", "load", "latency", "capacity"}
    table = fleet(live_hub, "explain", "--lat", "50", "--lon", "8")
    assert table.exit_code == 0 and "gpu-euc1-a" in table.output and "distance km" in table.output


def test_explain_takes_labels_and_marks_the_near_best(live_hub: LiveHub) -> None:
    live_hub.register("gpu-euc1-tts", region="eu-central-1", location={"lat": 50.1, "lon": 8.7},
                      labels={"engine": "tts"})
    with live_hub.admin() as client:
        for _ in range(50):
            if len(client.get("/api/v1/route/explain", params={"lat": 50, "lon": 8}).json()["candidates"]) == 4:
                break
            time.sleep(0.05)
        only = client.get("/api/v1/route/explain", params={"lat": 50, "lon": 8, "label": ["engine=tts"]}).json()
        assert [c["worker_id"] for c in only["candidates"]] == ["gpu-euc1-tts"]
        everyone = client.get("/api/v1/route/explain", params={"lat": 50, "lon": 8}).json()["candidates"]
        assert len(everyone) == 4 and everyone[0]["near_best"] and not everyone[-1]["near_best"]  # Virginia
        for bad in (["engine"], ["bad key!=x"], [f"k{i}=v" for i in range(33)]):
            resp = client.get("/api/v1/route/explain", params={"lat": 50, "lon": 8, "label": bad})
            assert resp.status_code == 422 and resp.json()["error"] == "invalid_request", (bad, resp.text)
    table = fleet(live_hub, "explain", "--lat", "50", "--lon", "8", "--label", "engine=tts")
    assert table.exit_code == 0 and "gpu-euc1-tts" in table.output and "gpu-euc1-a" not in table.output
    assert "1 *" in table.output
    assert fleet(live_hub, "explain", "--label", "engine").exit_code == admin.EXIT_USAGE


def test_show_worker_prints_one_worker_in_full(live_hub: LiveHub) -> None:
    one = typer.Typer()

    @one.command()
    def worker(worker_id: str, json_: bool = typer.Option(False, "--json")) -> None:
        admin.show_worker(worker_id, live_hub.url, json_, token=ADMIN_TOKEN)

    shown = runner.invoke(one, ["gpu-euc1-a"])
    assert shown.exit_code == 0, shown.output
    assert "gpu-euc1-a" in shown.output and live_hub.fake_workers[0].url in shown.output
    assert json.loads(runner.invoke(one, ["gpu-euc1-a", "--json"]).output)["region"] == "eu-central-1"
    missing = runner.invoke(one, ["nope-1"])
    assert missing.exit_code == admin.EXIT_NOT_FOUND


@pytest.mark.parametrize(("args", "token", "code", "words"), [
    (["drain", "no-such-worker"], ADMIN_TOKEN, admin.EXIT_NOT_FOUND, "no worker no-such-worker"),
    (["workers"], "wrong-token", admin.EXIT_AUTH, "FLEET_ADMIN_TOKEN"),
    # httpx would resolve '..' and drain another worker, or show another route's answer
    (["drain", "x/../gpu-use1-b"], ADMIN_TOKEN, admin.EXIT_NOT_FOUND, "no worker can have the id"),
    # a trailing line break (an id pasted or read from a file) is not part of any id
    (["drain", "gpu-use1-b\n"], ADMIN_TOKEN, admin.EXIT_NOT_FOUND, "no worker can have the id"),
    (["sessions", "--worker", "no-such-worker"], ADMIN_TOKEN, admin.EXIT_NOT_FOUND, "not registered"),
    (["workers"], "tökén", admin.EXIT_USAGE, "must be printable ASCII"),
    # regression: httpx's error quoted the header, token and all
    (["workers"], "prod-admin-SECRET\rX", admin.EXIT_USAGE, "must be printable ASCII"),
    # regression: what the SRE typed was read as rich markup (a traceback, or brackets eaten from the message)
    (["worker", "[/x]"], ADMIN_TOKEN, admin.EXIT_NOT_FOUND, "[/x]"),
    (["explain", "--policy", "[/x]"], ADMIN_TOKEN, admin.EXIT_USAGE, "[/x]"),
    (["explain", "--region", "mars-1"], ADMIN_TOKEN, admin.EXIT_ERROR, "[a-z]"),
])
def test_errors_are_one_line_and_an_exit_code(live_hub: LiveHub, args: list[str], token: str, code: int,
                                              words: str) -> None:
    result = fleet(live_hub, *args, token=token)
    assert result.exit_code == code, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert token.strip() not in result.output  # never the secret, even a wrong one


def test_forget_removes_a_stale_worker_and_refuses_a_live_one(redis_url: str) -> None:
    with LiveHub(redis_url, worker_ttl_s=1.0, heartbeat_interval_s=0.3) as hub:
        hub.register("gpu-use1-a")
        refused = fleet(hub, "forget", "gpu-use1-a")
        assert refused.exit_code == admin.EXIT_ERROR and "worker_alive" in refused.output, refused.output
        time.sleep(1.2)  # no heartbeat for the TTL: stale
        with hub.admin() as client:
            assert client.get("/api/v1/workers/gpu-use1-a").json()["alive"] is False
        listed = fleet(hub, "workers", "--state", "stale")
        assert "gpu-use1-a" in listed.output and "as of the last heartbeat" in listed.output, listed.output
        forgotten = fleet(hub, "forget", "gpu-use1-a")
        assert forgotten.exit_code == 0 and "gpu-use1-a forgotten" in forgotten.output, forgotten.output
        with hub.admin() as client:
            assert client.get("/api/v1/workers/gpu-use1-a").status_code == 404
            for _ in range(50):  # the board drops it too, so listings and the stale gauge do
                if client.get("/api/v1/workers").json()["workers"] == []:
                    break
                time.sleep(0.05)
            assert client.get("/api/v1/workers").json()["workers"] == []
        assert fleet(hub, "forget", "gpu-use1-a").exit_code == admin.EXIT_NOT_FOUND


def test_resume_says_when_the_worker_still_drains_on_its_own(live_hub: LiveHub) -> None:
    """The hub lifts an SRE's drain only; a worker leaving on its own (scale-in, spot) stays draining."""
    live_hub.heartbeat("gpu-use1-b", state="draining")
    resumed = fleet(live_hub, "resume", "gpu-use1-b")
    assert resumed.exit_code == admin.EXIT_ERROR and "still draining" in resumed.output, resumed.output
    assert "ready" not in resumed.output


@pytest.mark.parametrize(("status", "body", "code"), [
    (502, "<html>Bad Gateway</html>", admin.EXIT_UNAVAILABLE),  # a load balancer with no hub behind it
    (504, "", admin.EXIT_UNAVAILABLE),
    (200, "{}", admin.EXIT_ERROR),  # a success of an unexpected shape
    (200, "[]", admin.EXIT_ERROR),
])
def test_odd_answers_are_one_line_and_an_exit_code(status: int, body: str, code: int) -> None:
    import http.server

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    with serving(Odd) as hub:
        for args in (["workers"], ["capacity"], ["worker", "w-1"]):
            result = runner.invoke(app, [*args, "--hub", hub])
            assert result.exit_code == code, (args, result.output)
            assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.standalone_redis
def test_unreachable_hub_and_unavailable_redis_exit_5(redis_server: EmbeddedRedis, redis_url: str) -> None:
    gone = runner.invoke(app, ["workers", "--hub", f"http://127.0.0.1:{free_port()}"])
    assert gone.exit_code == admin.EXIT_UNAVAILABLE and "cannot reach the hub" in gone.output
    assert "Traceback" not in gone.output

    with LiveHub(redis_url) as hub:
        redis_server.stop()  # the redis_url fixture restarts it for the next test
        down = fleet(hub, "capacity")
    assert down.exit_code == admin.EXIT_UNAVAILABLE, down.output
    assert "unavailable" in down.output and "Traceback" not in down.output


@pytest.mark.parametrize(("args", "said"), [
    (["worker", "--engine", "bogus"], "unknown engine 'bogus'"),
    (["worker", "calibrate", "--engine", "bogus"], "unknown engine 'bogus'"),
    (["worker", "--simulate-gpu", "bogus"], "FLEET_SIMULATE_GPU: unknown GPU 'bogus'"),
    (["worker", "--region", "moon"], "FLEET_REGION: String should match pattern"),
])
def test_a_worker_refused_for_its_options_says_why_in_one_line(args: list[str], said: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert said in result.stderr and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_hub_refused_for_its_configuration_says_why_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_ENV", "prod")
    monkeypatch.setenv("FLEET_ADMIN_TOKEN", "s3cret-but-too-short")
    result = runner.invoke(app, ["hub"])
    assert result.exit_code == 2 and result.stderr.startswith("fleet hub: invalid configuration: "), result.output
    assert "s3cret-but-too-short" not in result.output


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("FLEET_TRUSTED_PROXIES", "10.0.0.0/8", "FLEET_TRUSTED_PROXIES: not valid JSON"),
    ("FLEET_CLOUDWATCH_WORKER_REGIONS", "us-east-1", "FLEET_CLOUDWATCH_WORKER_REGIONS: not valid JSON"),
    ("FLEET_LOG_LEVEL", "LOUD", "FLEET_LOG_LEVEL: Input should be"),
    # regression: a password with '#' (allowed in ElastiCache AUTH tokens) failed in the lifespan with a traceback
    # that quoted the part before it
    ("FLEET_REDIS_URL", "redis://:TopSecretPart1#Part2@127.0.0.1:6379", "FLEET_REDIS_URL: not a valid"),
    ("FLEET_REDIS_URL", "http://127.0.0.1:6379", "FLEET_REDIS_URL: the scheme must be"),
])
def test_a_hub_refused_for_a_malformed_variable_names_it_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["hub"])
    assert result.exit_code == 2 and said in result.stderr, result.output
    assert "Traceback" not in result.output and value not in result.stderr
    assert "TopSecret" not in result.output


def test_uvicorn_never_logs_below_info_whatever_the_hub_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """At DEBUG, uvicorn logs each WebSocket handshake's headers: the worker token and secret."""
    import uvicorn

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setenv("FLEET_LOG_LEVEL", "debug")
    assert runner.invoke(app, ["hub"]).exit_code == 0
    assert seen["log_level"] == "info"
    monkeypatch.setenv("FLEET_LOG_LEVEL", "warning")
    assert runner.invoke(app, ["hub"]).exit_code == 0
    assert seen.get("log_level") == "warning"  # get(): mypy took the key for the "info" asserted above


def test_fleet_hub_runs_the_processes_asked_for_and_believes_no_forwarded_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--workers 3`` is three uvicorn processes; uvicorn rewrites no client address from X-Forwarded-For (the hub
    believes it only from FLEET_TRUSTED_PROXIES), logs no access line per request, and caps a WebSocket frame at the
    hub's own limit."""
    from hub.main import websocket_max_bytes
    from hub.settings import HubSettings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:6399")
    assert runner.invoke(app, ["hub", "--workers", "3"]).exit_code == 0
    assert seen["workers"] == 3
    assert seen["proxy_headers"] is False and seen["access_log"] is False
    assert seen["ws_max_size"] == websocket_max_bytes(HubSettings())


def test_a_hub_of_several_processes_keeps_the_redis_and_metrics_folder_it_was_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With FLEET_REDIS_URL set, no embedded redis-server replaces the fleet's Redis; a PROMETHEUS_MULTIPROC_DIR set
    from outside is the one the processes count into, and is still set when the hub stops."""
    from hub.metrics import MULTIPROCESS_DIR_ENV

    seen: dict[str, str | None] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(
        redis=os.environ.get("FLEET_REDIS_URL"), metrics=os.environ.get(MULTIPROCESS_DIR_ENV)))
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://10.9.8.7:6379")
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))
    assert runner.invoke(app, ["hub", "--workers", "2"]).exit_code == 0
    assert seen == {"redis": "redis://10.9.8.7:6379", "metrics": str(tmp_path)}
    assert os.environ[MULTIPROCESS_DIR_ENV] == str(tmp_path)


def test_a_hub_of_one_process_shares_neither_a_store_nor_a_metrics_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process needs no redis-server started for it by the command, nor counters in files: it is left to the
    hub itself, and the command sets no variable for it."""
    from hub.metrics import MULTIPROCESS_DIR_ENV

    seen: dict[str, str | None] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(
        redis=os.environ.get("FLEET_REDIS_URL"), metrics=os.environ.get(MULTIPROCESS_DIR_ENV)))
    monkeypatch.delenv("FLEET_REDIS_URL", raising=False)
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    assert runner.invoke(app, ["hub"]).exit_code == 0
    assert seen == {"redis": None, "metrics": None}


def test_a_dev_hub_of_several_processes_leaves_no_variable_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded store's URL and the metrics folder it made are the run's own: once it stops, neither is set."""
    from hub.metrics import MULTIPROCESS_DIR_ENV

    seen: dict[str, str | None] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(
        redis=os.environ.get("FLEET_REDIS_URL"), metrics=os.environ.get(MULTIPROCESS_DIR_ENV)))
    monkeypatch.delenv("FLEET_REDIS_URL", raising=False)
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)
    assert runner.invoke(app, ["hub", "--workers", "2"]).exit_code == 0
    assert (seen["redis"] or "").startswith("redis://") and seen["metrics"]
    assert "FLEET_REDIS_URL" not in os.environ and MULTIPROCESS_DIR_ENV not in os.environ


def _a_worker(**odd: Any) -> dict[str, Any]:
    """A worker as the hub shows it, with some fields replaced by ``odd``."""
    return {"worker_id": "w-1", "region": "us-east-1", "gpus": [{"name": "NVIDIA A10G"}], "alive": True,
            "state": "ready", "used_streams": 1, "max_streams": 4, "gpu_utilization": 30.0, "latency_ms": 41.0,
            "heartbeat_age_s": 0.5, "url": "http://10.0.0.5:8000", "zone": None, "location": {"lat": 1.0, "lon": 2.0},
            "drain_requested": False, "instance_type": None, "engine": "synthetic", "cpu_percent": 5.0,
            "memory_percent": 10.0, "vram_used_mb": 0, "error_rate": 0.0, "labels": {}, "registered_at": 1.7e9,
            **odd}


@pytest.mark.parametrize("odd", [
    {},  # guards the harness: the same answer, sane, is shown
    {"gpu_utilization": "n/a"},  # ValueError: a str for an :.0f figure
    {"used_streams": 10**400},  # OverflowError: too large a number for a float
    {"registered_at": 1e300},  # OverflowError: beyond the platform's time_t
    {"registered_at": 1e18},  # OSError (EOVERFLOW) from gmtime on Linux
], ids=["sane", "str-figure", "huge-int", "huge-time", "far-time"])
def test_a_worker_with_odd_values_is_one_line_and_an_exit_code(odd: dict[str, Any]) -> None:
    """Regression: a value of the wrong kind or range gave a traceback from `fleet worker ID`."""
    with _hub_answering({"/api/v1/workers/w-1": _a_worker(**odd)}) as hub:
        result = runner.invoke(app, ["worker", "w-1", "--hub", hub])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if not odd:
        assert result.exit_code == 0 and "2023-11-14" in result.output, result.output
        return
    assert result.exit_code == admin.EXIT_ERROR, (result.output, result.exception)
    assert result.stdout == "", "nothing half-shown before the error"
    assert len(result.stderr.strip().splitlines()) == 1 and "the hub's answer" in result.stderr, result.stderr


def test_a_token_read_from_a_crlf_file_works(live_hub: LiveHub) -> None:
    """Regression: ``FLEET_ADMIN_TOKEN=$(cat token.txt)`` kept a CR, and the error printed the whole header."""
    result = fleet(live_hub, "workers", "--json", token=ADMIN_TOKEN + "\r\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workers"]


def test_a_hub_url_that_is_not_a_hub_is_not_taken_for_an_unknown_id(live_hub: LiveHub) -> None:
    """Regression: a --hub answering 404 for every path (a worker, a typo'd prefix) said "unknown id", exit 4,
    even for `fleet workers`, which takes no id."""
    result = runner.invoke(app, ["workers"], env={"FLEET_HUB_URL": live_hub.url + "/not-the-api",
                                                  "FLEET_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "200"})
    assert result.exit_code == admin.EXIT_ERROR, result.output
    assert "is --hub a hub's URL?" in result.output and len(result.output.strip().splitlines()) == 1


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@contextlib.contextmanager
def _hub_answering(answers: dict[str, Any]) -> Iterator[str]:
    """A hub as far as the CLI can tell: each GET of a path in ``answers`` gets it as JSON (200); its base URL."""
    import http.server

    class Answers(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answers[self.path.split("?")[0]]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Answers) as url:
        yield url


def test_fleet_worker_id_takes_its_token_as_an_option_and_prints_json(live_hub: LiveHub,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`fleet worker ID --token T --json`: the token typed is the one sent, and the answer is the hub's JSON."""
    monkeypatch.delenv("FLEET_ADMIN_TOKEN", raising=False)
    result = runner.invoke(app, ["worker", "gpu-euc1-a", "--hub", live_hub.url, "--token", ADMIN_TOKEN, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["region"] == "eu-central-1"


def test_exit_codes_are_the_documented_ones_scripts_test_for(live_hub: LiveHub) -> None:
    """README: 1 refused or invalid, 2 bad usage, 3 auth, 4 unknown id, 5 hub unreachable or unavailable."""
    assert fleet(live_hub, "drain", "no-such-worker").exit_code == 4
    assert fleet(live_hub, "workers", token="wrong-token").exit_code == 3
    assert fleet(live_hub, "workers", "--state", "gone").exit_code == 2
    assert fleet(live_hub, "forget", "gpu-use1-a").exit_code == 1  # live: the hub refuses
    assert runner.invoke(app, ["workers", "--hub", f"http://127.0.0.1:{free_port()}"]).exit_code == 5


def test_a_hub_that_does_not_answer_in_time_is_unavailable_exit_5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "TIMEOUT", httpx.Timeout(0.3))
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        result = runner.invoke(app, ["workers", "--hub", f"http://127.0.0.1:{silent.getsockname()[1]}"])
    assert result.exit_code == admin.EXIT_UNAVAILABLE == 5, result.output
    assert "did not answer in time" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_workers_table_shows_each_workers_figures(live_hub: LiveHub) -> None:
    live_hub.register("gpu-use1-quad", gpus=[{"name": "NVIDIA A10G", "vram_total_mb": 24576}] * 4)
    table = fleet(live_hub, "workers")
    assert table.exit_code == 0, table.output
    assert "4 workers" in table.output
    # id, region, GPU, state, streams, load, GPU util, latency, heartbeat age
    euc = _row(table.output, "gpu-euc1-a")
    assert euc[1:8] == ["eu-central-1", "NVIDIA A10G", "ready", "1/4", "25%", "0%", "0 ms"], euc
    assert re.fullmatch(r"\d+\.\ds", euc[8]), euc
    assert _row(table.output, "gpu-use1-a")[4:8] == ["0/4", "0%", "30%", "41 ms"]
    assert _row(table.output, "gpu-use1-quad")[2] == "4 x NVIDIA A10G"
    one = fleet(live_hub, "workers", "--region", "eu-central-1")
    assert "1 worker" in one.output and "1 workers" not in one.output, one.output


def test_stale_workers_among_live_ones_are_flagged_in_a_caption() -> None:
    answer = {"workers": [_a_worker(), _a_worker(worker_id="w-2", alive=False)]}
    with _hub_answering({"/api/v1/workers": answer}) as hub:
        result = runner.invoke(app, ["workers", "--hub", hub])
    assert result.exit_code == 0, result.output
    assert _row(result.output, "w-2")[3] == "stale" and _row(result.output, "w-1")[3] == "ready"
    assert "stale: streams and load as of the last heartbeat" in result.output


def test_show_worker_says_whether_an_sre_drained_it(live_hub: LiveHub) -> None:
    def drain_requested() -> str:
        shown = fleet(live_hub, "worker", "gpu-use1-a")
        assert shown.exit_code == 0, shown.output
        line = next(line for line in shown.output.splitlines() if line.startswith("drain requested"))
        return line.split()[-1]

    assert drain_requested() == "False"
    assert fleet(live_hub, "drain", "gpu-use1-a").exit_code == 0
    assert drain_requested() == "True"


def test_sessions_show_their_age() -> None:
    session = {"session_id": "w-1-s1", "session_key": None, "worker_id": "w-1", "worker_region": "us-east-1",
               "livekit_region": "lk-virginia", "status": "active", "created_at": time.time() - 120,
               "location": None}
    with _hub_answering({"/api/v1/sessions": {"sessions": [session]}}) as hub:
        result = runner.invoke(app, ["sessions", "--hub", hub])
    assert result.exit_code == 0, result.output
    assert "1 session" in result.output and "1 sessions" not in result.output
    age = _row(result.output, "w-1-s1")[6]
    assert re.fullmatch(r"1[23]\d\.\ds", age), age


def test_capacity_table_shows_each_regions_figures_and_fullness(live_hub: LiveHub) -> None:
    table = fleet(live_hub, "capacity")
    assert table.exit_code == 0, table.output
    # region, workers, ready, streams used, streams free, max, full
    assert _row(table.output, "eu-central-1") == ["eu-central-1", "1", "1", "1", "3", "4", "25%"]
    assert _row(table.output, "us-east-1") == ["us-east-1", "2", "2", "0", "12", "12", "0%"]
    assert _row(table.output, "all") == ["all", "3", "3", "1", "15", "16", "6%"]


def test_explain_says_no_worker_only_when_there_is_none(live_hub: LiveHub) -> None:
    some = fleet(live_hub, "explain", "--lat", "50", "--lon", "8")
    assert some.exit_code == 0 and "no live, ready worker" not in some.output, some.output
    none = fleet(live_hub, "explain", "--lat", "50", "--lon", "8", "--label", "engine=none")
    assert none.exit_code == 0 and "no live worker has the labels engine=none (no_matching_worker)" in none.output, (
        none.output)
    assert "user at 50.00, 8.00 (as given)" in none.output  # not the API's "(body)"
    default = fleet(live_hub, "explain")
    assert "(the default region's centre)" in default.output, default.output


def test_resume_of_a_stale_worker_does_not_say_it_takes_sessions(redis_url: str) -> None:
    """The hub lifts the drain of a stale worker, but places nothing on it until it heartbeats again."""
    with LiveHub(redis_url, worker_ttl_s=1.0, heartbeat_interval_s=0.3) as hub:
        hub.register("gpu-use1-a")
        assert fleet(hub, "drain", "gpu-use1-a").exit_code == 0
        time.sleep(1.2)  # no heartbeat for the TTL: stale
        with hub.admin() as client:
            assert client.get("/api/v1/workers/gpu-use1-a").json()["alive"] is False
        resumed = fleet(hub, "resume", "gpu-use1-a")
    assert resumed.exit_code == admin.EXIT_ERROR, resumed.output
    assert "taking sessions again" not in resumed.output
    assert "stale" in resumed.output and len(resumed.output.strip().splitlines()) == 1, resumed.output


# --- bad usage exits 2, and sentences are never broken when piped (QA findings 3 and 4) -------------------------


@pytest.mark.parametrize(("args", "said"), [
    (["workers", "--state", "foo"], "--state must be ready, draining or stale, not 'foo'"),
    (["explain", "--policy", "foo"], "--policy must be spread or pack, not 'foo'"),
    (["explain", "--label", "gpu"], "--label takes key=value, not 'gpu'"),
    (["explain", "--lat", "10"], "give both --lat and --lon"),
    (["explain", "--lon", "10"], "give both --lat and --lon"),
    (["workers", "--hub", "127.0.0.1:8080"], "--hub '127.0.0.1:8080' is not a hub's URL: give it with http://"),
    (["capacity", "--hub", "hub.example.com"], "--hub 'hub.example.com' is not a hub's URL"),
    (["sessions", "--hub", "ftp://hub.example.com"], "--hub 'ftp://hub.example.com' is not a hub's URL"),
    (["drain", "w-1", "--hub", "http://"], "--hub 'http://' is not a hub's URL"),
    (["worker", "w-1", "--hub", "localhost:8080"], "--hub 'localhost:8080' is not a hub's URL"),
    (["workers", "--hub", ":::"], "--hub ':::' is not a hub's URL"),
    (["workers", "--hub", "http://127.0.0.1:99999"], "--hub 'http://127.0.0.1:99999' is not a hub's URL"),
], ids=["state", "policy", "label", "lat-alone", "lon-alone", "hub-no-scheme", "hub-name-only", "hub-ftp",
        "hub-no-host", "worker-hub-no-scheme", "hub-unparsable", "hub-port"])
def test_a_bad_option_value_is_bad_usage_exit_2_in_one_line(args: list[str], said: str) -> None:
    """Regression: the README documents 2 for bad usage, but these exited 1, and a --hub without http:// exited 5
    as if the hub were down (``cannot reach the hub … UnsupportedProtocol``)."""
    result = runner.invoke(app, args, env={"FLEET_ADMIN_TOKEN": ADMIN_TOKEN, "COLUMNS": "80"})
    assert result.exit_code == admin.EXIT_USAGE == 2, result.output
    assert said in result.stderr and "cannot reach" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == "", result.output


def test_a_hub_port_no_socket_can_have_is_bad_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: ``fleet hub --port 70000`` started a hub that no client could reach at the port it was given."""
    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    for port in ("70000", "-1"):
        result = runner.invoke(app, ["hub", "--port", port])
        assert result.exit_code == 2 and "--port" in result.output, result.output
    assert started == []
    assert runner.invoke(app, ["hub", "--port", "0"]).exit_code == 0 and started  # any free port, as uvicorn's


def test_a_demo_with_options_it_cannot_run_with_is_bad_usage(tmp_path: Path) -> None:
    """The demo's own checks of --regions and the ports are usage errors too; a port in use is not (exit 1)."""
    for args in (["--regions", ","], ["--regions", "mars-north-1"], ["--hub-port", "0"],
                 ["--hub-port", "9000", "--worker-port", "9001"]):
        result = runner.invoke(app, ["demo", *args, "--log-dir", str(tmp_path)])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("fleet demo: ") and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_messages_are_whole_lines_when_piped_at_80_columns(live_hub: LiveHub) -> None:
    """Regression: piped, rich wrapped sentences at 80 columns (``… (0/8 streams \\nin use)``), and a script's grep
    for them failed."""
    drained = fleet(live_hub, "drain", "gpu-use1-b", columns=80)
    said = "gpu-use1-b is draining: no new sessions, running ones finish (0/8 streams in use)"
    assert len(said) > 80 and said in drained.stdout.splitlines(), drained.stdout
    live_hub.register("gpu-use1-b-with-a-much-longer-name-than-most", max_streams=16)
    resumed = fleet(live_hub, "resume", "gpu-use1-b-with-a-much-longer-name-than-most", columns=80)
    said = "gpu-use1-b-with-a-much-longer-name-than-most is ready: taking sessions again (0/16 streams in use)"
    assert said in resumed.stdout.splitlines(), resumed.stdout


@pytest.mark.parametrize("hub", ["https://127.0.0.1:1", "http://127.0.0.1:65535"], ids=["https", "last-port"])
def test_a_hub_url_with_https_or_the_last_port_is_tried_not_refused_as_bad_usage(hub: str) -> None:
    """Only a --hub no request can be sent to is bad usage; this one is sent, and nothing answers there."""
    result = runner.invoke(app, ["workers", "--hub", hub], env={"FLEET_ADMIN_TOKEN": ADMIN_TOKEN})
    assert result.exit_code != admin.EXIT_USAGE and "is not a hub's URL" not in result.output, result.output


def test_the_hub_port_just_past_the_last_is_bad_usage_and_the_last_one_is_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    refused = runner.invoke(app, ["hub", "--port", "65536"])
    assert refused.exit_code == 2 and "--port" in refused.output and started == [], refused.output
    assert runner.invoke(app, ["hub", "--port", "65535"]).exit_code == 0 and started[-1]["port"] == 65535


def test_explains_location_line_is_whole_when_piped_at_80_columns(live_hub: LiveHub) -> None:
    result = fleet(live_hub, "explain", columns=80)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if line.startswith("user at")]
    assert len(line) > 80 and "(the default region's centre), policy" in line and "LiveKit region" in line, line

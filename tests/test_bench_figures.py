"""The figures the benches print and record, worked out from measurements the test chooses: the allocation and
heartbeat summaries, the load generator's rates, percentiles and hub CPU, the fleet the benches register, the
soak's drift figures and final checks, and the plots."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web

import bench.allocation
import bench.heartbeats
import bench.loadgen
import bench.soak
from bench.common import BENCH_REGIONS, Procs, register_fleet, start_fake_workers
from bench.loadgen import Load
from bench.soak import Soak
from shared import keys
from shared.models import MAX_PAGE
from shared.redis_server import EmbeddedRedis, free_port
from tests.conftest import async_redis, flush, sync_redis

# --- the allocation and heartbeat benches' summaries ----------------------------------------------------------


class _Bench:
    """Stands in for everything a bench's main() starts (Redis, the fake workers, the hub, the helper processes);
    ``measured`` answers each helper run by its mode, and every run's arguments are kept."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, tmp_path: Path,
                 measured: dict[str, dict[str, Any]]) -> None:
        self.runs: list[list[str]] = []
        self.recorded: list[Path] = []
        self.measured = measured
        (tmp_path / "bench" / "results").mkdir(parents=True)

        async def register(url: str, n: int, port: int, **kwargs: Any) -> dict[str, str]:
            return {f"w{i:05d}": "secret" for i in range(n)}

        monkeypatch.setattr(module, "ROOT", tmp_path)
        monkeypatch.setattr(module, "redis_server", lambda: SimpleNamespace(url="redis://bench", stop=lambda: None))
        monkeypatch.setattr(module, "Procs", lambda: SimpleNamespace(stop=lambda p: None, close=lambda: None))
        monkeypatch.setattr(module, "start_fake_workers", lambda procs: 1)
        monkeypatch.setattr(module, "register_fleet", register)
        monkeypatch.setattr(module, "start_hub", lambda procs, url, **env: (SimpleNamespace(pid=4321), "http://hub"))
        monkeypatch.setattr(module, "run_json", self.run_json)
        monkeypatch.setattr(module, "record_printout", self.recorded.append)
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: 0.0, sleep=lambda s: None))
        if module is bench.allocation:
            monkeypatch.setattr(module.redis.Redis, "from_url", lambda url: SimpleNamespace(flushall=lambda: None))

    def run_json(self, args: list[str], timeout_s: float = 600) -> dict[str, Any]:
        self.runs.append(args)
        if "bench.baselines.original_router" in args:
            mode = "baseline-pipelined" if "--pipelined" in args else "baseline"
        else:
            mode = args[args.index("--mode") + 1]
        return {"mode": mode, "ok": 1, "errors": {}, **self.measured[mode]}

    def loadgen_runs(self) -> list[tuple[str, str]]:
        """(mode, concurrency) of each load-generator run, in order."""
        return [(a[a.index("--mode") + 1], a[a.index("--concurrency") + 1]) for a in self.runs if "bench.loadgen" in a]


_ALLOCATION = {"health": {"per_s": 4000.0, "p50_ms": 2.0, "p99_ms": 5.0},
               "create": {"per_s": 1600.0, "p50_ms": 8.0, "p99_ms": 20.0},
               "baseline": {"per_s": 8.0, "p50_ms": 900.0, "p99_ms": 2000.0},
               "baseline-pipelined": {"per_s": 16.0, "p50_ms": 450.0, "p99_ms": 1000.0}}


def _allocation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> _Bench:
    """The allocation bench with 1000 allocations/s at the smallest fleet, 800/s (p50 12 ms, p99 30 ms) at each
    larger one."""
    sizes = iter([1000.0, 800.0, 800.0])
    bench_ = _Bench(monkeypatch, bench.allocation, tmp_path, _ALLOCATION)
    alloc_run = bench_.run_json

    def run_json(args: list[str], timeout_s: float = 600) -> dict[str, Any]:
        if "alloc" in args:
            per_s = next(sizes)
            bench_.measured["alloc"] = {"per_s": per_s, "p50_ms": 10.0 if per_s == 1000 else 12.0,
                                        "p99_ms": 20.0 if per_s == 1000 else 30.0}
        return alloc_run(args, timeout_s)

    monkeypatch.setattr(bench.allocation, "run_json", run_json)
    monkeypatch.setattr(sys, "argv", ["bench.allocation", *argv])
    bench.allocation.main()
    return bench_


def test_the_allocation_summary_compares_the_largest_fleet_with_the_smallest_the_http_floor_and_the_original(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """800/s at N=1000 against 1000/s at N=100, a 4000/s health floor, 1600 creations/s and the original design's
    8/s (16/s pipelined)."""
    _allocation(monkeypatch, tmp_path, ["--quick"])
    out = capsys.readouterr().out
    assert "scaling N=1000/N=100: 80% (target >= 70%)" in out, out
    assert "allocation / health floor: 20% (target >= 40%)" in out, out
    assert "creation alone / health floor: 40%" in out, out
    assert "vs original design: 100.0x (pipelined variant 50.0x; target >= 100x)" in out, out
    assert "p99/p50 at N=1000: 2.5 (target <= 3)" in out, out
    assert "health N=  1000:   4000.0 req/s" in out and "create N=  1000:   1600.0 creations/s" in out, out
    recorded = json.loads((tmp_path / "bench" / "results" / "allocation_quick.json").read_text())
    assert recorded["summary"] == {"scaling_ratio": 0.8, "vs_health": 0.2, "create_vs_health": 0.4,
                                   "vs_baseline": 100.0, "vs_baseline_pipelined": 50.0, "p99_over_p50": 2.5}
    assert [r["workers"] for r in recorded["rows"]] == [100, 1000]
    assert (recorded["health"]["workers"], recorded["create"]["workers"]) == (1000, 1000)
    assert [b["mode"] for b in recorded["baseline"]] == ["baseline", "baseline-pipelined"]


def test_the_allocation_bench_measures_health_and_creation_alone_at_the_largest_fleet_with_the_clients_asked_for(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench_ = _allocation(monkeypatch, tmp_path, ["--quick", "--concurrency", "16"])
    assert bench_.loadgen_runs() == [("alloc", "16"), ("alloc", "16"), ("health", "16"), ("create", "16")]
    recorded = json.loads((tmp_path / "bench" / "results" / "allocation_quick.json").read_text())
    assert recorded["concurrency"] == 16


def test_only_an_allocation_run_with_the_recorded_options_replaces_the_record(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    bench_ = _allocation(monkeypatch, tmp_path, [])
    assert bench_.recorded == [results / "allocation.txt"] and (results / "allocation.json").exists()
    assert [r["workers"] for r in json.loads((results / "allocation.json").read_text())["rows"]] == [100, 1000, 10000]
    (results / "allocation.json").unlink()
    monkeypatch.undo()
    bench_ = _allocation(monkeypatch, tmp_path / "other", ["--concurrency", "8"])
    other = tmp_path / "other" / "bench" / "results"
    assert bench_.recorded == [] and (other / "allocation_custom.json").exists()
    assert not (other / "allocation.json").exists()


_HEARTBEATS = {"heartbeat": {"per_s": 2000.0, "p50_ms": 10.0, "p99_ms": 30.0, "hub_cpu_ms_per_op": 1.0,
                             "hub_capacity_per_s": 1000.0},
               "heartbeat-ws": {"per_s": 2500.0, "p50_ms": 4.0, "p99_ms": 9.0, "hub_cpu_ms_per_op": 0.3,
                                "hub_capacity_per_s": 3333.3}}


def test_the_heartbeat_bench_gives_each_transports_share_of_one_hub_process_at_the_heartbeat_interval(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1000 workers every 3 s need 333 heartbeats/s: a third of a hub that absorbs 1000/s over HTTP, a tenth of
    one that absorbs 3333/s over the channel."""
    bench_ = _Bench(monkeypatch, bench.heartbeats, tmp_path, _HEARTBEATS)
    monkeypatch.setattr(sys, "argv", ["bench.heartbeats", "--quick", "--concurrency", "16"])
    bench.heartbeats.main()
    lines = capsys.readouterr().out.splitlines()
    http = lines.index(next(line for line in lines if "over HTTP POST" in line))
    ws = lines.index(next(line for line in lines if "over WebSocket channel" in line))
    assert lines[http].startswith("heartbeats N=1000 over HTTP POST: 2000.0/s measured"), lines
    assert lines[http].endswith("hub CPU 1.0 ms each -> one hub process absorbs 1000.0/s"), lines
    assert lines[http + 1] == "  needed at 3 s interval: 333/s = 33% of one hub process (target < 50%)", lines
    assert lines[ws].startswith("heartbeats N=1000 over WebSocket channel: 2500.0/s measured"), lines
    assert lines[ws + 1] == "  needed at 3 s interval: 333/s = 10% of one hub process (target < 50%)", lines
    assert bench_.loadgen_runs() == [("heartbeat", "16"), ("heartbeat-ws", "16")]
    recorded = json.loads((tmp_path / "bench" / "results" / "heartbeats_quick.json").read_text())
    assert recorded["heartbeat"]["needed_per_s"] == 333.3 and recorded["heartbeat"]["load_share"] == 0.333
    assert recorded["heartbeat-ws"]["transport"] == "WebSocket channel"


def test_a_heartbeat_run_the_hub_recorded_nothing_of_says_so_and_leaves_no_secrets_behind(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A channel run the hub counted no heartbeat of has no capacity figure: the bench says so instead of failing on
    its print line, and the file of worker secrets it handed the load generator is gone afterwards."""
    nothing = {**_HEARTBEATS, "heartbeat-ws": {"per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}}
    bench_ = _Bench(monkeypatch, bench.heartbeats, tmp_path, nothing)
    monkeypatch.setattr(sys, "argv", ["bench.heartbeats", "--quick"])
    bench.heartbeats.main()
    out = capsys.readouterr().out
    assert "333/s = unknown (the hub recorded no heartbeat) of one hub process" in out, out
    (secrets,) = {a[a.index("--secrets") + 1] for a in bench_.runs}
    assert not Path(secrets).exists()


# --- the load generator: one virtual clock that only the fake hub's answers move --------------------------------


class _Clock:
    """The load generator's clock; the fake hub's handlers move it by the latency each request is to have."""

    def __init__(self) -> None:
        self.now = 0.0

    def take(self, units: int) -> None:
        """``units`` of 1/1024 s: sums of them are exact, so a window holds exactly the requests chosen."""
        self.now += units / 1024


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """The load generator runs on a virtual clock, against a hub process that spends half of each second on CPU."""
    c = _Clock()
    monkeypatch.setattr(bench.loadgen, "time", SimpleNamespace(perf_counter=lambda: c.now))
    hub = SimpleNamespace(cpu_times=lambda: SimpleNamespace(user=c.now / 4, system=c.now / 4))
    monkeypatch.setattr(bench.loadgen, "psutil", SimpleNamespace(Process=lambda pid: hub))
    return c


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _load(mode: str, routes: list[web.RouteDef], *, warmup_units: int, window_units: int, concurrency: int = 1,
                secrets: Path | None = None) -> dict[str, Any]:
    """One load-generator run against ``routes`` served on a loopback port."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await bench.loadgen.run(argparse.Namespace(
            url=f"http://127.0.0.1:{port}", mode=mode, concurrency=concurrency, duration=window_units / 1024,
            warmup=warmup_units / 1024, secrets=str(secrets) if secrets else None, connections=0, token="t",
            hub_pid=4321))
    finally:
        await runner.cleanup()


async def test_the_load_generator_counts_the_measured_window_alone_and_takes_its_percentiles(clock: _Clock) -> None:
    """Two warm-up requests (one failing, one of 976 ms), then 101 of 1..101 units in a shuffled order, the one of
    37 units a 503: 100 answered in 5151 units, p50 the 51st fastest, p99 the 100th; the hub's CPU is half the
    window, so it would absorb 100 / 2.5 s."""
    latencies = list(range(1, 102))
    random.Random(5).shuffle(latencies)
    script = iter([(1000, 500), (24, 200)] + [(n, 503 if n == 37 else 200) for n in latencies])

    async def health(request: web.Request) -> web.Response:
        units, status = next(script)
        clock.take(units)
        return web.json_response({}, status=status)

    res = await _load("health", [web.get("/health", health)], warmup_units=1024, window_units=5151)
    window_s = 5151 / 1024
    assert (res["ok"], res["errors"], res["elapsed_s"]) == (100, {"503": 1}, 5.03)
    assert res["per_s"] == pytest.approx(100 / window_s, abs=0.05)
    assert res["p50_ms"] == pytest.approx(51 / 1024 * 1000, abs=0.01)
    assert res["p99_ms"] == pytest.approx(100 / 1024 * 1000, abs=0.01)
    assert res["hub_cpu_share"] == 0.5
    assert res["hub_cpu_ms_per_op"] == pytest.approx(window_s / 2 * 1000 / 100, abs=0.0001)
    assert res["hub_capacity_per_s"] == pytest.approx(100 / (window_s / 2), abs=0.05)


async def test_an_allocations_latency_is_its_creation_and_a_failed_end_is_an_error(clock: _Clock) -> None:
    """Creations take 16 units, ends 112: after one warm-up allocation, nine creations fit in 1024 units; one is
    refused (503) and one's end finds no session (404)."""
    posts: list[int] = []
    deletes: list[str] = []

    async def create(request: web.Request) -> web.Response:
        posts.append(len(posts))
        clock.take(16)
        if len(posts) == 4:
            return web.json_response({"error": "no_capacity"}, status=503)
        return web.json_response({"session_id": f"s{len(posts)}"}, status=201)

    async def end(request: web.Request) -> web.Response:
        deletes.append(request.match_info["sid"])
        clock.take(112)
        return web.Response(status=404 if len(deletes) == 5 else 204)

    res = await _load("alloc", [web.post("/api/v1/sessions", create), web.delete("/api/v1/sessions/{sid}", end)],
                      warmup_units=128, window_units=1024)
    assert (res["ok"], res["errors"]) == (7, {"503": 1, "end 404": 1})
    assert res["p50_ms"] == res["p99_ms"] == pytest.approx(16 / 1024 * 1000, abs=0.01)
    assert len(posts) == 10 and deletes == [f"s{n}" for n in range(1, 11) if n != 4]  # every session made is ended


async def test_creations_alone_are_not_ended_and_a_refused_one_is_an_error(clock: _Clock) -> None:
    posts: list[int] = []

    async def create(request: web.Request) -> web.Response:
        posts.append(len(posts))
        clock.take(128)
        if len(posts) == 3:
            return web.json_response({"error": "no_capacity"}, status=503)
        return web.json_response({"session_id": f"s{len(posts)}"}, status=201)

    res = await _load("create", [web.post("/api/v1/sessions", create)], warmup_units=128, window_units=1024)
    assert (res["ok"], res["errors"], res["per_s"]) == (7, {"503": 1}, 7.0)
    assert res["p50_ms"] == 125.0


async def test_http_heartbeats_go_round_robin_over_every_worker_with_its_own_secret(
        clock: _Clock, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"w0": "s0", "w1": "s1", "w2": "s2"}))
    seen: list[tuple[str, str | None]] = []

    async def beat(request: web.Request) -> web.Response:
        seen.append((request.match_info["wid"], request.headers.get("X-Worker-Secret")))
        clock.take(128)
        return web.json_response({"worker_id": request.match_info["wid"]})

    res = await _load("heartbeat", [web.post("/api/v1/workers/{wid}/heartbeat", beat)], warmup_units=128,
                      window_units=1024, secrets=secrets)
    assert res["ok"] == 8
    assert seen == [("w0", "s0"), ("w1", "s1"), ("w2", "s2")] * 3


async def test_channel_heartbeats_handled_are_the_hubs_own_count_and_latency_only_that_of_answered_ones(
        clock: _Clock, tmp_path: Path) -> None:
    """One client, two channels: every other heartbeat asks for an answer, so every one on the first channel (a
    worker the hub does not know) goes unanswered and unrecorded, and the second's are answered. The k-th answer
    takes k units: one in the warm-up, then 16 taking 2..17 units."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"w-gone": "s0", "w-1": "s1"}))
    recorded = {"forbidden": 3, "unknown": 0, "ok": 0}
    answers = iter(range(1, 100))

    async def channel(request: web.Request) -> web.WebSocketResponse:
        wid = request.match_info["wid"]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            recorded["ok" if wid == "w-1" else "unknown"] += 1
            if json.loads(msg.data)["ack"]:
                clock.take(next(answers))
                await ws.send_json({"worker_id": wid} if wid == "w-1" else {"error": "unknown_worker"})
        return ws

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="# TYPE fleet_heartbeats_total counter\n" + "".join(
            f'fleet_heartbeats_total{{result="{result}"}} {n}.0\n' for result, n in recorded.items()))

    res = await _load("heartbeat-ws", [web.get("/api/v1/workers/{wid}/heartbeat", channel),
                                       web.get("/metrics", metrics)],
                      warmup_units=1, window_units=sum(range(2, 18)), secrets=secrets)
    assert (res["ok"], res["errors"]) == (16, {}), res
    assert res["per_s"] == pytest.approx(16 / (152 / 1024), abs=0.05)
    assert res["p50_ms"] == pytest.approx(9 / 1024 * 1000, abs=0.01)  # the 8th of the 16 answered (nearest rank)
    assert res["p99_ms"] == pytest.approx(17 / 1024 * 1000, abs=0.01)


async def test_channel_heartbeats_go_round_robin_over_every_workers_channel(clock: _Clock, tmp_path: Path) -> None:
    """Regression: the clients shared one counter to pick a channel from their own, so in lockstep each client kept
    to the same few: two clients over eight workers reached four of them."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({f"w{i}": f"s{i}" for i in range(8)}))
    seen: Counter[str] = Counter()

    async def channel(request: web.Request) -> web.WebSocketResponse:
        wid = request.match_info["wid"]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            seen[wid] += 1
            if json.loads(msg.data)["ack"]:
                clock.take(1)
                await ws.send_json({"worker_id": wid})
        return ws

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=f'fleet_heartbeats_total{{result="ok"}} {seen.total()}.0\n')

    res = await _load("heartbeat-ws", [web.get("/api/v1/workers/{wid}/heartbeat", channel),
                                       web.get("/metrics", metrics)],
                      warmup_units=0, window_units=16, concurrency=2, secrets=secrets)
    assert res["ok"] == seen.total() >= 32
    assert sorted(seen) == [f"w{i}" for i in range(8)] and max(seen.values()) - min(seen.values()) <= 2, seen


async def test_an_answered_channel_heartbeat_the_hub_refused_is_an_error() -> None:
    class Channel:
        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []

        async def send_json(self, beat: dict[str, Any]) -> None:
            self.sent.append(beat)

        async def receive_json(self) -> dict[str, Any]:
            return {"error": "unknown_worker"}

    load = Load(None, argparse.Namespace(concurrency=1, token="t"), [])  # type: ignore[arg-type]
    channel = Channel()
    load.channels[0] = [channel]
    rng = random.Random(1)
    assert await load.heartbeat_ws(0, rng) == ("", bench.loadgen._UNMEASURED)
    error, latency = await load.heartbeat_ws(0, rng)
    assert error == "unknown_worker" and latency is not None and latency >= 0
    assert [beat["ack"] for beat in channel.sent] == [False, True]


# --- the fleet the allocation and heartbeat benches register ---------------------------------------------------


async def test_the_benches_register_n_workers_round_robin_over_the_ten_regions(redis_server: EmbeddedRedis) -> None:
    """On one redis-server, as the benches run."""
    redis_url = redis_server.url
    flush(sync_redis(redis_url))
    secrets = await register_fleet(redis_url, 23, 8123, max_streams=3)
    assert sorted(secrets) == [f"w{i:05d}" for i in range(23)]
    r = async_redis(redis_url, decode_responses=True)
    try:
        board = {wid: json.loads(view) for wid, view in (await r.hgetall(keys.BOARD.static)).items()}
        info = {wid: await r.hgetall(keys.worker_keys(wid).info) for wid in secrets}
    finally:
        await r.aclose()
    assert sorted(board) == sorted(secrets)
    for i in range(23):
        wid = f"w{i:05d}"
        region = BENCH_REGIONS[i % 10]
        assert (board[wid]["region"], board[wid]["max_streams"]) == (region, 3), board[wid]
        assert (info[wid]["region"], info[wid]["max_streams"]) == (region, "3"), info[wid]
        assert board[wid]["url"] == info[wid]["url"] == f"http://127.0.0.1:8123/w/{wid}"


def test_the_fake_worker_endpoint_accepts_every_dispatch_and_every_stop_as_a_worker_answers_them() -> None:
    """The hub counts a dispatch as placed only on a 201, and a stop as delivered on a 204."""
    procs = Procs()
    try:
        port = start_fake_workers(procs)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for wid in ("w00000", "w00001"):
                created = http.post(f"/w/{wid}/sessions", json={"session_id": f"s-{wid}", "max_streams": 4})
                assert (created.status_code, created.json()) == (201, {"session_id": f"s-{wid}"})
                assert http.delete(f"/w/{wid}/sessions/s-{wid}").status_code == 204
    finally:
        procs.close()


# --- the soak's figures and final checks -----------------------------------------------------------------------


def _soak(*, running: tuple[int, ...] = ()) -> Soak:
    """A soak over three worker slots (soak-00..02), none started; those in ``running`` look alive."""
    soak = Soak(load_s=10.0, pool=3, initial=3, mean_hold_s=0.0, churn_every_s=1.0, seed=1)
    for i in running:
        soak.workers[i].proc = SimpleNamespace(poll=lambda: None)  # type: ignore[assignment]
    return soak


def _reading(own: list[set[str]], held: list[set[str]], confirmed: list[int] | None = None) -> dict[str, Any]:
    ids = [f"soak-{i:02d}" for i in range(len(own))]
    return {"own": dict(zip(ids, own, strict=True)), "held": dict(zip(ids, held, strict=True)),
            "confirmed": dict(zip(ids, confirmed or [len(h) for h in held], strict=True))}


def test_the_soak_records_the_largest_drift_both_ways_only_live_workers_mismatches_and_overfull_workers() -> None:
    """First reading: Redis holds 5 sessions, the workers run 3 (a stopped worker's lease is not a live mismatch).
    Second: Redis 5, workers 9, one worker running 5 of its 4 streams."""
    soak = _soak(running=(0, 1))
    soak.record(_reading([{"a", "b"}, {"c"}, set()], [{"a", "b"}, {"c", "d"}, {"e"}]))
    four = {"f", "g", "h", "i"}
    soak.record(_reading([{"a", "b", "c", "d", "e"}, four, set()], [{"a"}, four, set()]))
    f = soak.fig
    assert (f.samples, f.max_drift, f.max_live_drift, f.peak_used) == (2, 4, 4, 9)
    assert f.over_limit == ["soak-00 ran 5 > 4"]


def _final(soak: Soak, **fig: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    for name, value in fig.items():
        setattr(soak.fig, name, value)
    soak.fig.churn.update(kill=2, drain=1, join=3, hub_restart=1)
    final = {**_reading([{"a"}, {"b", "c"}, set()], [{"a"}, {"b", "c"}, set()]), "exact": True, "settle_s": 1.5}
    empty = {**_reading([set(), set(), set()], [set(), set(), set()]), "exact": True, "settle_s": 0.5}
    return final, empty


def _report(soak: Soak, final: dict[str, Any], empty: dict[str, Any], ready: list[int] | None = None) -> dict[str, Any]:
    return soak.report(final, empty, 3, ready or [200, 200], 8.0)


def test_a_clean_soak_passes_every_check() -> None:
    soak = _soak()
    res = _report(soak, *_final(soak))
    assert res["passed"] and all(res["checks"].values()), res["checks"]
    assert (res["final"]["redis_used"], res["final"]["workers_real"], res["final"]["ended_at_end"]) == (3, 3, 3)


def _unsettled(final: dict[str, Any], empty: dict[str, Any]) -> None:
    final["exact"] = False  # the counts agree, but a lease was never confirmed before the timeout


def _left_running(final: dict[str, Any], empty: dict[str, Any]) -> None:
    empty["own"]["soak-01"] = empty["held"]["soak-01"] = {"b"}  # Redis and the worker agree on a session not ended


@pytest.mark.parametrize(("defect", "fig", "ready", "failed"), [
    (_unsettled, {}, None, "redis_equals_workers"),
    (_left_running, {}, None, "empty_after_ending_all"),
    (None, {"over_limit": ["soak-00 ran 5 > 4"]}, None, "never_above_max_streams"),
    (None, {"errors": ["DELETE: 500"]}, None, "no_unexpected_errors"),
    (None, {}, [200, 503], "hubs_ready"),
    (None, {"churn": Counter(kill=3, join=3, hub_restart=1)}, None, "churn_happened"),
])
def test_the_soak_fails_on_each_thing_it_checks(defect: Callable[..., None] | None, fig: dict[str, Any],
                                                 ready: list[int] | None, failed: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    soak = _soak()
    final, empty = _final(soak, **fig)
    if "churn" in fig:
        soak.fig.churn = fig["churn"]
    if defect:
        defect(final, empty)
    res = _report(soak, final, empty, ready)
    assert not res["passed"] and [name for name, ok in res["checks"].items() if not ok] == [failed]
    bench.soak._print(res)
    assert capsys.readouterr().out.splitlines()[-1] == f"final check: FAIL {failed}"


def test_the_soak_prints_every_refusal_counted_once(capsys: pytest.CaptureFixture[str]) -> None:
    soak = _soak()
    final, empty = _final(soak, refused=Counter(no_capacity=3, draining=2), hub_restart_errors=4)
    bench.soak._print(_report(soak, final, empty))
    out = capsys.readouterr().out
    assert "  503s 5 {'no_capacity': 3, 'draining': 2}, errors during the hub restart 4, unexpected errors 0" in out
    assert "after ending all 3: redis 0, workers 0" in out and "final check: PASS" in out


class _Http:
    """Answers a soak user's requests from a script (a response, or an error to raise); ``on_error`` runs first."""

    def __init__(self, *answers: httpx.Response | Exception, on_error: Callable[[], None] = lambda: None) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, str]] = []
        self.on_error = on_error

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        self.asked.append((method, url))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            self.on_error()
            raise answer
        return answer


async def _users(soak: Soak, http: _Http, count: int) -> None:
    for _ in range(count):
        await soak.user(http)  # type: ignore[arg-type]
    assert not http.answers


async def test_soak_users_count_started_reused_ended_and_already_gone_sessions() -> None:
    soak = _soak()
    await _users(soak, _Http(httpx.Response(201, json={"session_id": "s1"}), httpx.Response(204),
                             httpx.Response(200, json={"session_id": "s1"}), httpx.Response(404),
                             httpx.Response(201, json={"session_id": "s2"}), httpx.Response(404)), 3)
    f = soak.fig
    assert (f.started, f.reused, f.ended, f.already_gone, f.errors) == (2, 1, 1, 2, [])


async def test_a_soak_refusal_counts_only_with_a_retry_after_of_a_second_or_more() -> None:
    soak = _soak()
    busy = {"error": "no_capacity"}
    await _users(soak, _Http(httpx.Response(503, json=busy, headers={"Retry-After": "1"}),
                             httpx.Response(503, json=busy, headers={"Retry-After": "0"}),
                             httpx.Response(503, json=busy)), 3)
    assert soak.fig.refused == Counter(no_capacity=1)
    assert len(soak.fig.errors) == 2 and all(e.startswith("503 without Retry-After") for e in soak.fig.errors)


async def test_a_soak_request_that_fails_is_expected_only_from_a_hub_killed_meanwhile() -> None:
    soak = _soak()
    await _users(soak, _Http(httpx.ConnectError("refused")), 1)
    assert soak.fig.hub_restart_errors == 0 and len(soak.fig.errors) == 1
    soak = _soak()
    await _users(soak, _Http(httpx.ConnectError("refused"), on_error=lambda: soak.hub_down.update({0, 1})), 1)
    assert soak.fig.hub_restart_errors == 1 and soak.fig.errors == []


async def test_the_soak_reads_live_leases_only_and_counts_the_confirmed_ones(redis_server: EmbeddedRedis) -> None:
    """soak-00 holds a confirmed lease, a pending one and an expired confirmed one (a dead worker's, not purged)."""
    flush(sync_redis(redis_server.url))
    store = async_redis(redis_server.url, decode_responses=True)
    try:
        seconds, micros = await store.time()
        now_ms = seconds * 1000 + micros // 1000
        k = keys.worker_keys("soak-00")
        await store.zadd(k.leases, {"live": now_ms + 60_000, "pending": now_ms + 60_000, "expired": now_ms - 1000})
        await store.hset(k.active, mapping={"live": "{}", "expired": "{}"})
        m = await _soak().measure(None, store)  # type: ignore[arg-type]
    finally:
        await store.aclose()
    assert m is not None
    assert m["held"] == {"soak-00": {"live", "pending"}, "soak-01": set(), "soak-02": set()}
    assert m["confirmed"] == {"soak-00": 1, "soak-01": 0, "soak-02": 0}
    assert m["own"] == {"soak-00": set(), "soak-01": set(), "soak-02": set()}  # none of them is running


async def test_the_soak_has_settled_only_when_every_lease_redis_holds_is_confirmed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    soak = _soak()
    pending = _reading([{"a"}, set(), set()], [{"a"}, set(), set()], confirmed=[0, 0, 0])

    async def measure(http: object, store: object) -> dict[str, Any]:
        return pending

    monkeypatch.setattr(soak, "measure", measure)
    assert (await soak.settle(None, None, timeout_s=-1))["exact"] is False  # type: ignore[arg-type]
    pending["confirmed"]["soak-00"] = 1
    assert (await soak.settle(None, None, timeout_s=-1))["exact"] is True  # type: ignore[arg-type]


async def test_ending_everything_counts_the_sessions_a_hub_ended() -> None:
    soak = _soak()
    deletes: list[str] = []

    class Http:
        async def get(self, url: str, headers: dict[str, str], params: dict[str, Any]) -> httpx.Response:
            assert params == {"limit": MAX_PAGE}  # the largest page: the soak's fleet holds far fewer
            return httpx.Response(200, json={"sessions": [{"session_id": f"s{i}"} for i in range(3)],
                                             "next_cursor": None})

        async def delete(self, url: str) -> httpx.Response:
            deletes.append(url)
            return httpx.Response(404 if url.endswith("s1") else 204)

    assert await soak.end_everything(Http()) == 2  # type: ignore[arg-type]
    assert deletes == [f"{soak.hubs[n % 2].url}/api/v1/sessions/s{n}" for n in range(3)]


def test_the_soak_offers_1_2_times_what_its_initial_workers_can_hold(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Quick: six slots, one stopped, 3 s holds: 1.2 x 5 workers x 4 streams / 3 s = 8 users/s."""
    started: list[tuple[Any, ...]] = []

    class Started(Exception):
        pass

    class FakeSoak:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started.append((*args, kwargs))

        def up(self) -> None:
            pass

        def down(self) -> None:
            pass

        async def run(self, rate_per_s: float) -> dict[str, Any]:
            started.append((rate_per_s,))
            raise Started

    monkeypatch.setattr(bench.soak, "Soak", FakeSoak)
    monkeypatch.setattr(bench.soak, "ROOT", tmp_path)
    for argv, soak_args, rate in ((["--quick"], (13.0, 6, 5, 3.0, {"churn_every_s": 2.5, "seed": 1}), 8.0),
                                  (["--workers", "12", "--minutes", "2"],
                                   (120.0, 12, 10, 10.0, {"churn_every_s": 10.0, "seed": 1}), 4.8)):
        started.clear()
        monkeypatch.setattr(sys, "argv", ["bench.soak", *argv])
        with pytest.raises(Started):
            bench.soak.main()
        assert started[0] == soak_args and started[1] == (pytest.approx(rate),)


# --- the plots ---------------------------------------------------------------------------------------------------


def _plotted(axes: Any) -> dict[str, list[float]]:
    return {line.get_label(): [float(y) for y in line.get_ydata()] for line in axes.lines}


def test_the_plots_draw_each_figure_under_its_own_label(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    import bench.plots

    rows = [{"workers": 100, "per_s": 1000.0, "p50_ms": 10.0, "p99_ms": 20.0},
            {"workers": 1000, "per_s": 800.0, "p50_ms": 12.0, "p99_ms": 30.0}]
    (tmp_path / "allocation.json").write_text(json.dumps({
        "rows": rows, "health": {"per_s": 4000.0}, "concurrency": 32,
        "baseline": [{"mode": "baseline", "workers": 1000, "per_s": 8.0}]}))
    (tmp_path / "routing.json").write_text(json.dumps({"rows": [
        {"policy": "hub-spread", "mean_km": 500.0, "p95_km": 1500.0, "gpu_hours": 90.0},
        {"policy": "original", "mean_km": 900.0, "p95_km": 4000.0, "gpu_hours": 120.0}]}))
    monkeypatch.setattr(bench.plots, "RES", tmp_path)
    plt.close("all")
    try:
        bench.plots.allocation()
        throughput, latency = plt.gcf().axes
        assert _plotted(throughput) == {"hub allocations/s": [1000.0, 800.0],
                                        "GET /health (HTTP floor)": [4000.0, 4000.0],
                                        "baseline (original design)": [8.0]}
        assert _plotted(latency) == {"p50": [10.0, 12.0], "p99": [20.0, 30.0]}
        bench.plots.routing()
        distance, gpu_hours = plt.gcf().axes
        bars = {c.get_label(): [p.get_height() for p in c.patches] for c in distance.containers}
        assert bars == {"mean": [500.0, 900.0], "p95": [1500.0, 4000.0]}
        assert [p.get_height() for p in gpu_hours.patches] == [90.0, 120.0]
    finally:
        plt.close("all")
    assert (tmp_path / "allocation.png").exists() and (tmp_path / "routing.png").exists()


def test_the_plots_answer_help_without_drawing_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench.plots --help`` says what the script draws and leaves the published figures alone."""
    pytest.importorskip("matplotlib")
    import bench.plots

    drawn: list[str] = []
    monkeypatch.setattr(bench.plots, "allocation", lambda: drawn.append("allocation"))
    monkeypatch.setattr(bench.plots, "routing", lambda: drawn.append("routing"))
    monkeypatch.setattr(sys, "argv", ["bench.plots", "--help"])
    with pytest.raises(SystemExit) as exited:
        bench.plots.main()
    assert exited.value.code == 0 and drawn == []
    assert "usage:" in capsys.readouterr().out


def test_the_whole_listing_of_the_sre_views_bench_reads_every_page() -> None:
    """``whole listing`` is every page of the worker listing, as ``fleet workers`` reads it, not the first."""
    import os

    import psutil

    import bench.sre_views

    asked: list[str | None] = []

    def page(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        asked.append(cursor)
        assert len(asked) <= 3, f"pages asked: {asked}"
        nxt = {None: "a", "a": "b", "b": None}[cursor]
        return httpx.Response(200, json={"workers": [{"worker_id": f"after-{cursor}"}] * 2, "next_cursor": nxt})

    with httpx.Client(base_url="http://hub", transport=httpx.MockTransport(page)) as client:
        listing = bench.sre_views.whole_listing(client, psutil.Process(os.getpid()))
    assert (listing["pages"], listing["workers"]) == (3, 6)


def test_percentiles_are_nearest_rank() -> None:
    """p99 of 100 samples is the 99th fastest: taking the slowest made p99 one rank high whenever p x n is whole."""
    hundred = [float(n) for n in range(1, 101)]
    assert bench.loadgen.nearest_rank(hundred, 99) == 99.0
    assert bench.loadgen.nearest_rank(hundred, 50) == 50.0
    assert bench.loadgen.nearest_rank([7.0], 99) == 7.0
    assert math.isnan(bench.loadgen.nearest_rank([], 50))


async def test_a_soak_user_or_churn_step_that_crashes_is_an_error_of_the_run() -> None:
    """A user task that raised was dropped from the running set and its exception never read: the soak could print
    PASS over users that crashed. Both a crashed user and a crashed churn step now land in the run's errors."""
    soak = _soak()

    async def crashing_user(http: Any) -> None:
        raise ValueError("no session id in the answer")

    async def crashing_join() -> None:
        raise RuntimeError("the worker did not start")

    soak.user = crashing_user  # type: ignore[method-assign]
    soak.load_s, soak.t0 = 0.05, time.monotonic()
    users = await soak.load(SimpleNamespace(), rate_per_s=200)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the done callbacks of the last users
    soak.spawn(crashing_join())
    await asyncio.gather(*users, *soak.churning, return_exceptions=True)
    await asyncio.sleep(0)
    crashes = sorted({error.rsplit(".", 1)[-1] for error in soak.fig.errors})  # without the test's qualname
    assert crashes == ["crashing_join crashed: RuntimeError the worker did not start",
                       "crashing_user crashed: ValueError no session id in the answer"]

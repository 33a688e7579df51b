"""The benches' models of the system: the baseline router's slots, the soak's offered load, the routing fleet."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.baselines.original_router import Slots, populate, route, score_worker
from bench.routing import (
    CITIES,
    Options,
    Result,
    Sim,
    Worker,
    _summary,
    diurnal,
    load_fleet,
    make_trace,
    optimum_mean_km,
    simulate,
)
from bench.routing_hubs import _status
from bench.soak import hold_s
from shared.geo import AWS_REGIONS, haversine_km
from shared.models import Policy
from tests.conftest import async_redis
from worker.capacity import compute_capacity
from worker.engines.synthetic import DEFAULT_PROFILE
from worker.gpus import parse_simulated

FLEET = Path(__file__).resolve().parent.parent / "bench" / "fleet.yaml"
#: AWS's published figures: GPUs, vCPUs, memory (GiB).
INSTANCES = {"g4dn.xlarge": ("t4", 4, 16), "g5.xlarge": ("a10g", 4, 16), "g5.2xlarge": ("a10g", 8, 32),
             "g5.12xlarge": ("a10gx4", 48, 192)}


async def test_baseline_gives_back_the_slot_of_a_worker_that_was_full(redis_url: str) -> None:
    """Regression: ending a session re-ran the take script with +1, which refuses a full worker, so a worker that
    once reached max_streams kept its slots forever."""
    r = async_redis(redis_url, decode_responses=True)
    try:
        await populate(r, 1, ["eu-west-1"], max_streams=1)
        slots = Slots(r)
        user = {"lat": 51.5, "lon": -0.1}
        first = await route(r, slots, user, pipelined=False)
        assert first == "w00000"
        assert await route(r, slots, user, pipelined=False) is None  # full
        assert await slots.give(first)
        assert await route(r, slots, user, pipelined=False) == "w00000"
        assert await slots.give(first)
        assert not await slots.give(first), "a worker with every slot free has none to give back"
    finally:
        await r.aclose()


def test_soak_holds_average_the_documented_mean() -> None:
    """Regression: lognormvariate(0, 0.5) averages e^0.125 = 1.13, so a '10 s' hold was 11.3 s and the offered load
    1.36x capacity instead of 1.2x."""
    rng = random.Random(3)
    holds = [hold_s(rng, 10.0) for _ in range(200_000)]
    assert abs(sum(holds) / len(holds) - 10.0) < 0.1


def test_routing_fleet_streams_are_what_its_workers_would_register() -> None:
    """Regression: the fleet gave a g5.2xlarge (one A10G) 16 streams where the capacity formula gives 12."""
    fleet = load_fleet(FLEET)
    assert {x.itype for x in fleet} <= INSTANCES.keys()
    for x in fleet:
        gpus, vcpus, ram_gib = INSTANCES[x.itype]
        registered = compute_capacity(parse_simulated(gpus), DEFAULT_PROFILE, cpu_cores=vcpus, ram_mb=ram_gib * 1024)
        assert (x.itype, x.max_streams) == (x.itype, registered.max_streams)


def _worker(idx: int, region: str, max_streams: int) -> Worker:
    loc = AWS_REGIONS[region]
    return Worker(idx, f"{region}-{idx}", region, "g5.2xlarge", loc.lat, loc.lon, max_streams, 1, 40.0)


def _hub_sim(fleet: list[Worker], hubs: int) -> Sim:
    sim = Sim("hub-spread", fleet, hubs=hubs, refresh_s=1.0, heartbeat_s=3.0, cooldown_s=600.0, seed=1)
    for hub in sim.hubs:
        hub.phase_s = 0.0  # both refresh on the whole second
    return sim


DUBLIN = (53.35, -6.26)


def test_a_hub_that_missed_another_hubs_reservation_is_refused_and_re_ranks() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 1), _worker(1, "us-east-1", 1)
    sim = _hub_sim([ireland, virginia], hubs=2)
    placed = sim.choose(10.2, *DUBLIN)  # the first hub
    assert placed is ireland
    sim.take(ireland, 10.2)
    # The second hub last read the board at 10.0: Ireland looks free, the reservation says full.
    assert sim.choose(10.5, *DUBLIN) is virginia
    assert sim.refused == 1 and sim.forced_refreshes == 0


def test_a_slot_returns_at_the_workers_next_heartbeat_and_a_hub_reads_the_board_when_it_finds_none() -> None:
    ireland = _worker(0, "eu-west-1", 1)
    sim = _hub_sim([ireland], hubs=1)
    ireland.heartbeat_phase_s = 0.5
    assert sim.choose(1.0, *DUBLIN) is ireland
    sim.take(ireland, 1.0)
    heartbeat = sim.end(ireland, 5.0)  # the user leaves; the worker reports it at its next heartbeat
    assert heartbeat == 6.5
    assert sim.choose(6.0, *DUBLIN) is None and sim.free_total == 0  # a full reject a heartbeat away from a slot
    sim.give(ireland, heartbeat)
    # The hub's periodic read (6.0) still had the worker full; finding no candidate, it reads the board again.
    assert sim.choose(6.7, *DUBLIN) is ireland
    assert sim.forced_refreshes == 2 and sim.refused == 0


# --- the routing simulator's figures, on scenarios small enough to work out by hand ---------------------------

LONDON, SYDNEY = ([c[0] for c in CITIES].index(name) for name in ("London", "Sydney"))


def _policy_sim(policy: str, fleet: list[Worker]) -> Sim:
    return Sim(policy, fleet, hubs=0, refresh_s=1.0, heartbeat_s=3.0, cooldown_s=600.0, seed=1)


def test_demand_is_lowest_at_four_and_highest_at_twenty_local_time() -> None:
    assert diurnal(4.0) == pytest.approx(0.1) and diurnal(20.0) == pytest.approx(1.0)
    assert diurnal(12.0) == pytest.approx(0.55)  # half way up the 16 h rise
    assert diurnal(0.0) == pytest.approx(0.55)  # half way down the 8 h fall
    assert all(0.1 <= diurnal(h / 4) <= 1.0 for h in range(96))


def _two_region_fleet(cap: int) -> list[Worker]:
    return [_worker(0, "eu-west-1", cap), _worker(1, "ap-southeast-2", cap)]


@pytest.fixture
def london_and_sydney_trace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int, float]]:
    """24 h of two cities on UTC: London (3 M people) nearest Ireland, Sydney (1 M) nearest Sydney, 100 streams
    each. Ireland is the busiest region, so its expected peak concurrency is its 100 streams."""
    monkeypatch.setattr("bench.routing.CITIES", [("London", 51.51, -0.13, 3.0, 0), ("Sydney", -33.87, 151.21, 1.0, 0)])
    return make_trace(24, _two_region_fleet(100), 1.0, seed=3)


def test_the_trace_peaks_the_busiest_region_at_its_capacity(
        london_and_sydney_trace: list[tuple[float, int, float]]) -> None:
    mean_len_s = 8 * 60 * math.exp(0.8 ** 2 / 2)  # a lognormal's mean, not its 8 min median
    peak_arrivals_per_min = 100 / (mean_len_s / 60)  # Little's law: concurrency = rate x mean length
    per_person = peak_arrivals_per_min / 3.0  # London's 3 M at its 20:00 peak
    expected = per_person * 4.0 * sum(diurnal(m / 60) for m in range(1440))
    assert len(london_and_sydney_trace) == pytest.approx(expected, rel=0.03)


def test_the_trace_weights_cities_by_population(london_and_sydney_trace: list[tuple[float, int, float]]) -> None:
    london = sum(1 for _, ci, _ in london_and_sydney_trace if ci == 0)
    assert london / (len(london_and_sydney_trace) - london) == pytest.approx(3.0, rel=0.08)


def test_the_trace_spreads_arrivals_over_the_day_with_lognormal_session_lengths(
        london_and_sydney_trace: list[tuple[float, int, float]]) -> None:
    at = [a for a, _, _ in london_and_sydney_trace]
    assert at == sorted(at) and 0 <= at[0] < 60 and 86_340 <= at[-1] < 86_400  # seconds, a minute at a time
    lengths = np.array([n for _, _, n in london_and_sydney_trace])
    assert float(np.median(lengths)) == pytest.approx(8 * 60, rel=0.05)
    assert float(lengths.mean()) == pytest.approx(8 * 60 * math.exp(0.8 ** 2 / 2), rel=0.05)


def test_each_citys_demand_follows_its_own_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """00:00-01:00 UTC is 08:00 in UTC+8 (demand ~0.27) and 16:00 in UTC-8 (~0.9)."""
    monkeypatch.setattr("bench.routing.CITIES", [("East", 51.51, -0.13, 1.0, 8), ("West", 51.51, -0.13, 1.0, -8)])
    trace = make_trace(1, [_worker(0, "eu-west-1", 1000)], 1.0, seed=3)
    east = sum(1 for _, ci, _ in trace if ci == 0)
    west = len(trace) - east
    assert west / east == pytest.approx(
        sum(diurnal(16 + m / 60) for m in range(60)) / sum(diurnal(8 + m / 60) for m in range(60)), rel=0.15)


def test_nearest_sends_each_user_to_the_nearest_free_worker_whose_heartbeat_gives_slots_back() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 2), _worker(1, "us-east-1", 2)
    sim = _policy_sim("nearest", [ireland, virginia])
    for t in (1.0, 2.0):
        assert sim.choose(t, *DUBLIN) is ireland
        sim.take(ireland, t)
    assert sim.choose(3.0, *DUBLIN) is virginia  # Ireland is full
    sim.give(ireland, sim.end(ireland, 4.0))
    assert sim.free_total == 3
    assert sim.choose(7.0, *DUBLIN) is ireland


def test_least_loaded_compares_the_share_of_streams_in_use_and_breaks_ties_by_distance() -> None:
    virginia, ireland = _worker(0, "us-east-1", 12), _worker(1, "eu-west-1", 2)
    sim = _policy_sim("least-loaded", [virginia, ireland])
    assert sim.choose(1.0, *DUBLIN) is ireland  # both idle: the nearer
    sim.take(ireland, 1.0)
    sim.take(virginia, 1.0)
    assert sim.choose(2.0, *DUBLIN) is virginia  # 1 of 12 is less loaded than 1 of 2


def test_random_never_picks_a_full_worker() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 1), _worker(1, "us-east-1", 1)
    sim = _policy_sim("random", [ireland, virginia])
    sim.take(ireland, 0.0)
    assert all(sim.choose(1.0, *DUBLIN) is virginia for _ in range(20))


def test_the_original_design_trades_distance_against_load_with_its_weights() -> None:
    """Dublin user. Ireland with 1 of 2 streams in use scores 0.4 x 1 + 0.3 x 0.5 + 0.2 x 0.96 + 0.1 x 0.5 = 0.79;
    an idle Sydney, 17,000 km away, 0.4 x 0.15 + 0.3 + 0.192 + 0.1 = 0.65. Full, Ireland would still score 0.59
    against Sydney's 0.45 at 1 of 2, but a full worker is not a candidate."""
    ireland, sydney = _worker(0, "eu-west-1", 2), _worker(1, "ap-southeast-2", 2)
    sim = _policy_sim("original", [ireland, sydney])
    sim.take(ireland, 0.0)
    assert sim.choose(1.0, *DUBLIN) is ireland
    sim.take(ireland, 1.0)
    sim.take(sydney, 1.0)
    assert sim.choose(2.0, *DUBLIN) is sydney


def test_the_original_design_prefers_the_faster_of_two_equal_workers() -> None:
    loc = AWS_REGIONS["eu-west-1"]
    slow = Worker(0, "slow", "eu-west-1", "g4dn.xlarge", loc.lat, loc.lon, 7, 1, 70.0)
    fast = Worker(1, "fast", "eu-west-1", "g5.2xlarge", loc.lat, loc.lon, 7, 1, 40.0)
    assert _policy_sim("original", [slow, fast]).choose(1.0, *DUBLIN) is fast


def test_the_baseline_scores_a_worker_with_the_seeds_weights() -> None:
    """At the antipode the distance term is 0: 0.3 x (1 - 1/4) + 0.2 x (1 - 50/1000) + 0.1 x 3/4 = 0.49."""
    loc = AWS_REGIONS["eu-west-1"]
    w = {"location": {"lat": loc.lat, "lon": loc.lon}, "current_load": 1, "max_capacity": 4, "max_streams": 4,
         "available_streams": 3, "avg_response_time_ms": 50.0}
    antipode = {"lat": -loc.lat, "lon": loc.lon + 180}
    assert score_worker(antipode, w) == pytest.approx(0.49)
    assert score_worker({"lat": loc.lat, "lon": loc.lon}, w) == pytest.approx(0.89)


async def test_baseline_routes_to_the_best_scored_worker_with_a_free_stream(redis_url: str) -> None:
    """London. A full Ireland scores 0.4 x 1 + 0.2 x 0.96 = 0.59, above a Sydney with 3 of 4 streams in use
    (0.4 x 0.15 + 0.3 x 0.25 + 0.2 x 0.96 + 0.1 x 0.25 = 0.35), but only a worker with a free stream is taken."""
    r = async_redis(redis_url, decode_responses=True)
    try:
        await populate(r, 2, ["eu-west-1", "ap-southeast-2"], max_streams=4)  # w00000 Ireland, w00001 Sydney
        slots = Slots(r)
        user = {"lat": 51.5, "lon": -0.1}
        assert await route(r, slots, user, pipelined=False) == "w00000"
        for wid in ("w00000",) * 3 + ("w00001",) * 3:
            assert await slots.take(wid)
        assert not await slots.take("w00000"), "the reservation script refuses a full worker"
        assert await route(r, slots, user, pipelined=False) == "w00001"
    finally:
        await r.aclose()


def test_a_hub_learns_its_own_reservation_at_once() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 1), _worker(1, "us-east-1", 1)
    sim = _hub_sim([ireland, virginia], hubs=1)
    assert sim.choose(10.2, *DUBLIN) is ireland
    sim.take(ireland, 10.2)
    assert sim.choose(10.4, *DUBLIN) is virginia  # before its next read of the board
    assert sim.refused == 0


def test_a_hub_sees_another_hubs_reservation_at_its_next_read_of_the_board() -> None:
    ireland, virginia = _worker(0, "eu-west-1", 1), _worker(1, "us-east-1", 1)
    sim = _hub_sim([ireland, virginia], hubs=2)
    assert sim.choose(10.2, *DUBLIN) is ireland  # the first hub
    sim.take(ireland, 10.2)
    assert sim.choose(11.5, *DUBLIN) is virginia  # the second hub read the board at 11.0
    assert sim.refused == 0


def test_each_hub_policy_ranks_with_its_own_board_policy() -> None:
    for policy, board_policy in (("hub-spread", Policy.SPREAD), ("hub-pack", Policy.PACK)):
        sim = Sim(policy, [_worker(0, "eu-west-1", 2)], hubs=2, refresh_s=1.0, heartbeat_s=3.0, cooldown_s=600.0,
                  seed=1)
        assert [hub.board.policy for hub in sim.hubs] == [board_policy, board_policy]


def test_a_workers_board_status_gives_the_share_of_its_streams_running() -> None:
    assert json.loads(_status(_worker(0, "eu-west-1", 12), 3))["gpu_utilization"] == 25.0


def test_the_optimum_fills_each_workers_slots_with_the_sessions_nearest_it() -> None:
    """Worker 0 has 2 slots, worker 1 one. Of three live sessions one must go to worker 1: city 2 (+100 km), so the
    optimum is (100 + 200 + 400) / 3; the policy put them at 1000, 5000 and 300 km."""
    fleet = [_worker(0, "eu-west-1", 2), _worker(1, "us-east-1", 1)]
    dist = np.array([[100.0, 1000.0], [200.0, 5000.0], [300.0, 400.0]])
    actual, optimum = optimum_mean_km([(0, 1), (1, 1), (2, 0)], fleet, dist)
    assert actual == pytest.approx(6300 / 3) and optimum == pytest.approx(700 / 3)


def _simulate(tmp_path: Path, policy: str, regions: list[str], trace: list[tuple[float, int, float]],
              snapshot_s: float = 3600.0) -> Result:
    """One hour of ``trace`` on one worker per region: 2 streams, 4 GPUs; heartbeats every 1 s, 10 min cool-down."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(json.dumps({"instance_types": {"tiny": {"gpu": "a10g", "gpus": 4, "vcpus": 1, "ram_gib": 16,
                                                             "latency_ms": 40}},
                                 "regions": {r: {"tiny": 1} for r in regions}}))
    opts = Options(hours=1.0, hubs=2, refresh_s=1.0, heartbeat_s=1.0, cooldown_s=600.0, seed=1, snapshot_s=snapshot_s)
    return simulate(policy, trace, fleet, opts)[0]


def test_a_request_refused_by_a_full_fleet_is_a_full_reject_and_a_heartbeat_lag_one_while_a_session_is_over(
        tmp_path: Path) -> None:
    trace = [(0.0, LONDON, 100.0), (1.0, LONDON, 100.0), (2.0, LONDON, 10.0),  # the third finds both streams taken
             (100.000001, LONDON, 10.0),  # the first user left at 100 s; the worker reports it within 1 s
             (200.0, LONDON, 10.0)]  # both streams back
    res = _simulate(tmp_path, "nearest", ["eu-west-1"], trace)
    assert (res.accepted, res.false_rejects, res.full_rejects, res.heartbeat_lag_rejects) == (3, 0, 2, 1)


# London users on Ireland: 0-60 s, 400-460 s (in the cool-down), 2000-2060 s (after it), 3200-3300 s (up at the
# end, in its cool-down); a Sydney user on Sydney from 3400 s to past the end. Slots come back within 1 s.
GPU_TRACE = [(0.0, LONDON, 60.0), (400.0, LONDON, 60.0), (2000.0, LONDON, 60.0), (3200.0, LONDON, 100.0),
             (3400.0, SYDNEY, 1000.0)]


def test_a_worker_is_charged_gpu_hours_for_every_gpu_from_its_first_session_to_the_end_of_its_cool_down(
        tmp_path: Path) -> None:
    res = _simulate(tmp_path, "nearest", ["eu-west-1", "ap-southeast-2"], GPU_TRACE)
    ireland_s = (460 + 600) + (60 + 600) + (3600 - 3200)  # the last cool-down runs past the end of the hour
    sydney_s = 3600 - 3400
    assert res.gpu_hours * 3600 / 4 == pytest.approx(ireland_s + sydney_s + 2, abs=1.5)


def test_region_utilisation_is_the_time_average_of_streams_held(tmp_path: Path) -> None:
    res = _simulate(tmp_path, "nearest", ["eu-west-1", "ap-southeast-2"], GPU_TRACE)
    assert res.region_util["eu-west-1"] * 2 * 3600 == pytest.approx(60 + 60 + 60 + 100 + 2, abs=2.5)
    assert res.region_util["ap-southeast-2"] * 2 * 3600 == pytest.approx(200)


def test_distances_and_the_ratio_to_the_optimum_are_over_the_live_sessions_in_km(tmp_path: Path) -> None:
    """Round-robin: London's first user goes to Sydney (worker 0) for the hour, the second to Ireland and leaves at
    15 s. At the 100 s snapshot only the first is live; the optimum would have put it in Ireland."""
    trace = [(0.0, LONDON, 3000.0), (10.0, LONDON, 5.0), (150.0, LONDON, 5.0)]
    res = _simulate(tmp_path, "round-robin", ["ap-southeast-2", "eu-west-1"], trace, snapshot_s=100.0)
    london = CITIES[LONDON]
    to_sydney = haversine_km(london[1], london[2], AWS_REGIONS["ap-southeast-2"].lat, AWS_REGIONS["ap-southeast-2"].lon)
    to_ireland = haversine_km(london[1], london[2], AWS_REGIONS["eu-west-1"].lat, AWS_REGIONS["eu-west-1"].lon)
    assert res.distances == pytest.approx([to_sydney, to_ireland, to_sydney])
    assert res.ratios == pytest.approx([to_sydney / to_ireland])


def test_the_summary_compares_pack_with_the_original_design_and_counts_only_false_rejects() -> None:
    row = {"vs_optimum": 1.05, "false_rejects": 0, "full_rejects": 5, "refused_reservations": 2}
    by = {"hub-spread": {**row, "gpu_hours": 1000.0}, "hub-pack": {**row, "gpu_hours": 750.0},
          "original": {**row, "gpu_hours": 1000.0}}
    summary = _summary(by)
    assert summary["pack_gpu_hour_saving"] == 0.25  # 25% fewer GPU-hours than the original
    assert summary["hub_false_rejects"] == 0 and summary["hub_refused_reservations"] == 4

"""Ranking over the routing board: the cached per-member scores give exactly what scoring every eligible worker
from scratch gives, whatever the policy, after any sequence of slot changes."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any

import pytest

from hub.board import Entry, RoutingBoard
from hub.scoring import Weights, distance_factor, factors, load_factors, score
from hub.store import BoardRead
from shared.geo import AWS_REGIONS, EARTH_RADIUS_KM, haversine_km, rtt_estimate_ms
from shared.models import Policy

REGIONS = list(AWS_REGIONS)[:6]


def board_of(n: int, policy: Policy, rng: random.Random) -> RoutingBoard:
    board = RoutingBoard(store=None, ttl_ms=9000, retention_ms=3_600_000, policy=policy,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=0.02, rng=random.Random(1))
    board.now_ms = 1_000_000
    for i in range(n):
        region = REGIONS[i % len(REGIONS)]
        loc = AWS_REGIONS[region]
        labels = {"gpu": "a10g"} if i % 3 else {"gpu": "t4"}
        max_streams = rng.choice([2, 4, 8])
        e = Entry(worker_id=f"w-{i:03d}", url=f"http://w{i}", region=region, zone=None, lat=loc.lat, lon=loc.lon,
                  labels=labels, max_streams=max_streams, static={},
                  used=rng.randrange(max_streams + 1), heartbeat_ms=board.now_ms - rng.randrange(12_000),
                  status={"gpu_utilization": rng.uniform(0, 100), "latency_ms": rng.uniform(5, 400)})
        board.entries[e.worker_id] = e
    board._regroup()
    board._mono_at_refresh = 0.0  # redis_now_ms() stays far in the future of now_ms otherwise
    return board


def from_scratch(board: RoutingBoard, lat: float, lon: float, policy: Policy,
                 labels: dict[str, str] | None = None) -> list[tuple[str, float]]:
    """Score every eligible worker directly, as ``hub.scoring`` defines it."""
    now = board.now_ms
    eligible = [e for e in board.entries.values()
                if e.state == "ready" and now - e.heartbeat_ms < board.ttl_ms and e.used < e.max_streams
                and all(e.labels.get(k) == v for k, v in (labels or {}).items())]
    nearest = min((haversine_km(lat, lon, e.lat, e.lon) for e in eligible), default=0.0)
    out = []
    for e in eligible:
        km = haversine_km(lat, lon, e.lat, e.lon)
        out.append((e.worker_id, score(factors(km, e.used, e.max_streams, e.gpu_utilization, e.latency_ms, policy,
                                               nearest), board.weights)))
    out.sort(key=lambda x: x[1], reverse=True)
    return out


@pytest.mark.parametrize("board_policy", [Policy.SPREAD, Policy.PACK])
def test_ranking_equals_scoring_every_worker_through_slot_changes(board_policy: Policy, monkeypatch: Any) -> None:
    rng = random.Random(11)
    board = board_of(120, board_policy, rng)
    monkeypatch.setattr(board, "redis_now_ms", lambda: board.now_ms)
    for step in range(40):
        lat, lon = rng.uniform(-50, 60), rng.uniform(-170, 170)
        labels = rng.choice([None, {"gpu": "t4"}, {"gpu": "a10g"}])
        for policy in (Policy.SPREAD, Policy.PACK):  # the board's own policy uses cached partial scores
            expected = from_scratch(board, lat, lon, policy, labels)
            explained = board.rank(lat, lon, labels, policy=policy, limit=10, explain=True)
            assert [(r.entry.worker_id, r.score) for r in explained] == expected[:10], f"step {step} {policy}"
            assert all(r.score == score(r.factors, board.weights) for r in explained)
        ranked = board.rank(lat, lon, labels)
        expected = from_scratch(board, lat, lon, board_policy, labels)
        lead = ranked[0].entry.worker_id
        assert expected[0][1] - dict(expected)[lead] <= board.near_best_margin  # the lead is drawn from the near-best
        assert [(r.entry.worker_id, r.score) for r in ranked[1:]] == [x for x in expected if x[0] != lead][:7]
        # slots change between refreshes, as reservations and releases teach the board
        e = rng.choice(list(board.entries.values()))
        board.note_used(e.worker_id, rng.randrange(e.max_streams + 1))


#: (worker id, used, max_streams, labels)
Idle = tuple[str, int, int, dict[str, str]]


def idle_board(workers: list[Idle]) -> RoutingBoard:
    """Workers (id, used, max_streams, labels) in one place, heard from just now, nothing else differing."""
    board = RoutingBoard(store=None, ttl_ms=9000, retention_ms=3_600_000, policy=Policy.SPREAD,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=0.05)
    board.now_ms = 1_000_000
    for wid, used, max_streams, labels in workers:
        board.entries[wid] = Entry(worker_id=wid, url=f"http://{wid}", region="us-east-1", zone=None, lat=38.95,
                                   lon=-77.45, labels=labels, max_streams=max_streams, static={}, used=used,
                                   heartbeat_ms=board.now_ms - 100)
    board._regroup()
    board.redis_now_ms = lambda: board.now_ms  # type: ignore[method-assign]
    return board


CLEARLY_WORSE: Idle = ("w-busy", 4, 5, {})  # 0.19 below an idle worker's score: outside the 0.05 margin

HERDS: dict[str, list[Idle]] = {
    "two near-best": [("w-a", 0, 5, {}), ("w-b", 1, 5, {})],
    "three near-best": [("w-a", 0, 10, {}), ("w-b", 1, 10, {}), ("w-c", 2, 10, {})],
    "20 identical idle": [(f"w-{i:02d}", 0, 5, {}) for i in range(20)],
    "20 identical idle in 4 groups": [(f"w-{i:02d}", 0, 5, {"pool": str(i % 4)}) for i in range(20)],
}


@pytest.mark.parametrize("herd", HERDS)
def test_hubs_with_the_same_snapshot_spread_their_leads_over_every_near_best_worker(herd: str) -> None:
    """Regression: two random picks of the top four, the better one leading, always led with the best of two,
    never chose the third of three, and never went past the fourth of twenty equally idle workers."""
    workers = HERDS[herd]
    board = idle_board([*workers, CLEARLY_WORSE])
    explained = board.rank(40, -75, limit=len(workers) + 1, explain=True)
    near_best = {r.entry.worker_id for r in board.near_best(explained)}
    assert near_best == {wid for wid, *_ in workers}
    leads: Counter[str] = Counter()
    for seed in range(1000):  # 1000 hubs, each with its own random generator, ranking the same snapshot
        board.rng = random.Random(seed)
        ranked = board.rank(40, -75)
        leads[ranked[0].entry.worker_id] += 1
        assert len(ranked) == len({r.entry.worker_id for r in ranked}) <= 8
    assert set(leads) == near_best  # the clearly worse worker never leads; every near-best one does
    fair_share = 1000 / len(near_best)
    assert min(leads.values()) >= fair_share / 2, leads


def test_a_worker_whose_heartbeat_lapsed_since_the_refresh_never_leads() -> None:
    """Regression: only the top four near-best could lead, so the fifth live worker of twenty never did."""
    board = idle_board([(f"w-{i:02d}", 0, 5, {}) for i in range(20)])
    for e in list(board.entries.values())[5:]:
        e.heartbeat_ms = board.now_ms - board.ttl_ms  # still in its group until the next refresh
    leads: Counter[str] = Counter()
    for seed in range(1000):
        board.rng = random.Random(seed)
        leads[board.rank(40, -75)[0].entry.worker_id] += 1
    assert set(leads) == {f"w-{i:02d}" for i in range(5)}
    assert min(leads.values()) >= 1000 / 5 / 2, leads


def test_a_policy_other_than_the_boards_draws_the_lead_from_its_own_near_best() -> None:
    """Its scores do not follow the groups' (spread) order, under which the idle worker is the best."""
    board = idle_board([("w-a", 8, 10, {}), ("w-b", 7, 10, {}), ("w-idle", 0, 10, {})])
    leads: Counter[str] = Counter()
    for seed in range(1000):
        board.rng = random.Random(seed)
        leads[board.rank(40, -75, policy=Policy.PACK)[0].entry.worker_id] += 1
    assert set(leads) == {"w-a", "w-b"} and min(leads.values()) >= 250, leads


def test_a_distance_of_about_ten_ms_of_rtt_halves_the_distance_factor_and_250_ms_of_inference_the_latency_one() -> None:
    """The documented half-points, which set how much extra distance a user is sent for a lighter worker."""
    assert distance_factor(0.0) == 1.0 and distance_factor(1000.0) == pytest.approx(0.5)
    _, latency, _ = load_factors(0, 4, 0.0, 250.0, Policy.SPREAD)
    assert latency == pytest.approx(0.5)


def test_a_workers_load_is_seven_tenths_its_streams_in_use_and_three_tenths_its_gpu_utilization() -> None:
    """What the explain view shows as `load`, and what spread and pack weigh: a hot GPU counts, streams more."""
    for policy in (Policy.SPREAD, Policy.PACK):
        half_the_streams = load_factors(2, 4, 0.0, 0.0, policy)[0]
        a_busy_gpu = load_factors(0, 4, 100.0, 0.0, policy)[0]
        both = load_factors(2, 4, 100.0, 0.0, policy)[0]
        if policy is Policy.SPREAD:
            half_the_streams, a_busy_gpu, both = 1 - half_the_streams, 1 - a_busy_gpu, 1 - both
        assert (half_the_streams, a_busy_gpu, both) == (pytest.approx(0.35), pytest.approx(0.3), pytest.approx(0.65))


#: (region, used, max_streams, status beyond the heartbeat)
Placed = tuple[str, int, int, dict[str, Any]]


def placed_board(workers: dict[str, Placed], margin: float = 0.05) -> RoutingBoard:
    """A board (no store) that has just read ``workers``, each heard from just now, in its region's location."""
    board = RoutingBoard(store=None, ttl_ms=9000, retention_ms=3_600_000, policy=Policy.SPREAD,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=margin)
    board.apply(read_of(workers, 1_000_000, complete=True))
    board.redis_now_ms = lambda: board.now_ms  # type: ignore[method-assign]
    return board


def read_of(workers: dict[str, Placed], now_ms: int, *, complete: bool) -> BoardRead:
    static = {wid: json.dumps({"url": f"http://{wid}", "region": region, "zone": None, "lat": AWS_REGIONS[region].lat,
                               "lon": AWS_REGIONS[region].lon, "labels": {}, "max_streams": max_streams})
              for wid, (region, _, max_streams, _) in workers.items()}
    status = {wid: json.dumps({"hb": now_ms, **figures}) for wid, (_, _, _, figures) in workers.items()}
    used = {wid: str(count) for wid, (_, count, _, _) in workers.items()}
    return BoardRead(static=static, status=status, used=used, now_ms=now_ms, complete=complete)


def leads_of(board: RoutingBoard, region: str, hubs: int = 400) -> set[str]:
    """Which workers lead the ranking of hubs with the same snapshot, for a user in ``region``."""
    loc = AWS_REGIONS[region]
    leads = set()
    for seed in range(hubs):
        board.rng = random.Random(seed)
        leads.add(board.rank(loc.lat, loc.lon)[0].entry.worker_id)
    return leads


def test_a_worker_reporting_slow_inference_never_leads_over_an_equally_loaded_fast_one() -> None:
    board = placed_board({"w-fast": ("us-east-1", 1, 4, {"latency_ms": 10.0}),
                          "w-slow": ("us-east-1", 1, 4, {"latency_ms": 2000.0})})
    assert leads_of(board, "us-east-1") == {"w-fast"}


def test_a_request_with_several_labels_is_offered_only_workers_with_all_of_them() -> None:
    board = idle_board([("w-a10g-pool-x", 0, 5, {"gpu": "a10g", "pool": "x"}),
                        ("w-a10g-pool-y", 0, 5, {"gpu": "a10g", "pool": "y"}),
                        ("w-t4-pool-x", 0, 5, {"gpu": "t4", "pool": "x"})])
    for seed in range(50):
        board.rng = random.Random(seed)
        ranked = board.rank(40, -75, {"gpu": "a10g", "pool": "x"})
        assert [r.entry.worker_id for r in ranked] == ["w-a10g-pool-x"]
    assert [r.entry.worker_id for r in board.rank(40, -75, {"gpu": "a10g", "pool": "z"}, explain=True)] == []


def test_a_worker_that_refused_is_not_offered_again_when_one_of_its_sessions_ends() -> None:
    """Until the next refresh says it is ready again: it timed out or said it is not ready, so a released slot on it
    is no reason to send the next user there."""
    board = idle_board([("w-refused", 1, 5, {}), ("w-other", 3, 5, {})])
    board.note_unavailable("w-refused")
    board.note_used("w-refused", 0)  # a session on it ended meanwhile
    assert [r.entry.worker_id for r in board.rank(40, -75, explain=True)] == ["w-other"]
    assert [r.entry.worker_id for r in board.rank(40, -75)] == ["w-other"]


def test_a_user_whose_nearest_region_lapsed_since_the_refresh_is_scored_from_the_nearest_region_left() -> None:
    """Dublin's only worker went silent after the refresh: a Dublin user is sent next door to busy London, not across
    the Atlantic to idle Virginia (extra distance counts from the nearest worker that can take the session)."""
    board = placed_board({"w-dublin": ("eu-west-1", 0, 4, {}),
                          "w-london": ("eu-west-2", 3, 4, {"gpu_utilization": 100.0, "latency_ms": 2000.0}),
                          "w-virginia": ("us-east-1", 0, 4, {"latency_ms": 10.0})})
    board.entries["w-dublin"].heartbeat_ms = board.now_ms - board.ttl_ms  # still in its group until the next refresh
    assert leads_of(board, "eu-west-1") == {"w-london"}
    london, virginia = board.rank(AWS_REGIONS["eu-west-1"].lat, AWS_REGIONS["eu-west-1"].lon, explain=True)
    assert (london.entry.worker_id, virginia.entry.worker_id) == ("w-london", "w-virginia")
    assert london.factors.distance == 1.0 and london.score == score(london.factors, board.weights)


def test_figures_a_refresh_brings_are_scored_again() -> None:
    """A worker that filled up and slowed down since the last read no longer ranks as the idle worker it was."""
    board = placed_board({"w-a": ("us-east-1", 0, 4, {}), "w-b": ("us-east-1", 0, 4, {})})
    assert leads_of(board, "us-east-1") == {"w-a", "w-b"}
    board.apply(read_of({"w-a": ("us-east-1", 3, 4, {"gpu_utilization": 95.0, "latency_ms": 900.0})}, 1_001_000,
                        complete=False))
    assert leads_of(board, "us-east-1") == {"w-b"}
    explained = board.rank(38.95, -77.45, explain=True)
    assert [r.entry.worker_id for r in explained] == ["w-b", "w-a"]
    assert all(r.score == score(r.factors, board.weights) for r in explained)


def test_a_worker_a_refresh_finds_draining_is_never_ranked() -> None:
    board = placed_board({"w-a": ("us-east-1", 0, 4, {}), "w-b": ("us-east-1", 3, 4, {})})
    board.apply(read_of({"w-a": ("us-east-1", 0, 4, {"state": "draining"})}, 1_001_000, complete=False))
    assert [r.entry.worker_id for r in board.rank(38.95, -77.45, explain=True)] == ["w-b"]
    assert leads_of(board, "us-east-1") == {"w-b"}


def test_between_refreshes_the_board_clock_runs_on_so_a_worker_silent_past_its_ttl_is_not_ranked() -> None:
    board = RoutingBoard(store=None, ttl_ms=9000, retention_ms=3_600_000, policy=Policy.SPREAD,  # type: ignore[arg-type]
                         weights=Weights(), near_best_margin=0.05)
    board.apply(read_of({"w-a": ("us-east-1", 0, 4, {})}, 1_000_000, complete=True))
    assert [r.entry.worker_id for r in board.rank(38.95, -77.45)] == ["w-a"]
    board._mono_at_refresh -= 10.0  # the last refresh was ten seconds ago: its heartbeat lapsed since
    assert board.redis_now_ms() >= board.now_ms + 10_000
    assert board.rank(38.95, -77.45) == []


def test_with_no_margin_the_best_worker_leads_and_the_explanation_marks_it_near_best() -> None:
    board = placed_board({"w-a": ("us-east-1", 0, 4, {}), "w-b": ("us-east-1", 0, 4, {}),
                          "w-busy": ("us-east-1", 3, 4, {})}, margin=0.0)
    assert leads_of(board, "us-east-1") == {"w-a", "w-b"}
    explained = board.rank(38.95, -77.45, explain=True)
    assert {r.entry.worker_id for r in board.near_best(explained)} == {"w-a", "w-b"}


def test_a_refresh_puts_new_workers_on_the_board_in_name_order_whatever_order_it_read_them_in() -> None:
    """Their order breaks ties in ranking: taken from a set, it followed the interpreter's hash seed, and the routing
    bench gave other figures on every run with the same seed."""
    names = [f"w-{i:03d}" for i in range(60)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    board = placed_board({wid: ("us-east-1", 0, 4, {}) for wid in shuffled})
    assert list(board.entries) == names
    later = [f"w-new-{i:02d}" for i in range(20)]
    board.apply(read_of({wid: ("eu-west-1", 0, 4, {}) for wid in reversed(later)}, board.now_ms + 1000,
                        complete=False))
    assert list(board.entries) == names + later


def test_distances_and_round_trips_are_those_of_real_routes() -> None:
    """The explain view's ``distance_km`` and ``rtt_ms`` are what an SRE checks a placement against: London to New
    York is 5,570 km, Sydney to London 16,994, antipodes half the globe apart; a path costs 5 ms plus 1 ms per
    66.7 km (light in fibre at 200 km/ms, a path 1.5 times the great circle, there and back)."""
    assert haversine_km(51.51, -0.13, 40.71, -74.01) == pytest.approx(5570, abs=10)
    assert haversine_km(-33.87, 151.21, 51.51, -0.13) == pytest.approx(16994, abs=10)
    assert haversine_km(0, 0, 0, 180) == haversine_km(90, 0, -90, 0) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(35.68, 139.69, 35.68, 139.69) == 0
    assert rtt_estimate_ms(0) == 5.0
    assert rtt_estimate_ms(3000) == pytest.approx(50.0)


def test_a_benched_worker_is_not_offered_again_when_a_slot_frees_between_refreshes() -> None:
    """A failed dispatch takes the worker out of the ranking at once, and its bench holds until it runs out, whichever
    way a slot comes back: a session that ended on it after a refresh found it ready put it back at once."""
    fleet: dict[str, Placed] = {"w-benched": ("us-east-1", 1, 4, {}), "w-other": ("us-east-1", 3, 4, {})}
    board = placed_board(fleet)
    board.note_failed_dispatch("w-benched", "timeout")
    assert [r.entry.worker_id for r in board.rank(40, -75, explain=True)] == ["w-other"], "offered before a refresh"
    board.apply(read_of(fleet, board.now_ms + 1000, complete=True))  # it heartbeated: ready, as far as the board knows
    assert board.entries["w-benched"].state == "ready"
    board.note_used("w-benched", 0)  # one of its sessions ended
    assert [r.entry.worker_id for r in board.rank(40, -75, explain=True)] == ["w-other"]
    assert [r.entry.worker_id for r in board.rank(40, -75)] == ["w-other"]

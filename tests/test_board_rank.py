"""Ranking over the routing board: the cached per-member scores give exactly what scoring every eligible worker
from scratch gives, whatever the policy, after any sequence of slot changes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from hub.board import Entry, RoutingBoard
from hub.scoring import Weights, factors, score
from shared.geo import AWS_REGIONS, haversine_km
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
        top = {wid for wid, _ in from_scratch(board, lat, lon, board_policy, labels)[:8]}
        assert {r.entry.worker_id for r in ranked} == top
        # slots change between refreshes, as reservations and releases teach the board
        e = rng.choice(list(board.entries.values()))
        board.note_used(e.worker_id, rng.randrange(e.max_streams + 1))

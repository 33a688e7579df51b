"""Pure scoring: plain numbers in, a score out. No I/O, so the hub, the CLI's explain and the routing
simulator share one implementation.

Each factor lies in [0, 1], higher is better; the score is their weighted sum. Under ``pack`` the load and
capacity factors are inverted so the busiest eligible workers fill first and idle GPUs can be scaled in.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.geo import rtt_estimate_ms
from shared.models import Policy

#: Distance at which the distance factor halves; ~10 ms of extra RTT.
_DISTANCE_HALF_KM = 1000.0
#: Inference latency at which the latency factor halves.
_LATENCY_HALF_MS = 250.0
_STREAM_SHARE_OF_LOAD = 0.7


@dataclass(frozen=True, slots=True)
class Weights:
    distance: float = 0.6
    load: float = 0.2
    latency: float = 0.1
    capacity: float = 0.1


@dataclass(frozen=True, slots=True)
class Factors:
    distance_km: float
    rtt_ms: float
    distance: float
    load: float
    latency: float
    capacity: float


def distance_factor(distance_km: float) -> float:
    return 1.0 / (1.0 + distance_km / _DISTANCE_HALF_KM)


def load_factors(
    used: int, max_streams: int, gpu_utilization: float, latency_ms: float, policy: Policy
) -> tuple[float, float, float]:
    """(load, latency, capacity) factors: everything but distance, which is shared by co-located workers."""
    stream_share = used / max_streams if max_streams else 1.0
    load = _STREAM_SHARE_OF_LOAD * stream_share + (1 - _STREAM_SHARE_OF_LOAD) * min(gpu_utilization, 100.0) / 100.0
    free_share = 1.0 - stream_share
    latency = 1.0 / (1.0 + max(latency_ms, 0.0) / _LATENCY_HALF_MS)
    if policy is Policy.PACK:
        return load, latency, 1.0 - free_share
    return 1.0 - load, latency, free_share


def partial_score(load: float, latency: float, capacity: float, w: Weights) -> float:
    return w.load * load + w.latency * latency + w.capacity * capacity


def factors(
    distance_km: float, used: int, max_streams: int, gpu_utilization: float, latency_ms: float, policy: Policy,
    nearest_km: float = 0.0,
) -> Factors:
    """``nearest_km``: the distance of the nearest eligible worker for this request. The distance factor scores
    the *extra* distance beyond it, so a user far from every region (distance factors all small and flat) still
    strongly prefers the nearest one instead of trading thousands of km for a little load."""
    load, latency, capacity = load_factors(used, max_streams, gpu_utilization, latency_ms, policy)
    return Factors(
        distance_km=distance_km,
        rtt_ms=rtt_estimate_ms(distance_km),
        distance=distance_factor(max(0.0, distance_km - nearest_km)),
        load=load,
        latency=latency,
        capacity=capacity,
    )


def score(f: Factors, w: Weights) -> float:
    return w.distance * f.distance + partial_score(f.load, f.latency, f.capacity, w)

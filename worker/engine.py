"""The ``Engine`` protocol: what the worker agent needs from the inference that runs each session.

An engine loads its models once per process (``start``), runs any number of sessions up to the worker's
capacity, reports its VRAM profile (which feeds the capacity formula) and live stats (which feed heartbeats and
so the hub's routing). Engines with a real transport may add HTTP/WebSocket routes to the worker's API.

An engine that can be calibrated (``fleet worker calibrate``) is also ``Calibratable``: it hands out a
``LoadProbe`` that drives sessions started through the normal ``start_session`` the way real users would and
reports, as one ``RealTimeReport``, whether the engine kept real time. The calibrator knows nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fastapi import APIRouter

from shared.models import SessionDispatch


@dataclass(frozen=True, slots=True)
class VramProfile:
    """Memory an engine needs: once per GPU for its models, then per concurrent stream."""

    model_mb: int
    per_stream_mb: int
    headroom_mb: int = 1024
    cpu_cores_per_stream: float = 0.5
    ram_mb_per_stream: int = 1024


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Recent figures an engine reports; ``latency_ms`` becomes the heartbeat's latency."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    active_sessions: int = 0
    vram_used_mb: int = 0


#: Called by an engine when a session ends by itself: (session_id, reason).
SessionEnded = Callable[[str, str], None]


@runtime_checkable
class Engine(Protocol):
    name: str
    profile: VramProfile
    #: Path of the per-session audio WebSocket this engine serves on the worker (``{session_id}`` in it), or None.
    client_audio_path: str | None

    async def start(self) -> None:
        """Load models; the worker registers only after this returns."""

    async def start_session(self, spec: SessionDispatch, on_end: SessionEnded) -> None:
        """Begin serving a session; raise to refuse it."""

    async def stop_session(self, session_id: str) -> None:
        """Stop a session (idempotent)."""

    def stats(self) -> EngineStats:
        """Recent latency, error rate and usage."""

    def router(self) -> APIRouter | None:
        """Extra routes this engine serves on the worker's API (e.g. a WebSocket audio endpoint), or None."""

    async def aclose(self) -> None:
        """Release models and stop every session."""


@dataclass(frozen=True, slots=True)
class RealTimeReport:
    """What a load probe measured over one window; every engine is judged by the same two numbers.

    ``late_ratio``: the share of real-time deadlines missed (frames rendered or heard late, turns answered late).
    ``p95_ms``: the 95th percentile of the latency the engine promises to bound, compared with ``budget_ms``.
    """

    late_ratio: float
    p95_ms: float
    budget_ms: float
    figures: Mapping[str, float] = field(default_factory=dict)
    """Engine-specific detail for the operator (frames, turns, per-stage means, CPU per second of audio…)."""

    def keeps_real_time(self, late_budget: float) -> bool:
        return self.late_ratio <= late_budget and self.p95_ms <= self.budget_ms


class LoadProbe(Protocol):
    """Load like real use for sessions started with ``start_session``, and the measurement of how it went."""

    warmup_s: float
    """How long the load must run before a window means anything (e.g. until the first turns complete)."""

    async def drive(self, session_id: str) -> None:
        """Feed one running session as a real user would, until cancelled."""

    def reset(self) -> None:
        """Start a new measurement window (called after a warm-up)."""

    def report(self) -> RealTimeReport:
        """How the engine kept real time since the last ``reset``."""


@runtime_checkable
class Calibratable(Protocol):
    """An ``Engine`` that ``fleet worker calibrate`` can measure."""

    def load_probe(self) -> LoadProbe:
        """A fresh probe for one calibration step."""


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (the maximum below 20 samples); 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

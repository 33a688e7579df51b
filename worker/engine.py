"""The ``Engine`` protocol: what the worker agent needs from the inference that runs each session.

An engine loads its models once per process (``start``), runs any number of sessions up to the worker's
capacity, reports its VRAM profile (which feeds the capacity formula) and live stats (which feed heartbeats and
so the hub's routing). Engines with a real transport may add HTTP/WebSocket routes to the worker's API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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

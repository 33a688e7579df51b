"""SyntheticEngine: a SIMULATOR of avatar streams, for dev, tests, load tests and capacity calibration.

Each session is an asyncio task that renders "frames" at a fixed cadence, doing a little real CPU work per frame
(hashing), so many sessions on one loop really compete and latency really grows with load. It holds no GPU
memory; it accounts ``per_stream_mb`` per stream so simulated GPUs report realistic VRAM use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter

from shared.aio import cancel_and_wait
from shared.models import SessionDispatch
from worker.engine import EngineStats, RealTimeReport, SessionEnded, VramProfile, p95

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

#: A talking-head model of ~4 GB with ~1.5 GB of per-stream state.
#: Per GPU: T4 → 7, A10G/L4 → 12, A100-40 → 23, A100-80/H100 → 50 streams.
DEFAULT_PROFILE = VramProfile(model_mb=4096, per_stream_mb=1536, headroom_mb=1024, cpu_cores_per_stream=0.5,
                              ram_mb_per_stream=1024)


@dataclass
class _Session:
    spec: SessionDispatch
    task: asyncio.Task[None]
    frames: int = 0
    misses: int = 0


class SyntheticEngine:
    name = "synthetic"
    client_audio_path: str | None = None

    def __init__(self, profile: VramProfile = DEFAULT_PROFILE, fps: float = 25.0, work_per_frame: int = 200,
                 session_duration_s: float | None = None, fail_start: bool = False) -> None:
        self.profile = profile
        self.fps = fps
        self.frame_period_s = 1.0 / fps
        #: Hash rounds per frame: the knob that makes calibration find a CPU-bound limit.
        self.work_per_frame = work_per_frame
        #: Sessions end by themselves after this long (None: until stopped), to exercise on_end.
        self.session_duration_s = session_duration_s
        self.fail_start = fail_start
        self._sessions: dict[str, _Session] = {}
        self._latencies: deque[float] = deque(maxlen=500)
        self._frames = 0
        self._misses = 0
        self._errors: deque[tuple[float, bool]] = deque(maxlen=200)
        self.started = False

    @classmethod
    def from_settings(cls, settings: WorkerSettings, *, for_calibration: bool = False) -> SyntheticEngine:
        return cls(settings.vram_profile(DEFAULT_PROFILE))

    async def start(self) -> None:
        await asyncio.sleep(0)  # a real engine loads models here
        self.started = True

    async def start_session(self, spec: SessionDispatch, on_end: SessionEnded) -> None:
        if self.fail_start:
            self._errors.append((time.monotonic(), True))
            raise RuntimeError("synthetic engine configured to refuse sessions")
        if spec.session_id in self._sessions:
            raise ValueError(f"session {spec.session_id} already running")
        task = asyncio.create_task(self._run(spec, on_end), name=f"synthetic-{spec.session_id}")
        self._sessions[spec.session_id] = _Session(spec, task)
        self._errors.append((time.monotonic(), False))

    async def _run(self, spec: SessionDispatch, on_end: SessionEnded) -> None:
        session_id = spec.session_id
        reason = "stopped"
        started = time.monotonic()
        next_frame = started
        try:
            while self.session_duration_s is None or time.monotonic() - started < self.session_duration_s:
                next_frame += self.frame_period_s
                t0 = time.perf_counter()
                digest = spec.room.encode()
                for _ in range(self.work_per_frame):
                    digest = hashlib.sha256(digest).digest()
                await asyncio.sleep(0)  # yield like an encoder handing a frame to the transport
                now = time.monotonic()
                # Latency = render time plus how late the frame started: what a viewer would feel.
                lateness = max(0.0, now - next_frame)
                self._latencies.append((time.perf_counter() - t0) * 1000 + lateness * 1000)
                session = self._sessions.get(session_id)
                self._frames += 1
                if session:
                    session.frames += 1
                if lateness > 0:
                    self._misses += 1
                    if session:
                        session.misses += 1
                    next_frame = now  # a late stream drops frames rather than bursting to catch up
                else:
                    await asyncio.sleep(next_frame - now)
            reason = "completed"
        except asyncio.CancelledError:
            reason = "stopped"
            raise
        finally:
            if self._sessions.pop(session_id, None) is not None and reason == "completed":
                on_end(session_id, reason)

    async def stop_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        await cancel_and_wait(session.task)

    def stats(self) -> EngineStats:
        latency = p95(list(self._latencies))
        outcomes = list(self._errors)
        error_rate = sum(1 for _, failed in outcomes if failed) / len(outcomes) if outcomes else 0.0
        active = len(self._sessions)
        return EngineStats(latency_ms=round(latency, 3), error_rate=error_rate, active_sessions=active,
                           vram_used_mb=active * self.profile.per_stream_mb)

    @property
    def frames(self) -> int:
        """Frames rendered since the last ``reset_counters``."""
        return self._frames

    def miss_ratio(self) -> float:
        return self._misses / self._frames if self._frames else 0.0

    def reset_counters(self) -> None:
        self._latencies.clear()
        self._frames = 0
        self._misses = 0

    def load_probe(self) -> SyntheticLoadProbe:
        return SyntheticLoadProbe(self)

    def router(self) -> APIRouter | None:
        return None

    async def aclose(self) -> None:
        await asyncio.gather(*(self.stop_session(sid) for sid in list(self._sessions)))


class SyntheticLoadProbe:
    """Synthetic sessions render on their own; a frame is late when it starts after its slot at ``fps``."""

    warmup_s = 0.0

    def __init__(self, engine: SyntheticEngine) -> None:
        self.engine = engine

    async def drive(self, session_id: str) -> None:
        await asyncio.Event().wait()  # nothing to feed: the session's own cadence is the load

    def reset(self) -> None:
        self.engine.reset_counters()

    def report(self) -> RealTimeReport:
        e = self.engine
        return RealTimeReport(late_ratio=round(e.miss_ratio(), 4), p95_ms=e.stats().latency_ms,
                              budget_ms=e.frame_period_s * 1000, figures={"frames": e.frames})

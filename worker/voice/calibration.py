"""Calibration load for the voice engine: simulated users speaking a sentence in a loop, at real-time pace.

Each driven session gets a ``LoadTransport`` attached exactly like a WebSocket or LiveKit transport, and is fed
20 ms PCM16 16 kHz frames of a sentence synthesised once by espeak-ng, then a pause while the reply plays, paced
by the wall clock. The engine keeps real time when both hold:

- **frames**: every frame is through VAD and STT within ``calibration_frame_lag_ms`` (100 ms, a typical
  jitter buffer) of when it was complete. Short stalls (a transcript being finalised holds the GIL for
  ~40 ms) are absorbed like a jitter buffer absorbs them; an engine that cannot keep up works through a backlog
  that grows without bound, as it would with a real transport's buffered audio. At most ``late_budget`` (2 %)
  of frames may be late.
- **turns**: the p95 of end of speech → first reply audio stays within ``calibration_e2e_budget_ms``, measured
  from when the speech really ended (not from when the engine got to the frame). A turn with no reply, or
  with an error, counts as infinitely late.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from dataclasses import dataclass, field
from statistics import mean
from typing import TYPE_CHECKING, Any

from worker.engine import RealTimeReport, p95
from worker.voice.audio import FRAME_BYTES, FRAME_MS, SAMPLE_RATE, rms
from worker.voice.tts import EspeakTTS

if TYPE_CHECKING:
    from worker.voice.engine import VoiceEngine

FRAME_S = FRAME_MS / 1000
_VOICED_RMS = 300.0  # a frame louder than this is speech (espeak's pauses are digital silence)
_GOLDEN = 0.6180339887  # start offsets spread evenly over the cycle, whatever the number of sessions


@dataclass(frozen=True, slots=True)
class Utterance:
    """One user cycle cut into 20 ms frames: the sentence, then a pause."""

    frames: list[bytes]
    speech_end: int
    """Index of the last voiced frame: the speech has ended once it is complete."""

    @classmethod
    def synthesize(cls, text: str, pause_ms: int, voice: str = "en-us") -> Utterance:
        pcm = EspeakTTS(voice).synthesize_sync(text)
        pcm += b"\0" * (-len(pcm) % FRAME_BYTES + SAMPLE_RATE * 2 * pause_ms // 1000)
        frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES)]
        voiced = [i for i, f in enumerate(frames) if rms(f) > _VOICED_RMS]
        if not voiced:
            raise ValueError(f"espeak-ng produced no audible speech for {text!r}")
        return cls(frames, voiced[-1])


@dataclass
class _Window:
    frames: int = 0
    late_frames: int = 0
    max_lag_s: float = 0.0
    feed_s: float = 0.0
    turns_e2e_ms: list[float] = field(default_factory=list)
    errors: int = 0
    stt_ms: list[float] = field(default_factory=list)


class LoadTransport:
    """The probe's end of a conversation: records when reply audio and events arrive, discards the audio."""

    def __init__(self, window: _Window) -> None:
        self.window = window
        self.speech_ended: float | None = None  # the pending turn, until its first reply audio
        self.failed = False

    def end_of_speech(self, at: float) -> None:
        if self.speech_ended is not None:  # the previous turn never got its reply: infinitely late
            self.window.turns_e2e_ms.append(float("inf"))
        self.speech_ended, self.failed = at, False

    async def send_audio(self, pcm: bytes) -> None:
        if self.speech_ended is not None:
            e2e = (time.perf_counter() - self.speech_ended) * 1000
            self.window.turns_e2e_ms.append(float("inf") if self.failed else e2e)
            self.speech_ended = None

    async def send_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "error":
            self.window.errors += 1
            self.failed = True
        elif event["type"] == "transcript":
            self.window.stt_ms.append(event["stt_ms"])

    async def close(self, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None


@functools.lru_cache(maxsize=4)
def utterance(text: str, pause_ms: int, voice: str) -> Utterance:
    """Synthesised once per process: every simulated user says the same thing."""
    return Utterance.synthesize(text, pause_ms, voice)


class VoiceLoadProbe:
    """``LoadProbe`` of the voice engine; one per calibration step."""

    def __init__(self, engine: VoiceEngine) -> None:
        s = engine.settings
        self.engine = engine
        self.utterance = utterance(s.calibration_sentence, s.calibration_pause_ms, s.tts_voice)
        self.budget_ms = s.calibration_e2e_budget_ms
        self.lag_budget_s = s.calibration_frame_lag_ms / 1000
        # Every decoder is busy by the time one sentence has passed; the first judged turns are answered just
        # after it, inside the window, and then turns end at a steady rate.
        self.warmup_s = (self.utterance.speech_end + 1) * FRAME_S
        self._window = _Window()
        self._transports: list[LoadTransport] = []
        self._driven = 0

    async def drive(self, session_id: str) -> None:
        session = self.engine.sessions[session_id]
        transport = LoadTransport(self._window)
        self._transports.append(transport)
        conversation = session.attach(transport)
        frames, n = self.utterance.frames, len(self.utterance.frames)
        # Users are at different points of their cycle from the start, so turns end at a steady rate at once;
        # an utterance already under way when the session starts is heard but not judged as a turn.
        offset = int((self._driven * _GOLDEN) % 1.0 * n)
        self._driven += 1
        start = time.perf_counter()
        try:
            for k in itertools.count():
                i = (offset + k) % n
                due = start + (k + 1) * FRAME_S  # a frame can be processed once all of it has arrived
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                began = time.perf_counter()
                await conversation.feed(frames[i])
                self._frame_done(due, began)
                if i == self.utterance.speech_end and k >= i:
                    transport.end_of_speech(due)
        finally:
            await session.detach(conversation)

    def _frame_done(self, due: float, began: float) -> None:
        w, done = self._window, time.perf_counter()
        w.frames += 1
        w.feed_s += done - began
        lag = done - due
        w.max_lag_s = max(w.max_lag_s, lag)
        if lag > self.lag_budget_s:
            w.late_frames += 1

    def reset(self) -> None:
        self._window = _Window()
        for transport in self._transports:
            transport.window = self._window

    def report(self) -> RealTimeReport:
        w, now = self._window, time.perf_counter()
        turns = list(w.turns_e2e_ms)
        # Turns still waiting for their reply past the budget are already late; count them as they stand.
        turns += [(now - t.speech_ended) * 1000 for t in self._transports
                  if t.speech_ended is not None and (now - t.speech_ended) * 1000 > self.budget_ms]
        answered = [t for t in turns if t != float("inf")]
        figures = {
            "frames": w.frames,
            "turns": len(turns),
            "e2e_mean_ms": round(mean(answered), 1) if answered else 0.0,
            "stt_ms": round(mean(w.stt_ms), 1) if w.stt_ms else 0.0,
            "feed_ms_per_audio_s": round(w.feed_s / (w.frames * FRAME_S) * 1000, 1) if w.frames else 0.0,
            "max_lag_ms": round(w.max_lag_s * 1000, 1),
            "errors": w.errors,
        }
        late = w.late_frames / w.frames if w.frames else 0.0
        return RealTimeReport(round(late, 4), round(p95(turns), 1), self.budget_ms, figures)

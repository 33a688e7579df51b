"""Recent latency and error figures, shared by every session of one engine."""

from __future__ import annotations

from collections import Counter, deque
from statistics import mean

STAGES = ("vad_ms", "stt_ms", "llm_first_token_ms", "llm_first_sentence_ms", "tts_first_ms", "e2e_ms")
#: The backends whose failure fails a turn (``BackendError.stage``).
BACKEND_STAGES = ("stt", "llm", "tts")


class VoiceMetrics:
    def __init__(self, window: int = 50) -> None:
        self._recent: dict[str, deque[float]] = {stage: deque(maxlen=window) for stage in STAGES}
        self.turns = 0
        self.errors = 0
        self.errors_by_stage: Counter[str] = Counter(dict.fromkeys(BACKEND_STAGES, 0))  # failed stage -> turns
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = turn failed

    def record_turn(self, timings: dict[str, float], failed_stage: str | None) -> None:
        """One turn's timings; ``failed_stage``: the backend stage that failed it, None when it succeeded."""
        self.turns += 1
        failed = failed_stage is not None
        if failed_stage is not None:
            self.errors += 1
            self.errors_by_stage[failed_stage] += 1
        self._outcomes.append(failed)
        for stage, value in timings.items():
            if stage in self._recent:
                self._recent[stage].append(value)

    @property
    def stage_latency_ms(self) -> dict[str, float]:
        """Mean of recent turns per stage; what the worker exports."""
        return {stage: round(mean(v), 1) for stage, v in self._recent.items() if v}

    @property
    def e2e_ms(self) -> float:
        values = self._recent["e2e_ms"]
        return round(mean(values), 1) if values else 0.0

    @property
    def error_rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

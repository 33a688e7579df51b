"""End-of-utterance detection with webrtcvad on 20 ms frames."""

from __future__ import annotations

import enum

import webrtcvad  # type: ignore[import-untyped]

from worker.voice.audio import FRAME_MS, SAMPLE_RATE


class VadEvent(enum.Enum):
    SPEECH_START = "speech_start"
    SPEECH_END = "speech_end"


class EndpointDetector:
    """Speech starts after ``min_speech_ms`` of voiced frames and ends after ``silence_ms`` of unvoiced ones, or
    after ``max_speech_ms`` of speech at most: noise the VAD takes for speech (white noise, a fan, music) would
    otherwise keep one utterance going, its audio buffered for STT, for as long as it lasts."""

    def __init__(
        self, aggressiveness: int = 2, silence_ms: int = 300, min_speech_ms: int = 200, max_speech_ms: int | None = None
    ) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self._silence_frames = max(1, silence_ms // FRAME_MS)
        self._start_frames = max(1, min_speech_ms // FRAME_MS)
        self._max_frames = max(1, max_speech_ms // FRAME_MS) if max_speech_ms is not None else None
        self._speech_frames = 0  # frames since speech started
        self.in_speech = False
        self._voiced_run = 0
        self._unvoiced_run = 0
        self.voiced_ms = 0  # voiced audio in the current utterance
        self.last_voiced = False

    def process(self, frame: bytes) -> VadEvent | None:
        """Feed exactly one 20 ms PCM16 frame."""
        voiced = bool(self._vad.is_speech(frame, SAMPLE_RATE))
        self.last_voiced = voiced
        if voiced:
            self._voiced_run += 1
            self._unvoiced_run = 0
        else:
            self._unvoiced_run += 1
            if not self.in_speech:
                self._voiced_run = 0
        if not self.in_speech and self._voiced_run >= self._start_frames:
            self.in_speech = True
            self.voiced_ms = self._voiced_run * FRAME_MS
            self._speech_frames = self._voiced_run
            return VadEvent.SPEECH_START
        if self.in_speech:
            self._speech_frames += 1
            if voiced:
                self.voiced_ms += FRAME_MS
            capped = self._max_frames is not None and self._speech_frames >= self._max_frames
            if self._unvoiced_run >= self._silence_frames or capped:
                self.in_speech = False
                self._voiced_run = 0
                self._unvoiced_run = 0
                return VadEvent.SPEECH_END
        return None

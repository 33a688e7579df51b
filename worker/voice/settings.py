"""Voice engine settings, read from ``FLEET_VOICE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class VoiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_VOICE_", extra="ignore")

    stt_backend: Literal["pocketsphinx", "whisper"] | None = None
    """STT backend; None picks whisper when ``whisper_model_dir`` is set, else pocketsphinx."""
    whisper_model_dir: Path | None = None
    """Local faster-whisper model folder (CTranslate2 format); never downloaded."""
    whisper_device: str = "auto"
    """faster-whisper device: auto, cpu or cuda."""
    stt_corpus_file: Path | None = None
    """Sentences (one a line) the pocketsphinx domain language model is built from; None uses a built-in corpus."""

    llm_backend: Literal["openai", "bedrock", "canned"] = "openai"
    """Where replies come from: an OpenAI-compatible server (Ollama, vLLM), AWS Bedrock ConverseStream, or
    ``canned``: a fixed local reply, no model at all (what calibration uses when no LLM is configured)."""
    llm_base_url: str = "http://127.0.0.1:11434/v1"
    """OpenAI-compatible base URL (``/chat/completions`` is appended)."""
    llm_api_key: str | None = None
    """Bearer token for the OpenAI-compatible server, if it needs one."""
    llm_model: str = "llama3.2"
    """Model name (OpenAI-compatible) or model id (Bedrock)."""
    bedrock_region: str = "us-east-1"
    """AWS region of the Bedrock runtime."""
    system_prompt: str = "You are a helpful voice assistant. Answer briefly in plain spoken sentences."
    """System prompt of every conversation."""
    llm_timeout_s: float = Field(default=20.0, gt=0)
    """Longest wait for the whole reply stream of one turn."""
    max_history_turns: int = Field(default=20, ge=1)
    """User/assistant turn pairs kept per session."""
    max_tokens: int = Field(default=256, ge=1)
    """Reply length cap passed to the LLM."""

    tts_backend: Literal["espeak", "chatterbox"] = "espeak"
    """TTS backend: espeak-ng offline (CPU) or a Chatterbox GPU model loaded from ``tts_model_dir``."""
    tts_model_dir: Path | None = None
    """Local model folder of the GPU TTS backend."""
    tts_device: str = "auto"
    """Chatterbox device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N."""
    tts_voice: str = "en-us"
    """espeak-ng voice name."""
    tts_rate_wpm: int = Field(default=175, ge=80, le=450)
    """espeak-ng speaking rate."""

    vad_aggressiveness: int = Field(default=2, ge=0, le=3)
    """webrtcvad mode (0 least, 3 most aggressive at calling audio non-speech)."""
    vad_silence_ms: int = Field(default=300, ge=60, le=3000)
    """Trailing non-speech that ends an utterance."""
    vad_min_speech_ms: int = Field(default=200, ge=20)
    """Shorter bursts of speech are ignored (clicks, the false start at stream start)."""
    barge_in_ms: int = Field(default=200, ge=20)
    """User speech this long while a reply plays stops the reply."""

    session_max_s: float = Field(default=3600.0, gt=0)
    """A session ends cleanly after this long."""
    stt_timeout_s: float = Field(default=10.0, gt=0)
    """Longest wait for a final transcript."""

    livekit_api_key: str = "devkey"
    """Key the WebSocket client's LiveKit participant token is verified with."""
    livekit_api_secret: str = "secret"  # noqa: S105 - LiveKit's dev-mode default
    """Secret the WebSocket client's LiveKit participant token is verified with."""
    livekit_transport: bool = False
    """Also join each session's LiveKit room as the agent (needs a reachable LiveKit server)."""
    livekit_connect_timeout_s: float = Field(default=10.0, gt=0)
    """Bound on joining a LiveKit room (a failing connect can otherwise take 30 s)."""

    calibration_sentence: str = "what is the weather like in paris today"
    """What each simulated user says, in a loop, during ``fleet worker calibrate`` (synthesised once by espeak-ng)."""
    calibration_pause_ms: int = Field(default=2000, ge=500)
    """Silence after each calibration utterance, while the reply plays."""
    calibration_frame_lag_ms: float = Field(default=100.0, gt=0)
    """Calibration: a 20 ms input frame is late when VAD + STT are through with it later than this after it
    arrived (a backlog a jitter buffer no longer hides, which adds straight to the reply latency)."""
    calibration_e2e_budget_ms: float = Field(default=1000.0, gt=0)
    """Calibration: p95 of end of speech → first reply audio must stay within this (it includes the VAD's
    ``vad_silence_ms``; raise it by your LLM's time to first sentence when calibrating with a real LLM)."""

    @property
    def llm_configured(self) -> bool:
        """Whether an LLM was chosen explicitly (environment or arguments) rather than left at the defaults."""
        return bool({"llm_backend", "llm_base_url", "llm_model"} & self.model_fields_set)

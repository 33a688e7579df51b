"""Voice engine settings, read from ``FLEET_VOICE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import MIN_PROD_SECRET_CHARS, Env

#: LiveKit's documented dev-mode credentials (what ``livekit-server --dev`` accepts); refused when FLEET_ENV=prod.
DEV_LIVEKIT_KEY = "devkey"
DEV_LIVEKIT_SECRET = "secret"  # noqa: S105 - LiveKit's dev-mode default, refused in prod


class VoiceSettings(BaseSettings):
    # hide_input_in_errors: a refused configuration must not print the secrets it was given wherever it is logged.
    # populate_by_name: ``env`` reads FLEET_ENV (shared with the worker's settings), yet can be passed as ``env=``.
    model_config = SettingsConfigDict(env_prefix="FLEET_VOICE_", extra="ignore", hide_input_in_errors=True,
                                      allow_inf_nan=False, populate_by_name=True, use_attribute_docstrings=True)

    env: Env = Field(default=Env.DEV, validation_alias="FLEET_ENV")
    """The fleet's ``FLEET_ENV`` (not ``FLEET_VOICE_ENV``): ``prod`` refuses the dev LiveKit key and a dev or short
    secret."""

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
    llm_api_key: SecretStr | None = None
    """Bearer token for the OpenAI-compatible server, if it needs one."""
    llm_model: str = "llama3.2"
    """Model name (OpenAI-compatible) or model id (Bedrock)."""
    bedrock_region: str = "us-east-1"
    """AWS region of the Bedrock runtime."""
    system_prompt: str = "You are a helpful voice assistant. Answer briefly in plain spoken sentences."
    """System prompt of every conversation."""
    llm_timeout_s: float = Field(default=20.0, gt=0)
    """Longest wait for the LLM's first token, and then for each next one. Only the LLM stream is timed: speaking
    and playing a long reply (TTS, real-time pacing) does not count against it."""
    bedrock_connect_timeout_s: float = Field(default=5.0, gt=0)
    """Bedrock: bound on opening the connection (its socket read timeout is ``llm_timeout_s``)."""
    bedrock_max_attempts: int = Field(default=2, ge=1)
    """Bedrock: attempts per request, the first one included (botocore's default would retry for a long time
    while the user waits)."""
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
    max_utterance_s: float = Field(default=30.0, gt=0)
    """An utterance is cut here: the end of speech is forced, so noise that keeps the VAD in speech cannot make
    one utterance's buffered audio grow without bound."""

    session_max_s: float = Field(default=3600.0, gt=0)
    """A session ends cleanly after this long."""
    unattended_s: float = Field(default=30.0, gt=0)
    """A session with no client (no audio WebSocket, no user in its LiveKit room) for this long ends itself
    (reason ``unattended``), so a client that never connects or went away does not hold a slot until
    ``session_max_s``."""
    close_timeout_s: float = Field(default=2.0, gt=0)
    """When a session or connection ends: longest wait for the client to take each goodbye (``session_end``, the
    close frame). A client that keeps its connection open but stopped reading is then cut off, so ending a session
    (and freeing its slot) never hangs on it."""
    stt_timeout_s: float = Field(default=10.0, gt=0)
    """Longest wait for a final transcript."""

    client_websocket: bool = True
    """Serve each session's audio WebSocket to clients, and register its URL so that the hub hands it out. Off where
    clients cannot reach the worker (the deployed stack's private subnets): clients then talk to the agent through
    the session's LiveKit room only, which needs ``livekit_transport``, and the worker needs no LiveKit secret."""
    livekit_api_key: str = DEV_LIVEKIT_KEY
    """Key the WebSocket client's LiveKit participant token is verified with (the dev default is refused in prod
    while ``client_websocket`` is on)."""
    livekit_api_secret: SecretStr = SecretStr(DEV_LIVEKIT_SECRET)
    """Secret the WebSocket client's LiveKit participant token is verified with (while ``client_websocket`` is on,
    prod refuses the dev default and secrets shorter than 32 characters: anyone could sign a token with them)."""
    livekit_transport: bool = False
    """Also join each session's LiveKit room as the agent (needs a reachable LiveKit server). It joins with the token
    the hub sent along with the session, not with this worker's LiveKit key."""
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

    @model_validator(mode="after")
    def _a_client_can_reach_each_session(self) -> Self:
        if not (self.client_websocket or self.livekit_transport):
            raise ValueError("FLEET_VOICE_CLIENT_WEBSOCKET=false needs FLEET_VOICE_LIVEKIT_TRANSPORT=true: without "
                             "either, no client could ever talk to a session")
        return self

    @model_validator(mode="after")
    def _refuse_dev_credentials_in_prod(self) -> Self:
        if self.env is not Env.PROD or not self.client_websocket:  # the credentials verify the WebSocket's clients
            return self
        problems = []
        if self.livekit_api_key == DEV_LIVEKIT_KEY:
            problems.append("FLEET_VOICE_LIVEKIT_API_KEY must not be the dev default")
        secret = self.livekit_api_secret.get_secret_value()
        if secret == DEV_LIVEKIT_SECRET:
            problems.append("FLEET_VOICE_LIVEKIT_API_SECRET must not be the dev default")
        elif len(secret) < MIN_PROD_SECRET_CHARS:  # an empty one would verify tokens anyone can sign
            problems.append(f"FLEET_VOICE_LIVEKIT_API_SECRET must have at least {MIN_PROD_SECRET_CHARS} characters")
        if problems:
            raise ValueError("refusing to start in prod: " + "; ".join(problems))
        return self

    @property
    def llm_configured(self) -> bool:
        """Whether an LLM was chosen explicitly (environment or arguments) rather than left at the defaults."""
        return bool({"llm_backend", "llm_base_url", "llm_model"} & self.model_fields_set)

"""Text-to-speech backends: espeak-ng offline (CPU, ctypes) and a Chatterbox-style GPU model from a local folder."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.voice.audio import SAMPLE_RATE, float_to_pcm16, resample
from worker.voice.errors import BackendUnavailable, ModelMissing, import_backend
from worker.voice.settings import VoiceSettings

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # espeakINITIALIZE_DONT_EXIT: else a data folder it cannot read ends the process
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
#: A Chatterbox model folder's files, as chatterbox's ``ChatterboxTTS.from_pretrained`` downloads them
#: (resemble-ai/chatterbox, src/chatterbox/tts.py): ``from_local`` reads the first four, and conds.pt is the built-in
#: voice it treats as optional but ``generate(text)`` needs without a voice prompt.
CHATTERBOX_CHECKPOINTS = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")


class TTS(Protocol):
    name: str
    model_mb: int
    per_stream_mb: int

    def load(self) -> None: ...

    async def synthesize(self, text: str) -> bytes:
        """PCM16 mono at 16 kHz for ``text``."""
        ...


#: The other backend, for a host whose espeak-ng install is broken (calibration speaks with espeak-ng regardless).
_INSTEAD_OF_ESPEAK = "FLEET_VOICE_TTS_BACKEND=chatterbox with FLEET_VOICE_TTS_MODEL_DIR (calibration needs espeak-ng)"
_REINSTALL_ESPEAK = f"pip install --force-reinstall espeakng-loader, or set {_INSTEAD_OF_ESPEAK}"


def _load_espeak() -> tuple[ctypes.CDLL, str]:
    """libespeak-ng and its data folder from the espeakng-loader wheel; a broken install is a BackendUnavailable."""
    loader = import_backend("espeakng_loader", needed_by="the espeak TTS backend", package="espeakng-loader",
                            setting="FLEET_VOICE_TTS_BACKEND", instead=_INSTEAD_OF_ESPEAK)
    try:
        data_path = str(loader.get_data_path())
    except RuntimeError as exc:  # what espeakng_loader raises when its espeak-ng-data folder is gone
        raise BackendUnavailable(f"espeak-ng's data folder is missing ({exc}): {_REINSTALL_ESPEAK}",
                                 "FLEET_VOICE_TTS_BACKEND") from exc
    library = loader.get_library_path()
    try:
        return ctypes.CDLL(library), data_path
    except OSError as exc:
        raise BackendUnavailable(f"espeak-ng's library {library} does not load ({exc}): {_REINSTALL_ESPEAK}",
                                 "FLEET_VOICE_TTS_BACKEND") from exc


class _EspeakLib:
    """The process-global libespeak-ng: one initialisation, one callback, one synthesis at a time."""

    def __init__(self) -> None:
        lib, data_path = _load_espeak()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise BackendUnavailable(f"espeak-ng cannot read its data folder {data_path} (code {rate}): "
                                     f"{_REINSTALL_ESPEAK}", "FLEET_VOICE_TTS_BACKEND")
        self.lib = lib
        self.rate = int(rate)
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._callback = _SYNTH_CALLBACK(self._on_audio)  # kept referenced: espeak holds a raw pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: tuple[str, int] | None = None

    def _on_audio(self, wav: Any, n: int, _events: Any) -> int:
        if n > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, n * 2))
        return 0

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> bytes:
        data = text.encode() + b"\0"
        with self.lock:
            if self._voice != (voice, rate_wpm):
                if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise BackendUnavailable(f"espeak-ng has no voice {voice!r}: set FLEET_VOICE_TTS_VOICE to one "
                                             f"it has, such as en-us, en-gb, de or fr", "FLEET_VOICE_TTS_VOICE")
                self.lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
                self._voice = (voice, rate_wpm)
            self._chunks = []
            self.lib.espeak_Synth(data, len(data), 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
            pcm = b"".join(self._chunks)
        return resample(pcm, self.rate, SAMPLE_RATE)


_espeak: _EspeakLib | None = None
_espeak_init = threading.Lock()


def _espeak_lib() -> _EspeakLib:
    global _espeak
    with _espeak_init:
        if _espeak is None:
            _espeak = _EspeakLib()
        return _espeak


class EspeakTTS:
    """espeak-ng through ctypes from the ``espeakng-loader`` wheel (no system package); CPU, ~1 ms per second."""

    name = "espeak"
    model_mb = 0
    per_stream_mb = 0

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175) -> None:
        self.voice = voice
        self.rate_wpm = rate_wpm

    def load(self) -> None:
        _espeak_lib().synthesize("", self.voice, self.rate_wpm)  # fails here on a bad voice, not mid-session

    def synthesize_sync(self, text: str) -> bytes:
        return _espeak_lib().synthesize(text, self.voice, self.rate_wpm)

    async def synthesize(self, text: str) -> bytes:
        return await asyncio.to_thread(self.synthesize_sync, text)


class ChatterboxTTS:
    """GPU TTS (Chatterbox) loaded once from a local model folder; imported lazily so CPU hosts need none of it."""

    name = "chatterbox"
    model_mb = 6500
    per_stream_mb = 600

    def __init__(self, model_dir: Path | None, device: str = "auto") -> None:
        self.model_dir = model_dir
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()  # one GPU model; generation calls are serialised
        self._load_lock = threading.Lock()

    def load(self) -> None:
        with self._load_lock:  # concurrent first syntheses must not load the model twice
            self._load()

    def _load(self) -> None:
        if self._model is not None:
            return
        if self.model_dir is None or not self.model_dir.is_dir():
            raise ModelMissing(self.model_dir, "FLEET_VOICE_TTS_MODEL_DIR")
        for name in CHATTERBOX_CHECKPOINTS:  # else chatterbox fails on the first one missing, with a traceback
            if not (self.model_dir / name).is_file():
                raise ModelMissing(self.model_dir / name, "FLEET_VOICE_TTS_MODEL_DIR")
        module = import_backend("chatterbox.tts", needed_by="FLEET_VOICE_TTS_BACKEND=chatterbox",
                                package="chatterbox-tts", setting="FLEET_VOICE_TTS_BACKEND",
                                instead="FLEET_VOICE_TTS_BACKEND=espeak")
        self._model = module.ChatterboxTTS.from_local(str(self.model_dir), self._resolved_device())

    def _resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # chatterbox's own dependency: present whenever the model loads

        return "cuda" if torch.cuda.is_available() else "cpu"

    def synthesize_sync(self, text: str) -> bytes:
        self.load()
        with self._lock:
            wav = self._model.generate(text)
        samples = np.asarray(wav.squeeze().cpu().numpy(), dtype=np.float32)
        return resample(float_to_pcm16(samples), int(self._model.sr), SAMPLE_RATE)

    async def synthesize(self, text: str) -> bytes:
        return await asyncio.to_thread(self.synthesize_sync, text)


def build_tts(settings: VoiceSettings) -> TTS:
    if settings.tts_backend == "chatterbox":
        return ChatterboxTTS(settings.tts_model_dir, settings.tts_device)
    return EspeakTTS(settings.tts_voice, settings.tts_rate_wpm)

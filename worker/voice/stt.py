"""Speech-to-text backends: pocketsphinx (offline, streaming, CPU) and faster-whisper (local model folder)."""

from __future__ import annotations

import asyncio
import io
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.voice.audio import SAMPLE_RATE
from worker.voice.errors import ModelMissing, import_backend
from worker.voice.settings import VoiceSettings

#: Sentences the default pocketsphinx domain language model is built from: a small LM recognises far better
#: than the 6 s-to-load general one, and loads in ~50 ms.
DEFAULT_CORPUS = """\
hello
hello there
hi how are you
what is the weather like today
what is the weather like in paris today
what is the weather in london
will it rain tomorrow
what time is it
what day is it today
tell me a joke
tell me a story
book a table for two tonight
book a flight to paris
i would like to order a pizza
can you help me please
thank you very much
thanks goodbye
goodbye
yes please
no thank you
stop
please repeat that
what can you do
play some music
set a timer for five minutes
set an alarm for seven in the morning
turn on the lights
turn off the lights
how far is the airport
where is the nearest station
call my mother
send a message to john
what is the capital of france
who are you
what is your name
how do i get to the station
is the restaurant open now
remind me to call the doctor
"""


class STTStream(Protocol):
    def feed(self, pcm: bytes) -> None: ...

    def finish(self) -> str:
        """End the utterance and return its transcript (blocking; call from a thread)."""
        ...

    def abandon(self) -> None:
        """Nobody waits for the transcript any more (its turn timed out or was cancelled): a ``finish`` that has
        not started its work yet may skip it."""
        ...


class STT(Protocol):
    name: str
    model_mb: int
    per_stream_mb: int

    def load(self, priming_pcm: bytes | None = None) -> None: ...

    def new_stream(self) -> STTStream: ...


def _words(corpus: str) -> set[str]:
    return {w for line in corpus.lower().splitlines() for w in re.findall(r"[a-z']+", line)}


class SphinxStream:
    def __init__(self, decoder: Any, release: Any) -> None:
        self._decoder = decoder
        self._release = release
        self._decoder.start_utt()

    def feed(self, pcm: bytes) -> None:
        # On the event loop: ~27 ms of CPU per second of audio. A thread would not help, since process_raw holds
        # the GIL throughout (measured); whisper, the production backend, does its work in finish.
        self._decoder.process_raw(pcm, False, False)

    def abandon(self) -> None:
        return None  # finish is quick, and it returns the decoder to the pool

    def finish(self) -> str:
        try:
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
            return str(hyp.hypstr) if hyp is not None else ""
        finally:
            self._release(self._decoder)


class PocketSphinxSTT:
    """pocketsphinx with a small domain LM and a dictionary cut to its words; decoders are pooled across sessions."""

    name = "pocketsphinx"
    model_mb = 0
    per_stream_mb = 0

    def __init__(self, corpus: str = DEFAULT_CORPUS) -> None:
        self.corpus = corpus
        self._dir = tempfile.TemporaryDirectory(prefix="fleet-voice-stt-")
        self._config: dict[str, Any] | None = None
        self._pool: list[Any] = []
        self._lock = threading.Lock()

    def load(self, priming_pcm: bytes | None = None) -> None:
        if self._config is not None:
            return
        import pocketsphinx  # type: ignore[import-untyped]
        from pocketsphinx.lm import ArpaBoLM  # type: ignore[import-untyped]

        model = Path(pocketsphinx.get_model_path()) / "en-us"
        work = Path(self._dir.name)
        lm = ArpaBoLM(text=self.corpus.lower(), add_start=True)
        lm.compute()
        buf = io.StringIO()
        lm.write(buf)
        (work / "domain.lm").write_text(buf.getvalue())
        vocab = _words(self.corpus)
        lines = [
            line
            for line in (model / "cmudict-en-us.dict").read_text().splitlines()
            if line.split(" ", 1)[0].split("(", 1)[0] in vocab
        ]
        (work / "domain.dict").write_text("\n".join(lines) + "\n")
        self._config = {
            "hmm": str(model / "en-us"),
            "lm": str(work / "domain.lm"),
            "dict": str(work / "domain.dict"),
            "samprate": SAMPLE_RATE,
            "loglevel": "FATAL",
        }
        if priming_pcm:
            # Cepstral mean starts from a generic guess; priming it on known audio makes the first utterance
            # recognise as well as later ones.
            decoder = pocketsphinx.Decoder(**self._config)
            decoder.start_utt()
            decoder.process_raw(priming_pcm, False, True)
            decoder.end_utt()
            self._config["cmninit"] = decoder.get_cmn(False)
            self._pool.append(decoder)

    def _acquire(self) -> Any:
        import pocketsphinx

        with self._lock:
            if self._pool:
                return self._pool.pop()
        assert self._config is not None, "load() first"
        return pocketsphinx.Decoder(**self._config)

    def _release(self, decoder: Any) -> None:
        with self._lock:
            self._pool.append(decoder)

    def new_stream(self) -> STTStream:
        return SphinxStream(self._acquire(), self._release)


#: The files faster-whisper needs in a model folder (a tuple of names: any one will do). CTranslate2 cannot load
#: without model.bin or a vocabulary (vocabulary.txt in older conversions); without config.json it loads, but every
#: transcription fails (it reads ``suppress_ids_begin`` from it); without tokenizer.json faster-whisper downloads a
#: whisper-tiny tokenizer from the Hugging Face Hub, which fails offline and does not fit large-v3.
WHISPER_MODEL_FILES = (("model.bin",), ("config.json",), ("vocabulary.json", "vocabulary.txt"), ("tokenizer.json",))


class WhisperStream:
    def __init__(self, model: Any, lock: threading.Lock) -> None:
        self._model = model
        self._lock = lock
        self._chunks: list[bytes] = []
        self._abandoned = False

    def feed(self, pcm: bytes) -> None:
        self._chunks.append(pcm)

    def abandon(self) -> None:
        self._abandoned = True

    def finish(self) -> str:
        pcm = b"".join(self._chunks)
        if not pcm:
            return ""  # faster-whisper fails on an empty array; nothing was said
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        with self._lock:
            if self._abandoned:
                return ""  # its turn is gone: do not keep the model from the sessions still waiting on it
            segments, _info = self._model.transcribe(audio, language="en", beam_size=1, vad_filter=False)
            return " ".join(s.text.strip() for s in segments).strip()


class WhisperSTT:
    """faster-whisper from a local CTranslate2 model folder (never a hub download); imported lazily."""

    name = "whisper"
    model_mb = 1000
    per_stream_mb = 300

    def __init__(self, model_dir: Path | None, device: str = "auto") -> None:
        self.model_dir = model_dir
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self, priming_pcm: bytes | None = None) -> None:
        if self._model is not None:
            return
        if self.model_dir is None or not self.model_dir.is_dir():
            raise ModelMissing(self.model_dir, "FLEET_VOICE_WHISPER_MODEL_DIR")
        module = import_backend("faster_whisper", needed_by="the whisper STT backend", package="faster-whisper",
                                setting="FLEET_VOICE_STT_BACKEND", instead="FLEET_VOICE_STT_BACKEND=pocketsphinx")
        for names in WHISPER_MODEL_FILES:  # else faster-whisper fails on the first one missing, with a traceback
            if not any((self.model_dir / name).is_file() for name in names):
                raise ModelMissing(" or ".join(str(self.model_dir / name) for name in names),
                                   "FLEET_VOICE_WHISPER_MODEL_DIR")
        compute = "int8" if self.device == "cpu" else "default"
        self._model = module.WhisperModel(str(self.model_dir), device=self.device, compute_type=compute)

    def new_stream(self) -> STTStream:
        assert self._model is not None, "load() first"
        return WhisperStream(self._model, self._lock)


def build_stt(settings: VoiceSettings) -> STT:
    backend = settings.stt_backend or ("whisper" if settings.whisper_model_dir else "pocketsphinx")
    if backend == "whisper":
        return WhisperSTT(settings.whisper_model_dir, settings.whisper_device)
    if settings.stt_corpus_file is not None:
        if not settings.stt_corpus_file.is_file():
            raise ModelMissing(settings.stt_corpus_file, "FLEET_VOICE_STT_CORPUS_FILE")
        return PocketSphinxSTT(settings.stt_corpus_file.read_text())
    return PocketSphinxSTT()


async def transcribe(stream: STTStream, timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.to_thread(stream.finish)
    except BaseException:  # a timeout or a cancelled turn: the thread runs on, but may skip the model
        stream.abandon()
        raise

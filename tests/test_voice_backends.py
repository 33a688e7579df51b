"""Voice engine backends without the WebSocket: Bedrock (botocore Stubber), missing models, LiveKit transport."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from aiohttp import web
from botocore.stub import Stubber

from tests.fakes import serving_llm
from worker.settings import WorkerSettings
from worker.voice.engine import VoiceEngine
from worker.voice.errors import BackendError, BackendUnavailable, ModelMissing, VoiceError, import_backend
from worker.voice.llm import BedrockLLM
from worker.voice.pipeline import sentences
from worker.voice.settings import VoiceSettings
from worker.voice.stt import WhisperSTT
from worker.voice.tts import ChatterboxTTS

SYSTEM = "Be brief."
HISTORY = [{"role": "user", "content": "hello"}]
EXPECTED = {
    "modelId": "anthropic.claude-3-haiku",
    "system": [{"text": SYSTEM}],
    "messages": [{"role": "user", "content": [{"text": "hello"}]}],
    "inferenceConfig": {"maxTokens": 64},
}


class EventStreamStubber(Stubber):  # type: ignore[misc]
    """Stubber validates requests as usual; a ConverseStream answer is an event stream, which it cannot check."""

    def _validate_response(self, shape: Any, response: Any) -> None:
        return None


def bedrock() -> tuple[BedrockLLM, Stubber]:
    client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return BedrockLLM("anthropic.claude-3-haiku", max_tokens=64, client=client), EventStreamStubber(client)


async def test_bedrock_converse_stream_yields_text() -> None:
    llm, stub = bedrock()
    events = [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "Hello there. "}, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"text": "How can I help?"}, "contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
    ]
    stub.add_response("converse_stream", {"stream": events}, EXPECTED)
    with stub:
        out = [s async for s in sentences(llm.stream(SYSTEM, HISTORY))]
    assert out == ["Hello there.", "How can I help?"]
    stub.assert_no_pending_responses()


async def test_bedrock_error_is_a_backend_error() -> None:
    llm, stub = bedrock()
    stub.add_client_error("converse_stream", "ThrottlingException", "slow down", expected_params=EXPECTED)
    with stub, pytest.raises(BackendError) as err:
        async for _ in llm.stream(SYSTEM, HISTORY):
            pass
    assert err.value.stage == "llm" and "ThrottlingException" in str(err.value)


async def test_sentences_split_streamed_text() -> None:
    async def chunks() -> AsyncIterator[str]:
        for c in ["Hi", " there! How", " are you? Fine", "\nthanks"]:
            yield c

    assert [s async for s in sentences(chunks())] == ["Hi there!", "How are you?", "Fine", "thanks"]


async def test_missing_models_fail_at_start_naming_path_and_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    engine = VoiceEngine(VoiceSettings(whisper_model_dir=missing))
    with pytest.raises(ModelMissing) as err:
        await engine.start()
    assert str(missing) in str(err.value) and "FLEET_VOICE_WHISPER_MODEL_DIR" in str(err.value)
    with pytest.raises(ModelMissing, match="FLEET_VOICE_TTS_MODEL_DIR"):
        await VoiceEngine(VoiceSettings(tts_backend="chatterbox", tts_model_dir=missing)).start()
    with pytest.raises(ModelMissing, match="FLEET_VOICE_STT_CORPUS_FILE"):
        VoiceEngine(VoiceSettings(stt_corpus_file=missing))


def test_profile_aggregates_backend_vram(tmp_path: Path) -> None:
    assert VoiceEngine(VoiceSettings()).profile.model_mb == 0
    gpu = VoiceEngine(VoiceSettings(tts_backend="chatterbox", whisper_model_dir=tmp_path))
    assert gpu.profile.model_mb == WhisperSTT.model_mb + ChatterboxTTS.model_mb
    assert gpu.profile.per_stream_mb == WhisperSTT.per_stream_mb + ChatterboxTTS.per_stream_mb


def test_the_workers_vram_overrides_apply_to_the_voice_engine() -> None:
    """Regression: FLEET_MODEL_MB, FLEET_PER_STREAM_MB and FLEET_HEADROOM_MB override the engine's figures (as the
    synthetic engine's do), yet the voice engine ignored them, so its capacity could not be corrected."""
    voice = VoiceEngine.from_settings(WorkerSettings(engine="voice", model_mb=20000, per_stream_mb=4000,
                                                     headroom_mb=2000))
    assert (voice.profile.model_mb, voice.profile.per_stream_mb, voice.profile.headroom_mb) == (20000, 4000, 2000)
    own = VoiceEngine(VoiceSettings()).profile
    assert VoiceEngine.from_settings(WorkerSettings(engine="voice", per_stream_mb=300)).profile == replace(
        own, per_stream_mb=300)
    assert VoiceEngine.from_settings(WorkerSettings(engine="voice")).profile == own


class FakeSegment:
    def __init__(self, text: str) -> None:
        self.text = text


#: A faster-whisper model folder as the Systran conversions ship it (what ``download_model`` fetches, less the optional
#: preprocessor_config.json); CTranslate2 reads vocabulary.json or, from older conversions, vocabulary.txt.
WHISPER_FOLDER = ["model.bin", "config.json", "tokenizer.json", "vocabulary.json"]


class FakeWhisperModel:
    """``faster_whisper.WhisperModel`` at its boundary: records loads and the audio each call gets. It reads the
    folder as the real one does: CTranslate2 fails without model.bin or a vocabulary, faster-whisper without
    tokenizer.json fetches one from the Hugging Face Hub (which fails offline), and without config.json it loads,
    then every transcription fails (CTranslate2 reads ``suppress_ids_begin`` from it)."""

    loads: list[tuple[str, dict[str, Any]]] = []
    calls: list[tuple[Any, dict[str, Any]]] = []

    def __init__(self, path: str, **kwargs: Any) -> None:
        folder = Path(path)
        if not (folder / "model.bin").is_file():
            raise RuntimeError(f"Unable to open file 'model.bin' in model '{path}'")
        if not any((folder / name).is_file() for name in ["vocabulary.json", "vocabulary.txt"]):
            raise RuntimeError("Cannot load the vocabulary from the model directory")
        if not (folder / "tokenizer.json").is_file():
            raise OSError("cannot reach https://huggingface.co for openai/whisper-tiny/tokenizer.json")
        self.configured = (folder / "config.json").is_file()
        FakeWhisperModel.loads.append((path, kwargs))

    def transcribe(self, audio: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.configured:
            raise RuntimeError("[json.exception.type_error.305] cannot use operator[] with a string argument with null")
        FakeWhisperModel.calls.append((audio, kwargs))
        # Lazy like the real generator: decoding happens while the caller iterates.
        return (FakeSegment(t) for t in [" What is the weather", " like today? "]), object()


def install_fake_whisper(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    FakeWhisperModel.loads, FakeWhisperModel.calls = [], []
    monkeypatch.setitem(sys.modules, "faster_whisper", types.SimpleNamespace(WhisperModel=FakeWhisperModel))


@pytest.fixture
def fake_whisper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    install_fake_whisper(monkeypatch)
    write_checkpoints(tmp_path, WHISPER_FOLDER)
    return tmp_path


@pytest.mark.parametrize(("absent", "named"), [
    ("model.bin", "{models}/model.bin"),
    ("config.json", "{models}/config.json"),
    ("vocabulary.json", "{models}/vocabulary.json or {models}/vocabulary.txt"),
    ("tokenizer.json", "{models}/tokenizer.json"),
])
async def test_a_whisper_folder_without_a_file_it_needs_fails_at_start_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: Path, absent: str,
                                                                                 named: str) -> None:
    """Only model.bin used to be checked: a folder without its vocabulary or tokenizer failed inside faster-whisper
    with a traceback (or a Hub download, never wanted here), and one without config.json started, then failed
    every turn."""
    install_fake_whisper(monkeypatch)
    write_checkpoints(tmp_path, [name for name in WHISPER_FOLDER if name != absent])
    engine = VoiceEngine(VoiceSettings(whisper_model_dir=tmp_path, llm_backend="canned"))
    with pytest.raises(ModelMissing) as err:
        await engine.start()
    assert str(err.value) == (f"model path {named.format(models=tmp_path)} does not exist "
                              f"(set by FLEET_VOICE_WHISPER_MODEL_DIR)")
    assert err.value.setting == "FLEET_VOICE_WHISPER_MODEL_DIR" and FakeWhisperModel.loads == []


@pytest.mark.parametrize("vocabulary", ["vocabulary.json", "vocabulary.txt"])
def test_a_whisper_folder_faster_whisper_loads_is_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           vocabulary: str) -> None:
    """The check must not refuse what faster-whisper takes: either vocabulary file, no preprocessor_config.json."""
    install_fake_whisper(monkeypatch)
    write_checkpoints(tmp_path, ["model.bin", "config.json", "tokenizer.json", vocabulary])
    WhisperSTT(tmp_path, "cpu").load()
    assert FakeWhisperModel.loads == [(str(tmp_path), {"device": "cpu", "compute_type": "int8"})]


async def test_whisper_adapter_loads_once_and_transcribes_float_audio(fake_whisper: Path) -> None:
    """The real WhisperSTT path: one model per process shared by every stream, PCM16 → float32 in [-1, 1)."""
    import numpy as np

    from worker.voice.stt import transcribe

    engine = VoiceEngine(VoiceSettings(whisper_model_dir=fake_whisper, whisper_device="cpu", llm_backend="canned"))
    await engine.start()
    await engine.start()  # idempotent: no second load
    assert engine.backends is not None and engine.backends.stt.name == "whisper"
    assert FakeWhisperModel.loads == [(str(fake_whisper), {"device": "cpu", "compute_type": "int8"})]
    pcm = np.array([0, 16384, -32768, 32767] * 800, dtype=np.int16).tobytes()
    streams = [engine.backends.stt.new_stream() for _ in range(2)]  # two sessions, one model
    for stream in streams:
        stream.feed(pcm[:3200])
        stream.feed(pcm[3200:])
    texts = await asyncio.gather(*(transcribe(s, 5) for s in streams))
    assert texts == ["What is the weather like today?"] * 2
    assert len(FakeWhisperModel.loads) == 1 and len(FakeWhisperModel.calls) == 2
    audio, kwargs = FakeWhisperModel.calls[0]
    assert audio.dtype == np.float32 and audio.shape == (3200,)
    assert list(audio[:4]) == [0.0, 0.5, -1.0, 32767 / 32768]
    assert kwargs == {"language": "en", "beam_size": 1, "vad_filter": False}
    await engine.aclose()


async def test_whisper_with_no_audio_is_an_empty_transcript(fake_whisper: Path) -> None:
    stt = WhisperSTT(fake_whisper, "auto")
    stt.load()
    assert FakeWhisperModel.loads[0][1] == {"device": "auto", "compute_type": "default"}
    assert stt.new_stream().finish() == "" and FakeWhisperModel.calls == []


def whisper_held_at_its_first_call(fake_whisper: Path) -> tuple[WhisperSTT, threading.Event]:
    """A loaded whisper STT whose model keeps its first transcription waiting until the returned event is set."""
    stt = WhisperSTT(fake_whisper, "cpu")
    stt.load()
    release = threading.Event()
    model = stt._model
    original = model.transcribe

    def first_call_waits(audio: Any, **kwargs: Any) -> Any:
        if not FakeWhisperModel.calls:
            release.wait(5)
        return original(audio, **kwargs)

    model.transcribe = first_call_waits
    return stt, release


async def test_a_transcription_nobody_waits_for_does_not_hold_the_model(fake_whisper: Path) -> None:
    """One session's transcription is slow; another's times out waiting behind it. Once the model is free it goes
    to the third session, not to the one whose turn is gone."""
    import time

    from worker.voice.stt import transcribe

    stt, release = whisper_held_at_its_first_call(fake_whisper)
    slow = stt.new_stream()
    slow.feed(b"\x01\x00" * 1600)
    first = asyncio.create_task(transcribe(slow, 5))
    await asyncio.sleep(0.05)
    gone, waiting = stt.new_stream(), stt.new_stream()
    for stream in (gone, waiting):
        stream.feed(b"\x02\x00" * 1600)
    with pytest.raises(TimeoutError):
        await transcribe(gone, 0.1)
    await asyncio.sleep(0.1)  # its thread now waits for the model lock
    third = asyncio.create_task(transcribe(waiting, 5))
    await asyncio.sleep(0.05)
    release.set()
    assert await first == await third == "What is the weather like today?"
    time.sleep(0.1)
    assert len(FakeWhisperModel.calls) == 2  # the abandoned stream never ran the model


class FakeTensor:
    def __init__(self, array: Any) -> None:
        self.array = array

    def squeeze(self) -> FakeTensor:
        return FakeTensor(self.array.squeeze())

    def cpu(self) -> FakeTensor:
        return self

    def numpy(self) -> Any:
        return self.array


#: The checkpoints of a Chatterbox model folder: what ``ChatterboxTTS.from_local`` reads (resemble-ai/chatterbox,
#: src/chatterbox/tts.py), and conds.pt, the built-in voice ``generate(text)`` needs without a voice prompt.
CHATTERBOX_CHECKPOINTS = ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"]


class FakeChatterbox:
    """``chatterbox.tts.ChatterboxTTS`` at its boundary: reads its checkpoints like the real ``from_local`` (which
    fails on a missing one with FileNotFoundError), then a (1, n) float tensor at 24 kHz per generate()."""

    loads: list[tuple[str, str]] = []
    sr = 24_000

    @classmethod
    def from_local(cls, ckpt_dir: str, device: str) -> FakeChatterbox:
        for name in ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"]:
            (Path(ckpt_dir) / name).read_bytes()
        cls.loads.append((ckpt_dir, device))
        return cls()

    def generate(self, text: str) -> FakeTensor:
        import numpy as np

        t = np.arange(int(self.sr * 0.05 * len(text.split()))) / self.sr
        return FakeTensor((0.5 * np.sin(2 * np.pi * 200 * t))[None, :].astype(np.float32))


def install_fake_chatterbox(monkeypatch: pytest.MonkeyPatch, gpu_seen: bool = False) -> None:
    import sys
    import types

    FakeChatterbox.loads = []
    monkeypatch.setitem(sys.modules, "chatterbox", types.ModuleType("chatterbox"))
    monkeypatch.setitem(sys.modules, "chatterbox.tts", types.SimpleNamespace(ChatterboxTTS=FakeChatterbox))
    monkeypatch.setitem(sys.modules, "torch",  # torch at its boundary: whether it sees a CUDA device
                        types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: gpu_seen)))


def write_checkpoints(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"weights")


@pytest.mark.parametrize("absent", CHATTERBOX_CHECKPOINTS)
async def test_a_chatterbox_folder_without_a_checkpoint_fails_at_start_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                                                   tmp_path: Path,
                                                                                   absent: str) -> None:
    """Only the folder used to be checked: one without its checkpoints failed deep inside chatterbox
    (FileNotFoundError: .../ve.safetensors), a traceback instead of the file and the setting that names it."""
    install_fake_chatterbox(monkeypatch)
    write_checkpoints(tmp_path, [name for name in CHATTERBOX_CHECKPOINTS if name != absent])
    engine = VoiceEngine(VoiceSettings(tts_backend="chatterbox", tts_model_dir=tmp_path, llm_backend="canned"))
    with pytest.raises(ModelMissing) as err:
        await engine.start()
    assert str(err.value) == f"model path {tmp_path / absent} does not exist (set by FLEET_VOICE_TTS_MODEL_DIR)"
    assert FakeChatterbox.loads == []


@pytest.mark.parametrize(("settings", "checkpoints", "said"), [
    ({"tts_backend": "chatterbox", "tts_model_dir": "MODELS"}, CHATTERBOX_CHECKPOINTS, "pip install chatterbox-tts"),
    ({"whisper_model_dir": "MODELS"}, WHISPER_FOLDER, "pip install faster-whisper"),
], ids=["chatterbox", "faster-whisper"])
async def test_a_backend_package_not_installed_fails_at_start_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: dict[str, Any], checkpoints: list[str],
        said: str) -> None:
    """A missing package used to escape start() as RuntimeError or ModuleNotFoundError, which the worker's CLI
    does not catch: a traceback and exit code 1 instead of one line naming what to install."""
    import sys

    for module in ["chatterbox", "chatterbox.tts", "faster_whisper"]:
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ModuleNotFoundError
    write_checkpoints(tmp_path, checkpoints)
    values: dict[str, Any] = {name: tmp_path if value == "MODELS" else value for name, value in settings.items()}
    engine = VoiceEngine(VoiceSettings(**values, llm_backend="canned"))
    with pytest.raises(VoiceError) as err:
        await engine.start()
    assert said in str(err.value), err.value


async def test_an_espeak_voice_it_lacks_fails_at_start_naming_the_setting() -> None:
    """It used to raise RuntimeError, a traceback and exit code 1 at the worker's start."""
    with pytest.raises(VoiceError) as err:
        await VoiceEngine(VoiceSettings(tts_voice="xx-nope", llm_backend="canned")).start()
    assert "'xx-nope'" in str(err.value) and "FLEET_VOICE_TTS_VOICE" in str(err.value), err.value


def broken_espeak_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, broken: str) -> str:
    """espeak-ng as a broken install leaves it, from a fresh process (no espeak-ng loaded yet); returns what the
    refusal must say."""
    import sys
    import types

    import espeakng_loader  # type: ignore[import-untyped]

    from worker.voice import tts

    monkeypatch.setattr(tts, "_espeak", None)
    if broken == "package":
        monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # importing it raises ModuleNotFoundError
        return "the espeak TTS backend needs the espeakng-loader package"
    library, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    if broken == "library":
        library = str(tmp_path / "libespeak-ng.so")
        Path(library).write_bytes(b"truncated by a failed download")  # ctypes.CDLL raises OSError

    def data_path() -> str:
        if broken == "data":  # what espeakng_loader raises when its espeak-ng-data folder is gone
            raise RuntimeError(f"data path not exists at {tmp_path / 'espeak-ng-data'}")
        return str(data)

    monkeypatch.setitem(sys.modules, "espeakng_loader",
                        types.SimpleNamespace(get_library_path=lambda: library, get_data_path=data_path))
    return {"library": f"espeak-ng's library {library} does not load",
            "data": f"espeak-ng's data folder is missing (data path not exists at {tmp_path / 'espeak-ng-data'})"}[
        broken]


@pytest.mark.parametrize("broken", ["package", "library", "data"])
async def test_a_broken_espeak_install_fails_at_start_saying_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path, broken: str) -> None:
    """espeakng-loader is a core dependency, yet a broken install can lack it, its library or its data: that was an
    ImportError, OSError or RuntimeError traceback instead of one line naming the package and the other backend."""
    said = broken_espeak_install(monkeypatch, tmp_path, broken)
    with pytest.raises(BackendUnavailable) as err:
        await VoiceEngine(VoiceSettings(llm_backend="canned")).start()
    assert str(err.value).startswith(said), err.value
    assert "pip install" in str(err.value) and "espeakng-loader" in str(err.value), err.value
    assert "FLEET_VOICE_TTS_BACKEND=chatterbox" in str(err.value) and err.value.setting == "FLEET_VOICE_TTS_BACKEND"


def test_an_espeak_data_folder_espeak_cannot_read_is_an_error_not_the_end_of_the_process(tmp_path: Path) -> None:
    """Regression: espeak_Initialize without espeakINITIALIZE_DONT_EXIT calls exit(1) when its data folder lacks its
    files, so the worker died with espeak's own message. In a process of its own: the library is process-global."""
    import subprocess
    import sys

    probe = (
        "import espeakng_loader\n"
        f"espeakng_loader.get_data_path = lambda: {str(tmp_path)!r}  # a folder without phontab, phondata, ...\n"
        "from worker.voice import tts\n"
        "from worker.voice.errors import BackendUnavailable\n"
        "try:\n"
        "    tts._EspeakLib()\n"
        "except BackendUnavailable as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"refused: espeak-ng cannot read its data folder {tmp_path}"), done.stdout
    assert "espeakng-loader" in done.stdout


@pytest.mark.parametrize("broken", ["espeak-package", "espeak-library", "whisper-tokenizer"])
def test_the_worker_refuses_a_broken_voice_install_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               broken: str) -> None:
    """The worker's CLI turns these start-up errors into one line and exit code 2, like a missing model folder."""
    from shared.redis_server import free_port
    from worker.cli import EXIT_USAGE, run_worker

    for variable, value in {"FLEET_HUB_URLS": f"http://127.0.0.1:{free_port()}", "FLEET_SIMULATE_GPU": "t4",
                            "FLEET_IMDS_URL": f"http://127.0.0.1:{free_port()}", "FLEET_IMDS_TIMEOUT_S": "0.1",
                            "FLEET_ENGINE": "voice", "FLEET_VOICE_LLM_BACKEND": "canned"}.items():
        monkeypatch.setenv(variable, value)
    if broken == "whisper-tokenizer":
        install_fake_whisper(monkeypatch)
        write_checkpoints(tmp_path, [name for name in WHISPER_FOLDER if name != "tokenizer.json"])
        monkeypatch.setenv("FLEET_VOICE_WHISPER_MODEL_DIR", str(tmp_path))
        said = f"model path {tmp_path / 'tokenizer.json'} does not exist (set by FLEET_VOICE_WHISPER_MODEL_DIR)"
    else:
        said = broken_espeak_install(monkeypatch, tmp_path, broken.removeprefix("espeak-"))
    code = run_worker(port=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(err) == 1, err
    assert err[0].startswith(f"fleet worker: {said}"), err


@pytest.mark.parametrize(("setting", "gpu_seen", "device"),
                         [("auto", True, "cuda"), ("auto", False, "cpu"), ("cuda:1", False, "cuda:1")])
async def test_chatterbox_adapter_loads_once_and_resamples_to_16k(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  setting: str, gpu_seen: bool, device: str) -> None:
    import numpy as np

    from worker.voice.audio import SAMPLE_RATE, rms

    install_fake_chatterbox(monkeypatch, gpu_seen)
    write_checkpoints(tmp_path, CHATTERBOX_CHECKPOINTS)
    engine = VoiceEngine(VoiceSettings(tts_backend="chatterbox", tts_model_dir=tmp_path, llm_backend="canned",
                                       tts_device=setting))
    await engine.start()
    assert engine.backends is not None
    tts = engine.backends.tts
    pcms = await asyncio.gather(*(tts.synthesize("one two three four") for _ in range(3)))  # three sessions
    assert FakeChatterbox.loads == [(str(tmp_path), device)]
    for pcm in pcms:
        assert len(pcm) == 2 * SAMPLE_RATE // 5  # 0.2 s of 24 kHz audio is 3200 samples at 16 kHz
        samples = np.frombuffer(pcm, dtype=np.int16)
        assert 0.45 * 32767 < np.abs(samples).max() <= 0.5 * 32767 + 1 and rms(pcm) > 5000
    await engine.aclose()


async def test_cancelling_the_caller_during_a_barge_in_is_not_swallowed() -> None:
    """Regression: barge-in awaited the cancelled reply under ``suppress(CancelledError)``, which also ate the
    caller's own cancellation; a transport loop stopped at that moment then ran on forever."""
    from shared.aio import cancel_and_wait

    async def reply_slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # e.g. a TTS call finishing in its thread

    turn = asyncio.create_task(reply_slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(turn))
    await asyncio.sleep(0.05)  # the caller now waits for the reply to wind down
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.gather(turn, return_exceptions=True)


@pytest.fixture
async def held_llm() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An OpenAI-compatible server that sends each reply's first words, then holds the stream open (as a reply
    stays open while its sentences are spoken) until released."""
    release = asyncio.Event()

    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps({'choices': [{'delta': {'content': 'Sure. '}}]})}\n\n".encode())
        await release.wait()
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with serving_llm(reply) as url:
        yield url, release
        release.set()  # before the server closes: it waits for the replies it holds


async def test_openai_replies_are_not_capped_by_a_hidden_connection_pool(
        held_llm: tuple[str, asyncio.Event]) -> None:
    """120 sessions reply at once (aiohttp's default pool holds 100 connections, and the 101st reply would wait
    for one of them to finish speaking): every one gets its first words while all of them are still speaking.

    The server holds every reply open until released, so a capped pool never gives the last 20 their first words;
    the generous wait only keeps a loaded CI machine (120 connections and their handlers on one loop) from
    failing a correct client."""
    from worker.voice.llm import OpenAICompatLLM

    url, release = held_llm
    llm = OpenAICompatLLM(url, "model")
    replies = [cast(AsyncGenerator[str, None], llm.stream(SYSTEM, HISTORY)) for _ in range(120)]
    first = await asyncio.gather(*(asyncio.wait_for(anext(r), 15) for r in replies), return_exceptions=True)
    late = [f for f in first if not isinstance(f, str)]
    release.set()
    for r in replies:
        await r.aclose()
    await llm.aclose()
    assert not late, f"{len(late)} of 120 replies waited for a connection: {late[0]!r}"
    assert first == ["Sure. "] * 120


async def test_openai_connect_has_its_own_timeout() -> None:
    """A server whose host takes no connections (its accept queue is full) fails the turn after the connect timeout,
    not after aiohttp's default 30 s of connecting (or the whole LLM timeout)."""
    import socket
    import time

    from worker.voice.llm import OpenAICompatLLM

    with socket.socket() as server, socket.socket() as queued:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # one connection queued fills it; the next SYN goes unanswered
        port = server.getsockname()[1]
        queued.connect(("127.0.0.1", port))
        llm = OpenAICompatLLM(f"http://127.0.0.1:{port}/v1", "model", connect_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(BackendError) as err:
            await asyncio.wait_for(anext(llm.stream(SYSTEM, HISTORY)), 3)
        await llm.aclose()
    assert err.value.stage == "llm" and time.monotonic() - started < 2


def test_full_scale_float_audio_stays_full_scale_in_pcm16() -> None:
    """A TTS at full scale (±1.0, or past it) must not wrap around to the opposite peak: that is a loud click."""
    import numpy as np

    from worker.voice.audio import float_to_pcm16

    pcm = float_to_pcm16(np.array([1.0, -1.0, 1.5, -1.5, 0.5], dtype=np.float32))
    assert np.frombuffer(pcm, dtype=np.int16).tolist() == [32767, -32767, 32767, -32767, 16383]


async def test_a_long_sentence_is_spoken_from_its_first_clause() -> None:
    """A colon or semicolon ends a piece TTS can start on, so a long first sentence does not delay the first audio;
    a decimal point does not."""
    async def chunks() -> AsyncIterator[str]:
        for c in ["Two options: the train at 3.15", "; or the bus, which is", " slower."]:
            yield c

    said = [s async for s in sentences(chunks())]
    assert said == ["Two options:", "the train at 3.15;", "or the bus, which is slower."]


def test_a_backend_package_that_fails_to_load_its_library_is_unavailable_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """An installed package whose native library does not load (a CUDA or espeak .so missing) raises a plain
    ImportError, not ModuleNotFoundError: the worker still says in one line what to install or change."""
    (tmp_path / "broken_backend_pkg.py").write_text('raise ImportError("libfoo.so.1: cannot open shared object")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailable) as err:
        import_backend("broken_backend_pkg", needed_by="FLEET_VOICE_STT_BACKEND=foo", package="foo",
                       setting="FLEET_VOICE_STT_BACKEND", instead="FLEET_VOICE_STT_BACKEND=pocketsphinx")
    assert "libfoo.so.1" in str(err.value) and "pip install foo" in str(err.value)
    assert err.value.setting == "FLEET_VOICE_STT_BACKEND"


async def test_a_cancelled_transcription_does_not_hold_the_model(fake_whisper: Path) -> None:
    """A turn cancelled while its transcript waits for the model (barge-in, the session stopped) gives the model up
    like one that timed out: once the model is free, it does not transcribe audio nobody will hear about."""
    from worker.voice.stt import transcribe

    stt, release = whisper_held_at_its_first_call(fake_whisper)
    started, finished = threading.Event(), threading.Event()
    busy, cancelled = stt.new_stream(), stt.new_stream()
    for stream in (busy, cancelled):
        stream.feed(b"\x01\x00" * 1600)
    finish = cancelled.finish

    def finish_and_tell() -> str:
        started.set()
        try:
            return finish()
        finally:
            finished.set()

    cancelled.finish = finish_and_tell  # type: ignore[method-assign]
    first = asyncio.create_task(transcribe(busy, 5))
    turn = asyncio.create_task(transcribe(cancelled, 5))
    assert await asyncio.to_thread(started.wait, 5)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    release.set()
    assert await first == "What is the weather like today?"
    assert await asyncio.to_thread(finished.wait, 5)
    assert len(FakeWhisperModel.calls) == 1  # the cancelled turn's audio never reached the model


async def test_whisper_chosen_without_a_model_folder_fails_at_start_naming_the_setting() -> None:
    """FLEET_VOICE_STT_BACKEND=whisper without FLEET_VOICE_WHISPER_MODEL_DIR is a one-line refusal, not a
    traceback from a path that is None."""
    with pytest.raises(ModelMissing) as err:
        await VoiceEngine(VoiceSettings(stt_backend="whisper", llm_backend="canned")).start()
    assert err.value.setting == "FLEET_VOICE_WHISPER_MODEL_DIR"


def test_pocketsphinx_recognises_the_sentences_of_the_corpus_file(tmp_path: Path) -> None:
    """FLEET_VOICE_STT_CORPUS_FILE replaces the built-in sentences: words only the file has are recognised."""
    from worker.voice.engine import _PRIMING_TEXT
    from worker.voice.stt import build_stt
    from worker.voice.tts import EspeakTTS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("open the pod bay doors\nclose the pod bay doors\n")
    stt, tts = build_stt(VoiceSettings(stt_corpus_file=corpus)), EspeakTTS()
    # Primed as the engine's start primes it: unprimed, the first utterance came out "open the pod doors" whenever
    # this test ran alone (the full suite's order happened to pass it).
    stt.load(tts.synthesize_sync(_PRIMING_TEXT))
    stream = stt.new_stream()
    stream.feed(tts.synthesize_sync("open the pod bay doors") + bytes(16000))
    assert stream.finish() == "open the pod bay doors"


def test_the_espeak_speaking_rate_is_applied_to_each_voice_of_the_process() -> None:
    """FLEET_VOICE_TTS_RATE_WPM changes how fast replies are spoken, though espeak-ng is one library per process
    (calibration speaks at the default rate in the same process)."""
    from worker.voice.tts import EspeakTTS

    text = "It is sunny in Paris today. Enjoy your walk by the river!"
    slow = EspeakTTS(rate_wpm=100).synthesize_sync(text)
    fast = EspeakTTS(rate_wpm=300).synthesize_sync(text)
    assert len(fast) < 0.6 * len(slow)
    again = EspeakTTS(rate_wpm=100).synthesize_sync(text)
    assert abs(len(again) - len(slow)) < 0.05 * len(slow)  # back to the slow rate


async def test_chatterbox_generates_one_reply_at_a_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The GPU model is one object shared by every session: concurrent syntheses are serialised, never run inside
    it at the same time."""
    import time

    install_fake_chatterbox(monkeypatch)
    write_checkpoints(tmp_path, CHATTERBOX_CHECKPOINTS)
    inside, most = [0], [0]
    count = threading.Lock()
    generate = FakeChatterbox.generate

    def timed_generate(self: FakeChatterbox, text: str) -> FakeTensor:
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # generation takes a while: concurrent calls would overlap here
        with count:
            inside[0] -= 1
        return generate(self, text)

    monkeypatch.setattr(FakeChatterbox, "generate", timed_generate)
    tts = ChatterboxTTS(tmp_path, "cpu")
    tts.load()
    pcms = await asyncio.gather(*(tts.synthesize("one two three four") for _ in range(4)))
    assert all(pcms) and most[0] == 1


@dataclass
class RecordingLLMServer:
    """An OpenAI-compatible server that records each request and streams ``chunks`` (SSE ``data:`` payloads)."""

    url: str = ""
    status: int = 200
    chunks: list[object] = field(default_factory=list)
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        if self.status != 200:
            return web.Response(status=self.status, text='{"error": "invalid api key"}')
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in self.chunks:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def llm_server() -> AsyncIterator[RecordingLLMServer]:
    server = RecordingLLMServer(chunks=[{"choices": [{"delta": {"content": "Hi there."}}]}])
    async with serving_llm(server.handle) as url:
        server.url = url
        yield server


async def reply_of(llm: Any) -> str:
    try:
        return "".join([text async for text in llm.stream(SYSTEM, HISTORY)])
    finally:
        await llm.aclose()


async def test_openai_requests_a_stream_with_the_configured_model_key_and_token_cap(
        llm_server: RecordingLLMServer) -> None:
    """What FLEET_VOICE_LLM_* configure reaches the server: the model, the bearer token (only when one is set),
    the reply cap, and ``stream: true`` (else the server answers with one JSON body, not a stream)."""
    from worker.voice.llm import build_llm

    configured = VoiceSettings(llm_base_url=llm_server.url, llm_model="qwen2.5", llm_api_key="sk-test", max_tokens=42)
    assert await reply_of(build_llm(configured)) == "Hi there."
    assert await reply_of(build_llm(VoiceSettings(llm_base_url=llm_server.url))) == "Hi there."
    (headers, body), (anonymous, _) = llm_server.requests
    assert headers["Authorization"] == "Bearer sk-test" and "Authorization" not in anonymous
    assert body == {"model": "qwen2.5", "stream": True, "max_tokens": 42,
                    "messages": [{"role": "system", "content": SYSTEM}, *HISTORY]}


async def test_an_openai_base_url_with_a_trailing_slash_reaches_the_server(llm_server: RecordingLLMServer) -> None:
    from worker.voice.llm import OpenAICompatLLM

    assert await reply_of(OpenAICompatLLM(llm_server.url + "/", "model")) == "Hi there."


async def test_an_openai_refusal_is_a_backend_error_naming_its_status(llm_server: RecordingLLMServer) -> None:
    """A 4xx (a wrong key, an unknown model) fails the turn with its status, rather than an empty reply."""
    from worker.voice.llm import OpenAICompatLLM

    llm_server.status = 401
    with pytest.raises(BackendError) as err:
        await reply_of(OpenAICompatLLM(llm_server.url, "model"))
    assert err.value.stage == "llm" and "HTTP 401" in str(err.value)


async def test_openai_chunks_without_text_add_nothing_to_the_reply(llm_server: RecordingLLMServer) -> None:
    """Servers differ in what they stream besides text: a first chunk with only the role, an empty or null delta
    with the finish reason, a usage chunk without choices. None of it is spoken (not even as "None")."""
    from worker.voice.llm import OpenAICompatLLM

    llm_server.chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"content": " there."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [{"index": 0, "delta": None, "finish_reason": "stop"}]},
        {"object": "chat.completion.chunk", "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
    ]
    assert await reply_of(OpenAICompatLLM(llm_server.url, "model")) == "Hi there."


def test_an_utterance_pocketsphinx_hears_no_words_in_is_an_empty_transcript() -> None:
    """No audio (pocketsphinx then has no hypothesis at all) or silence is an empty transcript, like whisper's:
    the turn is skipped, not failed."""
    from worker.voice.stt import PocketSphinxSTT

    stt = PocketSphinxSTT()
    stt.load()
    assert stt.new_stream().finish() == ""
    stream = stt.new_stream()
    stream.feed(bytes(16000))
    assert stream.finish() == ""


def test_bedrock_takes_its_timeouts_and_attempts_from_the_settings() -> None:
    """FLEET_VOICE_LLM_TIMEOUT_S bounds each socket read, FLEET_VOICE_BEDROCK_CONNECT_TIMEOUT_S the connect, and
    FLEET_VOICE_BEDROCK_MAX_ATTEMPTS the attempts: botocore's defaults (60 s reads, retries) would keep a user
    waiting."""
    from worker.voice.llm import build_llm

    llm = build_llm(VoiceSettings(llm_backend="bedrock", llm_timeout_s=7, bedrock_connect_timeout_s=3,
                                  bedrock_max_attempts=1, max_tokens=99))
    assert isinstance(llm, BedrockLLM) and llm.max_tokens == 99
    config = llm.client.meta.config
    assert (config.read_timeout, config.connect_timeout) == (7, 3)
    assert config.retries["total_max_attempts"] == 1


class HeldEventStream:
    """A ConverseStream event stream whose reader waits for the model after the first sentence. Closing it (as
    botocore's closes its socket) ends the wait; what had arrived by then can still be read."""

    def __init__(self, texts: list[str]) -> None:
        import threading

        self.texts, self.read = texts, 0
        self.unblocked, self.reader_done = threading.Event(), threading.Event()
        self.reader: object = None

    def __iter__(self) -> Any:
        import threading

        self.reader = threading.current_thread()
        for n, text in enumerate(self.texts):
            if n == 1:
                self.unblocked.wait(10)
            self.read += 1
            yield {"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}}

    def close(self) -> None:
        import threading

        self.unblocked.set()
        if threading.current_thread() is self.reader:
            self.reader_done.set()


async def test_a_bedrock_reply_given_up_on_stops_reading_the_stream() -> None:
    """Barge-in or the session's end closes the reply: its reader thread is woken from a read in progress and reads
    no further events (the model would go on generating, and the thread on running, for nobody)."""
    import types

    events = HeldEventStream(["Hello there. ", "More. ", "And more. ", "Still more. "])
    client = types.SimpleNamespace(converse_stream=lambda **_: {"stream": events})
    reply = cast(AsyncGenerator[str, None], BedrockLLM("model", client=client).stream(SYSTEM, HISTORY))
    assert await asyncio.wait_for(anext(reply), 5) == "Hello there. "
    await reply.aclose()
    assert await asyncio.to_thread(events.reader_done.wait, 5), "the reader thread is still blocked"
    assert events.read <= 2, f"{events.read} of 4 events read after the reply was closed"

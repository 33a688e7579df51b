"""One conversation's turn logic with fake backends (no sockets, no models): LLM timing, history, errors, the VAD cap,
and the Bedrock reader thread."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_voice_backends import WHISPER_FOLDER
from worker.voice.audio import FRAME_BYTES
from worker.voice.errors import BackendError
from worker.voice.llm import BedrockLLM, build_llm
from worker.voice.metrics import VoiceMetrics
from worker.voice.pipeline import Backends, Conversation, History, Turn
from worker.voice.settings import VoiceSettings
from worker.voice.stt import WhisperSTT
from worker.voice.vad import EndpointDetector, VadEvent


class FakeStream:
    """An STT stream: records what it is fed; ``finish`` takes ``delay_s``, then gives ``text`` or raises ``error``."""

    def __init__(self, text: str = "hello", error: Exception | None = None, delay_s: float = 0.0) -> None:
        self.text, self.error, self.delay_s, self.fed, self.finished = text, error, delay_s, 0, False
        self.frames: list[bytes] = []

    def feed(self, pcm: bytes) -> None:
        self.fed += len(pcm)
        self.frames.append(pcm)

    def finish(self) -> str:
        time.sleep(self.delay_s)
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.text

    def abandon(self) -> None:
        return None


class FakeSTT:
    """Hands out a stream per utterance: the scripted ones first, then ``FakeStream()``s."""

    name, model_mb, per_stream_mb = "fake", 0, 0

    def __init__(self, *scripted: FakeStream) -> None:
        self.scripted = list(scripted)
        self.streams: list[FakeStream] = []

    def load(self, priming_pcm: bytes | None = None) -> None:
        return None

    def new_stream(self) -> FakeStream:
        self.streams.append(self.scripted.pop(0) if self.scripted else FakeStream())
        return self.streams[-1]


class ScriptedLLM:
    """Streams ``chunks``; ``None`` in the script is a pause of ``pause_s``."""

    name = "scripted"

    def __init__(self, *chunks: str | None, pause_s: float = 10.0) -> None:
        self.chunks, self.pause_s = chunks, pause_s
        self.requests: list[list[dict[str, str]]] = []
        self.open_streams = 0

    async def stream(self, system: str, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        self.requests.append(messages)
        self.open_streams += 1
        try:
            for chunk in self.chunks:
                if chunk is None:
                    await asyncio.sleep(self.pause_s)
                else:
                    yield chunk
        finally:
            self.open_streams -= 1

    async def aclose(self) -> None:
        return None


class SlowTTS:
    """Takes ``delay_s`` per sentence and returns ``audio_s`` of audio: the reply's speaking time, not the LLM's
    (a long ``audio_s`` is a reply that plays for a while)."""

    name, model_mb, per_stream_mb = "slow", 0, 0

    def __init__(self, delay_s: float, audio_s: float = 0.1) -> None:
        self.delay_s, self.audio_s = delay_s, audio_s

    def load(self) -> None:
        return None

    async def synthesize(self, text: str) -> bytes:
        await asyncio.sleep(self.delay_s)
        return b"\x10\x00" * int(16000 * self.audio_s)


class Events:
    """A client: records events, and when each chunk of reply audio arrived."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.audio: list[tuple[float, float]] = []  # (arrival time, seconds of audio)

    async def send_audio(self, pcm: bytes) -> None:
        self.audio.append((time.perf_counter(), len(pcm) / 32000))

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def close(self, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def conversation(llm: Any, tts: Any = None, stt: Any = None, **settings: Any) -> tuple[Conversation, Events]:
    s = VoiceSettings(**settings)
    out = Events()
    backends = Backends(stt or FakeSTT(), llm, tts or SlowTTS(0))
    return Conversation("s1", backends, s, out, VoiceMetrics(), History(s.max_history_turns)), out


async def mm_hm_over_the_reply(llm: Any, stt: Any = None, **settings: Any) -> tuple[Conversation, Events]:
    """A question answered at length (4 s of reply audio), then a "mm-hm" too short to barge in (barge_in_ms is
    600) spoken over the reply. The conversation is left open."""
    c, out = conversation(llm, tts=SlowTTS(0, audio_s=4.0), stt=stt, barge_in_ms=600, **settings)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: c.speaking)
    await c.feed(noise(0.3) + SILENCE[: 32000 * 6 // 10])
    return c, out


async def turn(c: Conversation, stream: FakeStream) -> None:
    await c._run_turn(Turn(), stream, time.perf_counter(), 0.0)  # type: ignore[arg-type]


async def test_llm_timeout_does_not_count_speaking_the_reply() -> None:
    """Tokens arrive at once; speaking each sentence takes longer than llm_timeout_s. Not an LLM timeout."""
    c, out = conversation(ScriptedLLM("First sentence here. ", "Second one."), SlowTTS(0.3), llm_timeout_s=0.2)
    await turn(c, FakeStream("hello"))
    assert [e["text"] for e in out.of("reply_text")] == ["First sentence here.", "Second one."]
    assert out.of("error") == [] and out.of("reply_end")[0]["error"] is None
    assert c.metrics.error_rate == 0


async def test_llm_stalling_between_tokens_times_out(caplog: pytest.LogCaptureFixture) -> None:
    c, out = conversation(ScriptedLLM("Hello there. ", None, "never"), llm_timeout_s=0.2)
    started = time.perf_counter()
    await turn(c, FakeStream("hello"))
    assert time.perf_counter() - started < 2
    error = out.of("error")[0]
    assert error["stage"] == "llm" and "next token" in caplog.text and "0.2" in caplog.text
    assert out.of("reply_end")[0]["error"] == "llm"


async def test_stt_failure_counts_towards_error_rate() -> None:
    c, out = conversation(ScriptedLLM("Unused."))
    await turn(c, FakeStream(error=RuntimeError("decoder crashed")))
    assert out.of("error")[0]["stage"] == "stt"
    assert out.of("reply_end")[0]["error"] == "stt"
    assert c.metrics.errors == 1 and c.metrics.error_rate == 1.0


async def test_nothing_heard_is_not_a_turn() -> None:
    c, out = conversation(ScriptedLLM("Unused."))
    await turn(c, FakeStream(""))
    assert out.of("reply_end") == [] and c.metrics.turns == 0


def test_history_merges_unanswered_user_messages() -> None:
    h = History(5)
    h.add("user", "book a table")  # barge-in before the first sentence: no assistant message
    h.add("user", "for two tonight")
    assert h.messages == [{"role": "user", "content": "book a table for two tonight"}]
    h.add("assistant", "Done.")
    h.add("user", "thanks")
    assert [m["role"] for m in h.messages] == ["user", "assistant", "user"]


def test_history_trims_in_pairs_and_never_starts_with_the_assistant() -> None:
    h = History(3)
    for n in range(1, 6):
        h.add("user", f"u{n}")
        h.add("assistant", f"a{n}")
        roles = [m["role"] for m in h.messages]
        assert roles[0] == "user" and all(a != b for a, b in itertools.pairwise(roles)), roles
    h.add("user", "u6")  # what a turn adds before calling the LLM
    assert h.messages[0] == {"role": "user", "content": "u4"} and h.messages[-1]["content"] == "u6"
    assert len(h.messages) <= 6


async def test_barge_in_before_the_first_sentence_keeps_the_request_alternating() -> None:
    """A turn cut before its first sentence leaves no assistant message; the next request still alternates."""
    llm = ScriptedLLM(None, "Too late.", pause_s=10)
    c, _ = conversation(llm)
    first = asyncio.create_task(turn(c, FakeStream("book a table")))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    llm.chunks = ("Sure.",)
    await turn(c, FakeStream("for two tonight"))
    assert [m["role"] for m in llm.requests[-1]] == ["user"]
    assert llm.requests[-1][0]["content"] == "book a table for two tonight"


def noise(seconds: float) -> bytes:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(int(16000 * seconds)) * 8000).clip(-32768, 32767).astype(np.int16).tobytes()


SILENCE = b"\x00\x00" * 16000


async def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_speech_during_transcription_is_answered_together_with_it() -> None:
    """The user pauses, then goes on while the first part is still being transcribed: nothing they said is lost,
    and one reply answers both parts."""
    stt = FakeSTT(FakeStream("book a table", delay_s=0.5), FakeStream("for two tonight"))
    llm = ScriptedLLM("Done.")
    c, out = conversation(llm, stt=stt)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])  # first utterance ends; its STT takes 0.5 s
    assert out.of("speech_end") and not stt.streams[0].finished
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])  # second utterance while the first is transcribed
    await wait_until(lambda: out.of("reply_end"))
    await asyncio.sleep(0.1)
    assert llm.requests == [[{"role": "user", "content": "book a table for two tonight"}]]
    assert len(out.of("reply_end")) == 1 and out.of("barge_in") == []
    await c.aclose()


async def test_short_speech_over_the_reply_does_not_stop_it_but_barge_in_ms_of_it_does() -> None:
    llm = ScriptedLLM("Here is a long answer.")
    c, out = await mm_hm_over_the_reply(llm, vad_min_speech_ms=200)
    await asyncio.sleep(0.2)
    assert out.of("barge_in") == [] and c.speaking and len(llm.requests) == 1
    await c.feed(noise(0.8))  # the user really talks over it
    assert len(out.of("barge_in")) == 1 and not c.speaking
    await c.aclose()


@pytest.mark.parametrize("transcribed_before_the_cough_ends", [False, True])
async def test_a_cough_while_the_question_is_transcribed_does_not_drop_the_question(
    transcribed_before_the_cough_ends: bool,
) -> None:
    """The follow-up "utterance" is noise that STT hears as nothing: the question it superseded is still answered."""
    stt = FakeSTT(FakeStream("book a table", delay_s=0.2), FakeStream(""))
    llm = ScriptedLLM("Done.")
    c, out = conversation(llm, stt=stt)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await c.feed(noise(0.3))  # a cough starts while the question is transcribed
    if transcribed_before_the_cough_ends:
        await wait_until(lambda: out.of("transcript"))
        await asyncio.sleep(0.05)
    await c.feed(SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: out.of("reply_end"), timeout_s=2)
    assert llm.requests == [[{"role": "user", "content": "book a table"}]]
    assert [e["text"] for e in out.of("reply_text")] == ["Done."]
    await c.aclose()


def playback(audio: list[tuple[float, float]]) -> tuple[float, float]:
    """The client plays each chunk when it arrives or when the one before ends. Returns the longest silence inside
    the reply, and the most audio the client still had to play when a chunk arrived (what barge-in cannot stop)."""
    played_until = audio[0][0]
    longest_gap = buffered = 0.0
    for arrived, seconds in audio:
        longest_gap = max(longest_gap, arrived - played_until)
        buffered = max(buffered, played_until - arrived)
        played_until = max(played_until, arrived) + seconds
    return longest_gap, buffered


async def test_a_slow_tts_speaks_the_next_sentence_while_one_plays() -> None:
    """TTS takes 0.6 s a sentence, each plays 0.8 s: synthesised one sentence ahead, the reply has no silences."""
    llm = ScriptedLLM("One two three. ", "Four five six. ", "Seven eight nine.")
    c, out = conversation(llm, tts=SlowTTS(0.6, audio_s=0.8))
    await turn(c, FakeStream("count"))
    assert len(out.of("reply_text")) == 3 and out.of("reply_end")[0]["error"] is None
    longest_gap, _ = playback(out.audio)
    assert longest_gap < 0.05, f"a {longest_gap:.2f} s silence between sentences"


async def test_reply_audio_keeps_its_lead_across_sentences() -> None:
    """The 300 ms lead is over the client's playback of the whole reply, not restarted by every sentence."""
    llm = ScriptedLLM("One two three. ", "Four five six. ", "Seven eight nine.")
    c, out = conversation(llm, tts=SlowTTS(0, audio_s=0.6))
    await turn(c, FakeStream("count"))
    _, buffered = playback(out.audio)
    assert buffered <= 0.3 + 0.05, f"{buffered:.2f} s of audio was sent ahead of playback"


async def test_barge_in_stops_the_sentence_read_ahead_and_the_llm_stream_at_once() -> None:
    llm = ScriptedLLM("First sentence. ", "Second sentence. ", "Third sentence. ", None, pause_s=10)
    c, out = conversation(llm, tts=SlowTTS(0.05, audio_s=2.0))
    before = asyncio.all_tasks()
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: c.speaking)
    await asyncio.sleep(0.2)  # the next sentence is synthesised meanwhile
    await c.feed(noise(0.8))
    assert len(out.of("barge_in")) == 1 and not c.speaking
    assert llm.open_streams == 0, "the LLM stream was left open"
    assert asyncio.all_tasks() == before, "a task of the cancelled reply is still running"
    sent = len(out.audio)
    await asyncio.sleep(0.2)
    assert len(out.audio) == sent and [e["text"] for e in out.of("reply_text")] == ["First sentence."]
    await c.aclose()


async def test_speech_over_an_apology_barges_in() -> None:
    c, out = conversation(ScriptedLLM("Unused."), tts=SlowTTS(0, audio_s=4.0),
                          stt=FakeSTT(FakeStream(error=RuntimeError("decoder crashed"))))
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: c.speaking)  # the apology plays
    await c.feed(noise(0.8))
    assert len(out.of("barge_in")) == 1 and not c.speaking
    assert c.metrics.errors == 1  # cut off, the failed turn still counts
    await c.aclose()


async def test_the_frame_that_starts_speech_reaches_stt() -> None:
    stt = FakeSTT()
    c, _ = conversation(ScriptedLLM("Okay."), stt=stt)
    speech = noise(0.6)
    await c.feed(SILENCE[: 32000 * 4 // 10] + speech + SILENCE[: 32000 * 6 // 10])
    frames = [speech[i : i + FRAME_BYTES] for i in range(0, len(speech), FRAME_BYTES)]
    missing = [i for i, frame in enumerate(frames) if frame not in stt.streams[0].frames]
    assert missing == []
    await c.aclose()


class FakeWhisperModel:
    """``faster_whisper.WhisperModel`` at its boundary: counts the transcriptions it runs."""

    transcriptions = 0

    def __init__(self, path: str, **kwargs: Any) -> None:
        FakeWhisperModel.transcriptions = 0

    def transcribe(self, audio: Any, **kwargs: Any) -> tuple[Any, Any]:
        FakeWhisperModel.transcriptions += 1
        return iter([types.SimpleNamespace(text="book a table")]), object()


def whisper_stt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> WhisperSTT:
    monkeypatch.setitem(sys.modules, "faster_whisper", types.SimpleNamespace(WhisperModel=FakeWhisperModel))
    for name in WHISPER_FOLDER:  # what load() checks for
        (tmp_path / name).write_bytes(b"{}")
    stt = WhisperSTT(tmp_path, "cpu")
    stt.load()
    return stt


async def test_speech_too_short_to_barge_in_is_never_transcribed(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """A "mm-hm" over the reply is discarded: the shared whisper model does not transcribe it."""
    c, out = await mm_hm_over_the_reply(ScriptedLLM("Here is a long answer."), whisper_stt(monkeypatch, tmp_path))
    assert len(out.of("speech_end")) == 2 and out.of("barge_in") == []
    await c.aclose()  # waits for the discarded utterance's stream to be returned
    assert FakeWhisperModel.transcriptions == 1


def test_vad_forces_the_end_of_speech_at_the_cap() -> None:
    """White noise keeps webrtcvad in speech; the cap ends each utterance anyway."""
    vad = EndpointDetector(2, 300, 200, max_speech_ms=1000)
    pcm = noise(3.5)
    ends = [i * 20 for i in range(len(pcm) // FRAME_BYTES)
            if vad.process(pcm[i * FRAME_BYTES : (i + 1) * FRAME_BYTES]) is VadEvent.SPEECH_END]
    assert len(ends) >= 2 and ends[0] <= 1300


async def test_an_utterance_of_noise_is_not_buffered_without_bound() -> None:
    stt = FakeSTT()
    c, out = conversation(ScriptedLLM("Okay."), stt=stt, max_utterance_s=1.0)
    await c.feed(noise(3.5))
    assert out.of("speech_end")  # forced, though the noise never stops
    assert stt.streams and max(s.fed for s in stt.streams) <= 32000 * 1.0 + 15 * FRAME_BYTES  # + the pre-roll
    await c.aclose()


def test_bedrock_client_has_explicit_timeouts_and_bounded_retries() -> None:
    llm = build_llm(VoiceSettings(llm_backend="bedrock", llm_model="m", llm_timeout_s=7, bedrock_connect_timeout_s=3,
                                  bedrock_max_attempts=2))
    assert isinstance(llm, BedrockLLM)
    config = llm.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3, 7)
    assert config.retries == {"total_max_attempts": 2, "mode": "standard"}


async def test_cancelled_bedrock_turn_stops_its_reader_thread() -> None:
    read: list[int] = []
    closed = threading.Event()

    class Events:
        def __iter__(self) -> Any:
            for i in range(200):
                time.sleep(0.01)
                read.append(i)
                yield {"contentBlockDelta": {"delta": {"text": f"w{i} "}}}

        def close(self) -> None:
            closed.set()

    class Client:
        def converse_stream(self, **_: Any) -> dict[str, Any]:
            return {"stream": Events()}

    llm = BedrockLLM("m", client=Client())

    async def consume() -> None:
        async for _ in llm.stream("sys", [{"role": "user", "content": "hi"}]):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.1)
    at_stop = len(read)
    await asyncio.sleep(0.2)
    assert len(read) == at_stop < 50, "the reader thread went on reading a cancelled turn's stream"
    assert closed.wait(1)


async def test_bedrock_failure_still_reaches_the_turn() -> None:
    class Client:
        def converse_stream(self, **_: Any) -> dict[str, Any]:
            raise RuntimeError("throttled")

    with pytest.raises(BackendError, match="throttled"):
        async for _ in BedrockLLM("m", client=Client()).stream("sys", [{"role": "user", "content": "hi"}]):
            pass


async def test_an_empty_llm_reply_is_an_error_and_the_user_hears_an_apology() -> None:
    """An LLM that streams nothing (or only whitespace) must not leave the user in silence: the turn fails at the
    llm stage and the apology is spoken."""
    c, out = conversation(ScriptedLLM(" ", "\n"))
    await turn(c, FakeStream("hello"))
    assert out.of("error")[0]["stage"] == "llm" and out.of("reply_end")[0]["error"] == "llm"
    assert out.audio, "the apology was not spoken"
    assert c.metrics.errors == 1


class TimedTTS(SlowTTS):
    """Takes ``delays_s[n]`` for the n-th sentence (the last one for any after it)."""

    def __init__(self, *delays_s: float) -> None:
        super().__init__(0)
        self.delays_s, self.calls = delays_s, 0

    async def synthesize(self, text: str) -> bytes:
        self.delay_s = self.delays_s[min(self.calls, len(self.delays_s) - 1)]
        self.calls += 1
        return await super().synthesize(text)


async def test_first_token_first_sentence_and_first_audio_are_timed_once_per_turn() -> None:
    """The latency figures are of the reply's start: a slow second token or a slow second sentence does not
    overwrite them, and the client hears of the first audio once."""
    llm = ScriptedLLM("First sentence here. ", None, "Second one.", pause_s=0.3)
    c, out = conversation(llm, TimedTTS(0.0, 0.3), llm_timeout_s=2)
    await turn(c, FakeStream("hello"))
    timings = out.of("reply_end")[0]["timings"]
    assert out.of("reply_end")[0]["error"] is None
    assert timings["llm_first_token_ms"] < 250, timings  # 300 ms and more when a slow later part counts
    assert timings["llm_first_sentence_ms"] < 250, timings  # 300 ms and more when a slow later part counts
    assert timings["tts_first_ms"] < 250, timings  # 300 ms and more when a slow later part counts
    assert [e["e2e_ms"] for e in out.of("first_audio")] == [timings["e2e_ms"]]


async def test_latency_is_timed_from_when_the_user_stopped_talking() -> None:
    """``vad_ms`` is the silence the VAD waited for after the last voiced frame, and ``e2e_ms`` counts it: the
    user waits from their last word, not from when the end of speech was detected."""
    c, out = conversation(ScriptedLLM("Okay."), vad_silence_ms=300)
    pcm = noise(0.6) + SILENCE[: 32000 * 6 // 10]
    for i in range(0, len(pcm), FRAME_BYTES):  # in real time
        await c.feed(pcm[i : i + FRAME_BYTES])
        await asyncio.sleep(0.02)
    await wait_until(lambda: out.of("reply_end"))
    timings = out.of("reply_end")[0]["timings"]
    assert 280 <= timings["vad_ms"] < 800, timings  # ~900 ms if timed from the speech's start
    assert timings["e2e_ms"] >= timings["vad_ms"], timings
    await c.aclose()


async def test_speech_before_the_reply_plays_stops_it_at_once_and_is_heard() -> None:
    """While the LLM is still thinking, the user speaking again (even briefly, under ``barge_in_ms``) stops the
    pending reply, and what they said becomes the next turn rather than being dropped as an "mm-hm"."""
    stt = FakeSTT(FakeStream("book a table"), FakeStream("for two"))
    llm = ScriptedLLM(None, "Too late.", pause_s=1.0)
    c, out = conversation(llm, stt=stt, barge_in_ms=600)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: out.of("transcript"))
    await c.feed(noise(0.3))
    assert len(out.of("barge_in")) == 1 and out.audio == []
    llm.chunks = ("Sure.",)
    await c.feed(SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: out.of("reply_end"))
    assert llm.requests[-1] == [{"role": "user", "content": "book a table for two"}]
    assert [e["text"] for e in out.of("reply_text")] == ["Sure."]
    await c.aclose()


async def test_a_failed_transcription_the_user_talked_over_is_not_apologised_for_over_them() -> None:
    """The first utterance's STT fails while the user is already saying more: the client is told of the error,
    but no apology is spoken over the user."""
    stt = FakeSTT(FakeStream(error=RuntimeError("decoder crashed"), delay_s=0.2), FakeStream("for two tonight"))
    c, out = conversation(ScriptedLLM("Done."), stt=stt, tts=SlowTTS(0, audio_s=2.0))
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await c.feed(noise(0.6))  # the user goes on while the first part is transcribed
    await wait_until(lambda: out.of("error"))
    await asyncio.sleep(0.1)
    assert out.of("error")[0]["stage"] == "stt"
    assert out.audio == [] and not c.speaking, "an apology was spoken over the user"
    await c.aclose()


async def test_a_failed_question_followed_by_a_cough_is_apologised_for_once_the_user_stops() -> None:
    """The question's STT fails while the user coughs: its apology is held back (not spoken over the user), and the
    cough, which STT hears as nothing, has nothing to answer. Regression: the user then heard nothing at all. Now
    the cough's turn speaks the apology. Found by a mutation review."""
    stt = FakeSTT(FakeStream(error=RuntimeError("decoder crashed"), delay_s=0.2), FakeStream(""))
    c, out = conversation(ScriptedLLM("Unused."), stt=stt, tts=SlowTTS(0, audio_s=1.0))
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])  # the question; its STT fails after 0.2 s
    await c.feed(noise(0.3))  # a cough while it is transcribed
    await c.feed(SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: len(out.of("reply_end")) == 2)
    assert out.of("error")[0]["stage"] == "stt" and len(out.of("error")) == 1
    assert out.audio, "the user heard nothing"
    assert out.of("reply_end")[-1]["error"] is None and c.history.messages == []
    await c.aclose()


def test_scattered_clicks_never_add_up_to_speech() -> None:
    """Single voiced frames between silences (typing, clicks) are not an utterance, however many there are: only
    ``min_speech_ms`` of voiced frames in a row start speech."""
    vad = EndpointDetector(2, 300, 200)
    click, quiet = noise(0.02), SILENCE[: FRAME_BYTES * 10]  # webrtcvad hears each click for ~100 ms
    pcm = (click + quiet) * 20
    events = [vad.process(pcm[i : i + FRAME_BYTES]) for i in range(0, len(pcm), FRAME_BYTES)]
    assert VadEvent.SPEECH_START not in events and not vad.in_speech


def test_voiced_time_counts_the_speech_that_started_the_utterance() -> None:
    """Barge-in waits for ``barge_in_ms`` of the user's speech, counted from the first syllable, not from when the
    VAD was sure speech had started."""
    vad = EndpointDetector(2, 300, 200)
    pcm = noise(0.6)
    for i in range(0, len(pcm), FRAME_BYTES):
        vad.process(pcm[i : i + FRAME_BYTES])
    assert vad.in_speech and vad.voiced_ms >= 560, vad.voiced_ms


async def test_a_barge_in_wastes_at_most_one_sentence_of_synthesis() -> None:
    """Sentences are synthesised one ahead of the one playing, not the whole reply: TTS is shared by every session
    on the GPU, and what a barge-in cuts off was synthesised for nothing."""
    llm = ScriptedLLM("First sentence. ", "Second sentence. ", "Third sentence. ", "Fourth sentence.")
    tts = TimedTTS(0.0)
    tts.audio_s = 2.0
    c, out = conversation(llm, tts=tts)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: c.speaking)
    await asyncio.sleep(0.2)
    await c.feed(noise(0.8))
    assert len(out.of("barge_in")) == 1
    assert tts.calls <= 2, f"{tts.calls} sentences synthesised while the first one played"
    await c.aclose()


async def test_closing_stops_the_turn_still_transcribing_that_the_next_one_continues() -> None:
    """The session ends while the first part of what the user said is transcribed and the second waits for it:
    neither goes on after the close, and the client is sent nothing more."""
    stt = FakeSTT(FakeStream("book a table", delay_s=0.5), FakeStream("for two tonight"))
    c, out = conversation(ScriptedLLM("Done."), stt=stt)
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    assert len(out.of("speech_end")) == 2 and out.of("transcript") == []
    await c.aclose()
    sent = len(out.events)
    await asyncio.sleep(0.7)  # the first transcription is over by now
    assert len(out.events) == sent, f"sent after the close: {out.events[sent:]}"
    assert c.history.messages == []


async def test_a_quick_follow_up_does_not_hear_the_start_of_the_utterance_before_it() -> None:
    """The pre-roll given to STT is audio from just before this utterance: when the user speaks again soon after
    the last one ended, the first syllables of the last one are not heard a second time."""
    stt = FakeSTT(FakeStream("book a table", delay_s=0.3), FakeStream("for two"))
    c, _ = conversation(ScriptedLLM("Done."), stt=stt)
    first = noise(0.6)
    second = (np.random.default_rng(1).standard_normal(16000 * 6 // 10) * 8000).astype(np.int16).tobytes()
    pause = SILENCE[: FRAME_BYTES * 22]  # webrtcvad hears ~120 ms more, then 300 ms of silence end the utterance
    await c.feed(SILENCE[: 32000 * 4 // 10] + first + pause + second)
    assert len(stt.streams) == 2
    first_frames = {first[i : i + FRAME_BYTES] for i in range(0, len(first), FRAME_BYTES)}
    heard_again = [f for f in stt.streams[1].frames if f in first_frames]
    assert heard_again == [], f"{len(heard_again)} frames of the first utterance reached the second one's STT"
    await c.aclose()


async def test_no_more_reply_audio_is_unplayed_at_any_time_than_the_lead_and_one_chunk() -> None:
    """What the client holds unplayed is what a barge-in cannot take back: at most the 300 ms lead plus the 100 ms
    chunk just sent, however the reply audio is cut."""
    c, out = conversation(ScriptedLLM("Here is a long answer."), tts=SlowTTS(0, audio_s=1.5))
    await turn(c, FakeStream("tell me"))
    played_until, unplayed = out.audio[0][0], 0.0
    for arrived, seconds in out.audio:
        played_until = max(played_until, arrived) + seconds
        unplayed = max(unplayed, played_until - arrived)
    assert unplayed <= 0.3 + 0.1 + 0.05, f"{unplayed:.2f} s of reply audio was unplayed at once"


class BrokenTTS(SlowTTS):
    """A TTS that fails every sentence, the apology included."""

    def __init__(self) -> None:
        super().__init__(0)

    async def synthesize(self, text: str) -> bytes:
        raise RuntimeError("synthesis server down")


async def test_a_turn_whose_apology_cannot_be_spoken_still_ends_as_a_tts_failure() -> None:
    """With TTS down, the apology fails too: the client is still told the turn ended at the tts stage, and the
    failure counts towards the error rate (the session is not taken for gone)."""
    c, out = conversation(ScriptedLLM("Hello there."), tts=BrokenTTS())
    await turn(c, FakeStream("hello"))
    assert [e["stage"] for e in out.of("error")] == ["tts"]
    assert out.of("reply_end")[0]["error"] == "tts" and out.audio == []
    assert c.metrics.errors_by_stage["tts"] == 1 and c.metrics.error_rate == 1.0


async def test_a_transcript_of_only_whitespace_is_nothing_heard() -> None:
    """Whisper hears breath or noise as " ": no turn, and nothing is sent to the LLM."""
    llm = ScriptedLLM("Unused.")
    c, out = conversation(llm)
    await turn(c, FakeStream("  "))
    assert out.of("reply_end") == [] and llm.requests == [] and c.history.messages == []


async def test_reply_audio_is_sent_ahead_of_playback_not_just_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client is kept up to the lead ahead, so a late chunk does not make the reply stutter: the pacing waits
    about one chunk at a time, never until the client has played everything sent."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(delay, *args)

    c, out = conversation(ScriptedLLM("Here is a long answer."), tts=SlowTTS(0, audio_s=1.5))
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await turn(c, FakeStream("tell me"))
    monkeypatch.undo()
    assert sum(seconds for _, seconds in out.audio) == pytest.approx(1.5)
    assert waits and max(waits) <= 0.1 + 0.05, f"waited {max(waits):.2f} s before sending a chunk"


def test_latency_and_error_rate_are_of_recent_turns_only() -> None:
    """The exported latency and error rate follow the last ``window`` turns: a slow, failing start does not weigh
    on the figures once the backends have recovered."""
    metrics = VoiceMetrics(window=3)
    for _ in range(3):
        metrics.record_turn({"stt_ms": 900.0, "e2e_ms": 2000.0}, "stt")
    for _ in range(3):
        metrics.record_turn({"stt_ms": 100.0, "e2e_ms": 400.0}, None)
    assert metrics.stage_latency_ms == {"stt_ms": 100.0, "e2e_ms": 400.0} and metrics.e2e_ms == 400.0
    assert metrics.error_rate == 0.0
    assert metrics.turns == 6 and metrics.errors == 3 and metrics.errors_by_stage["stt"] == 3
    metrics.record_turn({}, "llm")
    assert metrics.error_rate == pytest.approx(1 / 3)


def test_stage_latency_leaves_out_stages_no_turn_reached() -> None:
    """Turns that failed at STT have no LLM or TTS figures: those stages are left out, not an error."""
    metrics = VoiceMetrics()
    metrics.record_turn({"vad_ms": 300.0, "stt_ms": 120.0}, "stt")
    assert metrics.stage_latency_ms == {"vad_ms": 300.0, "stt_ms": 120.0}
    assert metrics.e2e_ms == 0.0 and metrics.error_rate == 1.0


async def test_the_next_request_carries_what_the_assistant_said() -> None:
    """The reply goes into the history, so the LLM knows what it answered when the user follows up."""
    llm = ScriptedLLM("Sure. ", "A table for two.")
    c, _ = conversation(llm)
    await turn(c, FakeStream("book a table"))
    llm.chunks = ("Done.",)
    await turn(c, FakeStream("thanks"))
    assert llm.requests[-1] == [{"role": "user", "content": "book a table"},
                                {"role": "assistant", "content": "Sure. A table for two."},
                                {"role": "user", "content": "thanks"}]


class HeldLLM(ScriptedLLM):
    """Keeps every stream it hands out, as an HTTP client keeps its open responses: none is closed by the garbage
    collector."""

    def __init__(self, *chunks: str | None) -> None:
        super().__init__(*chunks)
        self.streams: list[AsyncIterator[str]] = []

    def stream(self, system: str, messages: list[dict[str, str]]) -> AsyncIterator[str]:  # type: ignore[override]
        self.streams.append(super().stream(system, messages))
        return self.streams[-1]


async def test_barge_in_closes_the_llm_stream_while_its_reader_waits_for_playback() -> None:
    """The reply's next sentence is read and the LLM stream waits at it while the first one plays: a barge-in then
    closes the stream itself (an HTTP response, a Bedrock event stream), not only the reader."""
    llm = HeldLLM("First sentence. ", "Second sentence. ", "Third sentence.")
    c, out = conversation(llm, tts=SlowTTS(0, audio_s=2.0))
    await c.feed(noise(0.6) + SILENCE[: 32000 * 6 // 10])
    await wait_until(lambda: c.speaking)
    await asyncio.sleep(0.2)
    assert llm.open_streams == 1
    await c.feed(noise(0.8))
    assert len(out.of("barge_in")) == 1
    assert llm.open_streams == 0, "the LLM stream was left open"
    await c.aclose()


async def test_closing_mid_utterance_returns_its_stt_stream() -> None:
    """The session ends while the user talks: the utterance's stream is ended, so a pooled decoder goes back to the
    pool every session shares instead of leaking with each session stopped mid-sentence."""
    stt = FakeSTT()
    c, _ = conversation(ScriptedLLM("Unused."), stt=stt)
    await c.feed(SILENCE[:3200] + noise(0.6))
    assert len(stt.streams) == 1 and not stt.streams[0].finished
    await c.aclose()
    assert stt.streams[0].finished


async def test_closing_waits_until_a_discarded_utterance_has_returned_its_stream() -> None:
    """A "mm-hm" over the reply is discarded in the background; closing the conversation waits for that, so its
    decoder is back in the pool when the close returns."""
    stt = FakeSTT(FakeStream("tell me"), FakeStream("mm-hm", delay_s=0.3))
    c, out = await mm_hm_over_the_reply(ScriptedLLM("Here is a long answer."), stt)
    assert len(out.of("speech_end")) == 2 and out.of("barge_in") == []
    await c.aclose()
    assert stt.streams[1].finished


class ScriptedVad:
    """webrtcvad's verdicts given in advance, one per frame."""

    def __init__(self, *voiced: bool) -> None:
        self.voiced = list(voiced)

    def is_speech(self, frame: bytes, sample_rate: int) -> bool:
        return self.voiced.pop(0)


def test_speech_starts_and_ends_on_the_frame_the_settings_say() -> None:
    """``min_speech_ms`` of voiced frames start speech and ``silence_ms`` of silent ones end it, to the frame: the
    user waits no longer than configured for the reply."""
    vad = EndpointDetector(2, silence_ms=300, min_speech_ms=200)
    vad._vad = ScriptedVad(*[True] * 10, *[False] * 15)
    events = [vad.process(SILENCE[:FRAME_BYTES]) for _ in range(25)]
    assert events[9] is VadEvent.SPEECH_START and events[24] is VadEvent.SPEECH_END
    assert [e for e in events if e is not None] == [VadEvent.SPEECH_START, VadEvent.SPEECH_END]


def test_after_the_cap_ends_an_utterance_the_next_one_starts_like_any_other() -> None:
    """Noise that never stops is cut into utterances of ``max_speech_ms``; each next one again needs
    ``min_speech_ms`` to start, and counts only its own voiced time (not the whole noise, which would barge in at
    once)."""
    vad = EndpointDetector(2, silence_ms=300, min_speech_ms=200, max_speech_ms=1000)
    vad._vad = ScriptedVad(*[True] * 70)
    events = [vad.process(SILENCE[:FRAME_BYTES]) for _ in range(60)]
    assert [i for i, e in enumerate(events) if e is not None] == [9, 49, 59]
    assert events[59] is VadEvent.SPEECH_START and vad.voiced_ms == 200


def test_short_pauses_inside_an_utterance_do_not_add_up_to_its_end() -> None:
    """Only ``silence_ms`` of silence in a row ends speech: a user who pauses briefly between words, again and
    again, is not cut off."""
    vad = EndpointDetector(2, silence_ms=300, min_speech_ms=200)
    vad._vad = ScriptedVad(*([True] * 10 + [False] * 10) * 4)
    events = [vad.process(SILENCE[:FRAME_BYTES]) for _ in range(80)]
    assert [e for e in events if e is not None] == [VadEvent.SPEECH_START] and vad.in_speech

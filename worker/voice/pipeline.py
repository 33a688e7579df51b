"""One conversation: frames in → VAD → STT → LLM → sentence-by-sentence TTS → frames out, with barge-in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.aio import cancel_and_wait
from shared.keys import shown_session_id
from worker.voice.audio import FRAME_BYTES, FRAME_MS, SAMPLE_RATE
from worker.voice.errors import BackendError
from worker.voice.llm import LLM, Message
from worker.voice.metrics import VoiceMetrics
from worker.voice.settings import VoiceSettings
from worker.voice.stt import STT, STTStream, transcribe
from worker.voice.tts import TTS
from worker.voice.vad import EndpointDetector, VadEvent

log = logging.getLogger(__name__)

#: What the client is told when a stage fails; the backend's own words stay in the worker's log.
_CLIENT_ERRORS = {
    "stt": "speech recognition failed for this turn",
    "llm": "the language model did not answer in time or failed",
    "tts": "speech synthesis failed for this turn",
}

APOLOGY = "Sorry, I had a problem answering that. Please try again."
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_PREROLL_FRAMES = 15  # audio kept from before the VAD fired, so STT hears the first syllable
_CHUNK_MS = 100  # reply audio is sent in chunks of this length
_LEAD_MS = 300  # how far ahead of real time reply audio may be sent (what barge-in cannot take back)


class Transport(Protocol):
    """Where a conversation's output goes (a WebSocket, a LiveKit room)."""

    async def send_audio(self, pcm: bytes) -> None: ...

    async def send_event(self, event: dict[str, Any]) -> None: ...

    async def close(self, reason: str) -> None:
        """The session ended on the worker's side. Must not hang on a client that stopped reading."""
        ...

    def abort(self) -> None:
        """Drop the client at once, without a goodbye: it stopped taking what is sent to it."""
        ...


@dataclass
class Backends:
    """Models loaded once per process and shared by every session."""

    stt: STT
    llm: LLM
    tts: TTS


@dataclass
class History:
    """The conversation so far, always valid for chat APIs that demand it (Bedrock Converse refuses anything else):
    it starts with a user message and alternates user/assistant.

    A turn cut off before its first sentence (barge-in, a failed turn) leaves a user message with no answer; the
    next one is merged into it. Trimming drops the oldest messages and then any assistant message left in front,
    so whole user/assistant pairs go together."""

    max_turns: int
    messages: list[Message] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        if self.messages and self.messages[-1]["role"] == role:
            last = self.messages[-1]["content"]
            self.messages[-1] = {"role": role, "content": f"{last} {content}"}  # a new dict: a request may hold the old
        else:
            self.messages.append({"role": role, "content": content})
        del self.messages[: max(0, len(self.messages) - 2 * self.max_turns)]
        while self.messages and self.messages[0]["role"] != "user":
            del self.messages[0]


async def _discard(stream: STTStream) -> None:
    """End an utterance nobody will answer without transcribing it: abandoned first, so a whisper stream does not
    hold the model all sessions share; ``finish`` still returns a pooled decoder."""
    with contextlib.suppress(Exception):
        stream.abandon()
        await asyncio.to_thread(stream.finish)


async def sentences(chunks: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Regroup streamed text into sentences, so TTS can start before the reply is complete."""
    buf = ""
    async for chunk in chunks:
        buf += chunk
        parts = _SENTENCE_END.split(buf)
        for done in parts[:-1]:
            if done.strip():
                yield done.strip()
        buf = parts[-1]
    if buf.strip():
        yield buf.strip()


@dataclass(eq=False)
class Turn:
    """One utterance and the reply to it. ``heard``: its words are in the history (or there were none, or STT lost
    them), so cancelling it loses nothing the user said. ``said``: its transcript was not empty. ``superseded``:
    the user went on talking before it was transcribed; its words are kept and the next turn answers both.
    ``apology_owed``: it failed while the user was talking again, so its apology was held back."""

    continues: Turn | None = None
    task: asyncio.Task[None] = field(init=False)
    heard: bool = False
    said: bool = False
    superseded: bool = False
    apology_owed: bool = False

    def lineage(self) -> Iterator[Turn]:
        """This turn, then the ones it continues, latest first."""
        turn: Turn | None = self
        while turn is not None:
            yield turn
            turn = turn.continues

    def owes_apology(self) -> bool:
        """This turn, or one it continues, failed and was not apologised for."""
        return any(turn.apology_owed for turn in self.lineage())

    def awaits_answer(self) -> bool:
        """This utterance, or one it continues, put words in the history (a cough after a question still gets the
        question answered)."""
        return any(turn.said for turn in self.lineage())


class Conversation:
    def __init__(
        self,
        session_id: str,
        backends: Backends,
        settings: VoiceSettings,
        transport: Transport,
        metrics: VoiceMetrics,
        history: History,
    ) -> None:
        self.session_id = session_id
        self.backends = backends
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.history = history
        self.vad = EndpointDetector(settings.vad_aggressiveness, settings.vad_silence_ms, settings.vad_min_speech_ms,
                                    max_speech_ms=int(settings.max_utterance_s * 1000))
        self._pending = b""
        self._preroll: deque[bytes] = deque(maxlen=_PREROLL_FRAMES)
        self._stt: STTStream | None = None
        self._last_voiced = 0.0
        self._turn: Turn | None = None
        self._chores: set[asyncio.Task[Any]] = set()
        self._played_until = 0.0  # when the client will have played the reply audio sent so far (perf_counter)
        self.speaking = False

    async def feed(self, pcm: bytes) -> None:
        """Accept PCM16 mono 16 kHz audio of any length; it is re-cut into 20 ms frames."""
        self._pending += pcm
        while len(self._pending) >= FRAME_BYTES:
            frame, self._pending = self._pending[:FRAME_BYTES], self._pending[FRAME_BYTES:]
            await self._frame(frame)

    async def _frame(self, frame: bytes) -> None:
        now = time.perf_counter()
        event = self.vad.process(frame)
        if event is VadEvent.SPEECH_START:
            self._last_voiced = now
            await self._on_speech_start()
        if self.vad.in_speech or event is VadEvent.SPEECH_END:
            if self._stt is not None:
                self._stt.feed(frame)  # the frame that started speech included
        else:
            self._preroll.append(frame)
        if event is None and self.vad.in_speech and self.vad.last_voiced:
            self._last_voiced = now
        if event is VadEvent.SPEECH_END:
            await self._on_speech_end(now)
        if self.vad.in_speech:
            await self._barge_in_if_due()

    def _replying(self) -> Turn | None:
        """The turn whose reply is under way (its words are in the history), if any."""
        turn = self._turn
        if turn is None or turn.task.done() or not turn.heard or turn.superseded:
            return None
        return turn

    async def _barge_in_if_due(self) -> None:
        """The user talks over a reply: stop it. While reply audio plays, only after ``barge_in_ms`` of speech (a
        short "mm-hm" or a cough does not cut the assistant off); before it plays, at once."""
        turn = self._replying()
        if turn is None or (self.speaking and self.vad.voiced_ms < self.settings.barge_in_ms):
            return
        await cancel_and_wait(turn.task)
        await self.transport.send_event({"type": "barge_in"})

    async def _on_speech_start(self) -> None:
        turn = self._turn
        if turn is not None and not turn.task.done() and not turn.heard:
            # The user goes on talking while the last utterance is still being transcribed: let it finish, and
            # answer both together (the next turn adds its words after these, then replies).
            turn.superseded = True
        self._stt = self.backends.stt.new_stream()
        for frame in self._preroll:
            self._stt.feed(frame)
        self._preroll.clear()
        await self.transport.send_event({"type": "speech_start"})

    async def _on_speech_end(self, now: float) -> None:
        stream, self._stt = self._stt, None
        if stream is None:
            return
        await self.transport.send_event({"type": "speech_end"})
        if self._replying() is not None:
            # Speech too short to barge in while the reply plays: not a turn of its own.
            chore = asyncio.create_task(_discard(stream))
            self._chores.add(chore)
            chore.add_done_callback(self._chores.discard)
            return
        vad_ms = (now - self._last_voiced) * 1000 + FRAME_MS
        last = self._turn
        # A superseded turn may be transcribed already (done), but its words still wait for this turn's reply.
        turn = Turn(continues=last if last is not None and (last.superseded or not last.task.done()) else None)
        turn.task = asyncio.create_task(self._run_turn(turn, stream, self._last_voiced - FRAME_MS / 1000, vad_ms))
        self._turn = turn

    async def _run_turn(self, turn: Turn, stream: STTStream, speech_ended: float, vad_ms: float) -> None:
        timings: dict[str, float] = {"vad_ms": round(vad_ms, 1)}
        reply: list[str] = []
        error: BackendError | None = None
        try:
            try:
                await self._hear(turn, stream, timings)
                if turn.superseded:
                    return  # answered with the next utterance
                if turn.awaits_answer():
                    await self._reply(speech_ended, timings, reply)
                elif turn.owes_apology():
                    # Nothing here to answer (a cough, say), and the question before it failed while the user was
                    # talking: apologise now rather than leave the user in silence.
                    await self._speak(APOLOGY, speech_ended, timings)
                else:
                    return  # nothing was heard
            except BackendError as exc:
                error = exc
                turn.heard = True  # nothing of it is left to lose: speech over the apology stops it
                turn.apology_owed = turn.superseded  # the next turn apologises if it has nothing to answer
                try:
                    await self._fail(exc, speech_ended, timings, apologise=not turn.superseded)
                except asyncio.CancelledError:
                    self.metrics.record_turn(timings, exc.stage)  # the apology was cut off; the turn still failed
                    raise
            self.metrics.record_turn(timings, error.stage if error else None)
            await self.transport.send_event(
                {"type": "reply_end", "timings": timings, "error": error.stage if error else None}
            )
        except Exception as exc:  # noqa: BLE001 - not a backend failure: sending to the client failed (it left)
            log.info("voice session %s: turn stopped, the client cannot be reached: %r",
                     shown_session_id(self.session_id), exc)
        finally:
            turn.heard = True
            if reply:
                self.history.add("assistant", " ".join(reply))
            self.speaking = False

    async def _hear(self, turn: Turn, stream: STTStream, timings: dict[str, float]) -> None:
        """Transcribe the utterance and add it to the history, after the words of the turn it continues."""
        t0 = time.perf_counter()
        try:
            text = await transcribe(stream, self.settings.stt_timeout_s)
        except TimeoutError:
            raise BackendError("stt", "timed out") from None
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes an evented apology
            raise BackendError("stt", f"{type(exc).__name__}: {exc}") from None
        finally:
            if turn.continues is not None:
                await asyncio.wait([turn.continues.task])  # its words go first (bounded by its own STT timeout)
        timings["stt_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        await self.transport.send_event({"type": "transcript", "text": text, "stt_ms": timings["stt_ms"]})
        if text.strip():
            self.history.add("user", text)
            turn.said = True
        turn.heard = True

    async def _reply(self, speech_ended: float, timings: dict[str, float], reply: list[str]) -> None:
        """Play the reply sentence by sentence while the next one is read from the LLM and synthesised."""
        ready: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        ahead = asyncio.create_task(self._synthesize_ahead(timings, ready))
        try:
            while (spoken := await ready.get()) is not None:
                ready.task_done()
                sentence, pcm = spoken
                reply.append(sentence)
                await self.transport.send_event({"type": "reply_text", "text": sentence})
                await self._play(pcm, speech_ended, timings)
            failure = await ahead
        finally:
            await cancel_and_wait(ahead)  # a barge-in stops the LLM stream and the synthesis ahead with the audio
        if failure is not None:
            raise failure
        if not reply:
            raise BackendError("llm", "empty reply")

    async def _synthesize_ahead(
        self, timings: dict[str, float], ready: asyncio.Queue[tuple[str, bytes] | None]
    ) -> BackendError | None:
        """Read the reply's sentences and synthesise each while the one before plays (not further ahead: a
        barge-in would waste the work); ``None`` on ``ready`` ends the reply. Returns the failure that ended it
        early, if any."""
        t_llm = time.perf_counter()
        tokens = self._tokens(timings, t_llm)
        try:
            # Closed here, not when collected: a cancelled reply must end its LLM stream at once.
            async with contextlib.aclosing(tokens), contextlib.aclosing(sentences(tokens)) as reading:
                async for sentence in reading:
                    if "llm_first_sentence_ms" not in timings:
                        timings["llm_first_sentence_ms"] = round((time.perf_counter() - t_llm) * 1000, 1)
                    ready.put_nowait((sentence, await self._synthesize(sentence, timings)))
                    await ready.join()  # until it starts playing
        except BackendError as exc:
            return exc
        finally:
            ready.put_nowait(None)
        return None

    async def _tokens(self, timings: dict[str, float], t0: float) -> AsyncGenerator[str, None]:
        """The LLM's reply stream, each read bounded by ``llm_timeout_s`` (the first token, then every next one).

        Only the LLM is timed: while the reader waits for a sentence to be synthesised or to start playing, the
        stream is not read, and that time is not the LLM's. Any failure of the stream becomes a
        ``BackendError("llm")``."""
        timeout = self.settings.llm_timeout_s
        stream = self.backends.llm.stream(self.settings.system_prompt, list(self.history.messages))
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    which = "first token" if "llm_first_token_ms" not in timings else "next token"
                    raise BackendError("llm", f"no {which} within {timeout}s") from None
                except BackendError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a broken stream is a backend failure, not a dead session
                    raise BackendError("llm", f"{type(exc).__name__}: {exc}") from None
                if "llm_first_token_ms" not in timings:
                    timings["llm_first_token_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _synthesize(self, text: str, timings: dict[str, float]) -> bytes:
        t0 = time.perf_counter()
        try:
            pcm = await self.backends.tts.synthesize(text)
        except Exception as exc:  # noqa: BLE001
            raise BackendError("tts", f"{type(exc).__name__}: {exc}") from None
        if "tts_first_ms" not in timings:
            timings["tts_first_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return pcm

    async def _speak(self, text: str, speech_ended: float | None, timings: dict[str, float]) -> None:
        await self._play(await self._synthesize(text, timings), speech_ended, timings)

    async def _play(self, pcm: bytes, speech_ended: float | None, timings: dict[str, float]) -> None:
        """Send audio at most ``_LEAD_MS`` ahead of the client's playback, so barge-in can stop what is not yet
        played. The client plays what it gets back to back, so the lead runs over the whole reply, not per
        sentence."""
        self.speaking = True
        chunk = SAMPLE_RATE * 2 * _CHUNK_MS // 1000
        for offset in range(0, len(pcm), chunk):
            part = pcm[offset : offset + chunk]
            ahead = self._played_until - time.perf_counter()
            if ahead > _LEAD_MS / 1000:
                await asyncio.sleep(ahead - _LEAD_MS / 1000)
            await self.transport.send_audio(part)
            self._played_until = max(self._played_until, time.perf_counter()) + len(part) / (SAMPLE_RATE * 2)
            if speech_ended is not None and "e2e_ms" not in timings:
                timings["e2e_ms"] = round((time.perf_counter() - speech_ended) * 1000, 1)
                await self.transport.send_event({"type": "first_audio", "e2e_ms": timings["e2e_ms"]})

    async def _fail(
        self, exc: BackendError, speech_ended: float, timings: dict[str, float], *, apologise: bool = True
    ) -> None:
        # The detail (a backend's HTTP body, an internal host name) goes to the log; the client learns the stage.
        log.warning("voice session %s: %s", shown_session_id(self.session_id), exc)
        message = _CLIENT_ERRORS.get(exc.stage, "this turn failed")
        await self.transport.send_event({"type": "error", "stage": exc.stage, "message": message})
        if apologise:  # not over a user who is already talking again
            with contextlib.suppress(BackendError):
                await self._speak(APOLOGY, speech_ended, timings)

    async def aclose(self) -> None:
        for turn in self._turn.lineage() if self._turn is not None else ():
            await cancel_and_wait(turn.task)
        if self._chores:
            await asyncio.wait(self._chores)
        if self._stt is not None:
            stream, self._stt = self._stt, None
            await _discard(stream)  # mid-utterance: nobody will hear it

"""LLM backends: OpenAI-compatible streaming chat completions (aiohttp) and AWS Bedrock ConverseStream (boto3)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

from worker.voice.errors import BackendError
from worker.voice.settings import VoiceSettings

Message = dict[str, str]  # {"role": "user"|"assistant", "content": ...}

#: Longest wait to open a connection to an OpenAI-compatible server (DNS, TCP, TLS): a dead host fails the turn
#: this soon rather than after aiohttp's 30 s or the whole LLM timeout.
OPENAI_CONNECT_TIMEOUT_S = 5.0


class LLM(Protocol):
    name: str

    def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        """Reply text as it is generated."""
        ...

    async def aclose(self) -> None: ...


class OpenAICompatLLM:
    """``POST {base_url}/chat/completions`` with ``stream: true`` (Ollama, vLLM, llama.cpp server, OpenAI)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256, *,
                 connect_timeout_s: float = OPENAI_CONNECT_TIMEOUT_S) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.connect_timeout_s = connect_timeout_s
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        """One pool for every session on the worker, without a cap on connections.

        A reply's stream stays open while its sentences are spoken, and each session has at most one, so the
        worker's sessions already bound the connections; aiohttp's default cap of 100 would make the 101st reply
        wait for another to finish speaking. Only connecting is timed here: reading is bounded per token by the
        pipeline (``llm_timeout_s``), and not while a sentence plays."""
        if self._http is None:
            t = self.connect_timeout_s
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=None),
            )
        return self._http

    async def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        http = self._session()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "stream": True,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": system}, *messages],
        }
        try:
            async with http.post(self.url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    raise BackendError("llm", f"HTTP {resp.status}: {(await resp.text())[:200]}")
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield str(text)
        except aiohttp.ClientError as exc:
            raise BackendError("llm", f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class BedrockLLM:
    """Bedrock ``converse_stream``; boto3 is blocking, so the event stream is read in a thread.

    The client has explicit timeouts and few retries (botocore's defaults: a 60 s read timeout and retries a
    waiting user would sit through). A turn that is cancelled (barge-in, the session ends) stops its reader
    thread: the thread checks a stop flag between events and closes the stream, which the cancelled side also
    closes to unblock a read in progress."""

    name = "bedrock"

    def __init__(
        self,
        model_id: str,
        region: str = "us-east-1",
        max_tokens: int = 256,
        client: Any = None,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 20.0,
        max_attempts: int = 2,
    ) -> None:
        self.model_id = model_id
        self.max_tokens = max_tokens
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"total_max_attempts": max_attempts, "mode": "standard"},
            )
            client = boto3.client("bedrock-runtime", region_name=region, config=config)
        self.client = client

    def _run(
        self,
        system: str,
        messages: list[Message],
        loop: asyncio.AbstractEventLoop,
        queue: Any,
        stop: threading.Event,
        opened: list[Any],
    ) -> None:
        def put(item: object) -> None:
            if not stop.is_set():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                    loop.call_soon_threadsafe(queue.put_nowait, item)

        events: Any = None
        try:
            if stop.is_set():
                return
            resp = self.client.converse_stream(
                modelId=self.model_id,
                system=[{"text": system}],
                messages=[{"role": m["role"], "content": [{"text": m["content"]}]} for m in messages],
                inferenceConfig={"maxTokens": self.max_tokens},
            )
            events = resp["stream"]
            opened.append(events)
            for event in events:
                if stop.is_set():
                    return
                text = event.get("contentBlockDelta", {}).get("delta", {}).get("text")
                if text:
                    put(str(text))
            put(None)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the session as a BackendError
            put(BackendError("llm", f"{type(exc).__name__}: {exc}"))
        finally:
            _close_quietly(events)

    async def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        queue: asyncio.Queue[str | BackendError | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        opened: list[Any] = []
        threading.Thread(target=self._run, args=(system, messages, loop, queue, stop, opened), daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BackendError):
                    raise item
                yield item
        finally:
            stop.set()  # the turn is over (done, failed or cancelled): the thread stops reading
            for events in opened:
                _close_quietly(events)  # unblocks a read in progress

    async def aclose(self) -> None:
        return None


def _close_quietly(events: Any) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):  # already closed, or being read right now (a generator)
            close()


class CannedLLM:
    """NOT a language model: streams one fixed reply, instantly. Calibration uses it when no LLM is configured,
    because calibration measures this host's STT/TTS capacity, not a model server elsewhere."""

    name = "canned"

    def __init__(self, reply: str = "Sure, here you are.") -> None:
        self.reply = reply

    async def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        for word in self.reply.split(" "):
            await asyncio.sleep(0)
            yield word + " "

    async def aclose(self) -> None:
        return None


def build_llm(settings: VoiceSettings) -> LLM:
    if settings.llm_backend == "canned":
        return CannedLLM()
    if settings.llm_backend == "bedrock":
        return BedrockLLM(
            settings.llm_model,
            settings.bedrock_region,
            settings.max_tokens,
            connect_timeout_s=settings.bedrock_connect_timeout_s,
            read_timeout_s=settings.llm_timeout_s,
            max_attempts=settings.bedrock_max_attempts,
        )
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
    return OpenAICompatLLM(settings.llm_base_url, settings.llm_model, api_key, settings.max_tokens)

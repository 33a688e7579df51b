"""LLM backends: OpenAI-compatible streaming chat completions (aiohttp) and AWS Bedrock ConverseStream (boto3)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

from worker.voice.errors import BackendError
from worker.voice.settings import VoiceSettings

Message = dict[str, str]  # {"role": "user"|"assistant", "content": ...}


class LLM(Protocol):
    name: str

    def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        """Reply text as it is generated."""
        ...

    async def aclose(self) -> None: ...


class OpenAICompatLLM:
    """``POST {base_url}/chat/completions`` with ``stream: true`` (Ollama, vLLM, llama.cpp server, OpenAI)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self._http: aiohttp.ClientSession | None = None

    async def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "stream": True,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": system}, *messages],
        }
        try:
            async with self._http.post(self.url, json=body, headers=headers) as resp:
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
    """Bedrock ``converse_stream``; boto3 is blocking, so the event stream is read in a thread."""

    name = "bedrock"

    def __init__(self, model_id: str, region: str = "us-east-1", max_tokens: int = 256, client: Any = None) -> None:
        self.model_id = model_id
        self.max_tokens = max_tokens
        if client is None:
            import boto3

            client = boto3.client("bedrock-runtime", region_name=region)
        self.client = client

    def _run(self, system: str, messages: list[Message], loop: asyncio.AbstractEventLoop, queue: Any) -> None:
        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            resp = self.client.converse_stream(
                modelId=self.model_id,
                system=[{"text": system}],
                messages=[{"role": m["role"], "content": [{"text": m["content"]}]} for m in messages],
                inferenceConfig={"maxTokens": self.max_tokens},
            )
            for event in resp["stream"]:
                text = event.get("contentBlockDelta", {}).get("delta", {}).get("text")
                if text:
                    put(str(text))
            put(None)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the session as a BackendError
            put(BackendError("llm", f"{type(exc).__name__}: {exc}"))

    async def stream(self, system: str, messages: list[Message]) -> AsyncIterator[str]:
        queue: asyncio.Queue[str | BackendError | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, args=(system, messages, loop, queue), daemon=True).start()
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BackendError):
                raise item
            yield item

    async def aclose(self) -> None:
        return None


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
        return BedrockLLM(settings.llm_model, settings.bedrock_region, settings.max_tokens)
    return OpenAICompatLLM(settings.llm_base_url, settings.llm_model, settings.llm_api_key, settings.max_tokens)

"""The hub's Redis client: every topology packs commands with hiredis, and what it packs round-trips intact."""

from __future__ import annotations

from typing import Any

import pytest

from hub import store as store_module
from hub.store import connect
from tests.conftest import hub_settings


async def test_commands_are_packed_by_hiredis_and_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[tuple[Any, ...]] = []
    original = store_module.HiredisRespSerializer.pack

    def counting(self: Any, *args: Any) -> Any:
        packed.append(args)
        return original(self, *args)

    monkeypatch.setattr(store_module.HiredisRespSerializer, "pack", counting)
    client = connect(hub_settings(redis_url), redis_url)
    try:
        await client.set("{t}:text", "héllo wörld ✓")
        await client.set("{t}:int", 42)
        await client.set("{t}:float", 2.5)
        pipe = client.pipeline(transaction=False)
        pipe.get("{t}:text")
        pipe.execute_command("EVAL", "return {ARGV[1], ARGV[2]}", 1, "{t}:k", "✓ argv", 7)
        text, evaluated = await pipe.execute()
        assert text == "héllo wörld ✓"
        assert evaluated == ["✓ argv", "7"]
        assert await client.get("{t}:int") == "42"
        assert float(await client.get("{t}:float")) == 2.5
    finally:
        await client.aclose()
    assert any(args[:1] == ("SET",) and args[1] == "{t}:text" for args in packed), "the C packer was bypassed"
    assert any(args[:1] == ("EVAL",) for args in packed), "pipelined commands were packed in Python"

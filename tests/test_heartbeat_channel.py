"""Heartbeats at fleet scale: the group commit that batches their Redis work, and the WebSocket channel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import redis

from hub.group_commit import GroupCommit
from hub.store import _with_board_fields
from shared import keys
from shared.auth import digest
from shared.models import MAX_HEARTBEAT_BYTES, MAX_STREAMS_PER_WORKER
from shared.redis_server import EmbeddedRedis
from tests.conftest import (
    ADMIN_AUTH,
    WORKER_AUTH,
    WORKER_TOKEN,
    RunningHub,
    registered_store,
    registration,
    sync_redis,
)

# --- the group commit, alone ----------------------------------------------------------------------------------


class Recorder:
    """A flush that records its batches; items that are exceptions come back as that item's error."""

    def __init__(self, delay_s: float = 0.01, fail: Exception | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(items)
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [item if isinstance(item, Exception) else item * 10 for item in items]


async def test_concurrent_callers_share_batches_and_each_gets_its_own_result() -> None:
    flush = Recorder()
    commit: GroupCommit[int, int] = GroupCommit(flush, name="test", max_batch=50)
    results = await asyncio.gather(*(commit.submit(i) for i in range(200)))
    assert results == [i * 10 for i in range(200)]
    assert len(flush.batches) < 20  # 200 callers, far fewer round trips
    assert max(len(b) for b in flush.batches) <= 50
    assert sorted(x for b in flush.batches for x in b) == list(range(200))  # each item sent exactly once


async def test_an_idle_caller_is_sent_at_once_without_waiting_for_company() -> None:
    flush = Recorder(delay_s=0)
    commit: GroupCommit[int, int] = GroupCommit(flush, name="test")
    assert await asyncio.wait_for(commit.submit(7), 0.5) == 70
    assert flush.batches == [[7]]


async def test_errors_reach_only_the_callers_they_belong_to() -> None:
    commit: GroupCommit[Any, Any] = GroupCommit(Recorder(), name="test")
    bad = ValueError("this one")
    results = await asyncio.gather(commit.submit(1), commit.submit(bad), commit.submit(3), return_exceptions=True)
    assert results == [10, bad, 30]

    failing = Recorder(fail=ConnectionError("redis is down"))
    commit = GroupCommit(failing, name="test")
    results = await asyncio.gather(*(commit.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    failing.fail = None  # the next batch goes through: a failed batch does not wedge the committer
    assert await commit.submit(4) == 40


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    commit: GroupCommit[int, int] = GroupCommit(Recorder(delay_s=0.05), name="test")
    first = asyncio.create_task(commit.submit(1))
    second = asyncio.create_task(commit.submit(2))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == 20
    with pytest.raises(asyncio.CancelledError):
        await first
    await commit.aclose()


# --- heartbeats through the store, on real Redis ----------------------------------------------------------------


async def test_a_burst_of_heartbeats_is_committed_in_few_round_trips(redis_url: str) -> None:
    store, secrets = await registered_store(redis_url, 50)
    batches: list[int] = []
    commit = store._commit_heartbeats

    async def counting(beats: list[Any]) -> Any:
        batches.append(len(beats))
        return await commit(beats)

    store._heartbeats._flush = counting  # type: ignore[assignment]
    try:
        beats = [store.heartbeat(wid, digest(secret), "ready", json.dumps({"cpu_percent": n}), [])
                 for n in range(4) for wid, secret in secrets.items()]
        beats.append(store.heartbeat("w-000", digest("not-its-secret"), "ready", "{}", []))
        beats.append(store.heartbeat("w-nobody", digest("x"), "ready", "{}", []))
        outcomes = await asyncio.gather(*beats)
    finally:
        await store.close()
    assert [o.status for o in outcomes] == [1] * 200 + [-1, 0]  # each caller its own answer
    assert sum(batches) == 202 and len(batches) < 50
    r = sync_redis(redis_url, decode_responses=True)
    board = r.hgetall(keys.BOARD.status)
    assert len(board) == 50 and all(json.loads(v)["cpu_percent"] == 3 for v in board.values())


async def test_heartbeats_survive_redis_losing_its_scripts(redis_url: str) -> None:
    store, secrets = await registered_store(redis_url, 3)
    try:
        r = sync_redis(redis_url)
        r.script_flush()  # what a restart or a failover to a fresh replica does
        outcomes = await asyncio.gather(*(store.heartbeat(w, digest(s), "ready", "{}", []) for w, s in secrets.items()))
        assert [o.status for o in outcomes] == [1, 1, 1]
    finally:
        await store.close()


async def test_a_late_board_write_cannot_bring_back_a_deregistered_worker(redis_url: str) -> None:
    store, secrets = await registered_store(redis_url, 2)
    try:
        assert await store.deregister("w-000", secrets["w-000"]) == 1
        # A batch whose HEARTBEAT scripts ran just before the deregistration writes the board just after it.
        batch = ["w-000", "{}", 0, "", "w-001", "{}", 0, ""]
        skipped = await store._publish_batch(keys=keys.BOARD.as_list(), args=batch)
        assert skipped == ["w-000"]
        assert set(sync_redis(redis_url, decode_responses=True).hkeys(keys.BOARD.status)) == {"w-001"}
    finally:
        await store.close()


async def test_a_worker_the_board_lost_is_told_to_register_again(redis_url: str) -> None:
    """Its keys survived but its registration view on the board did not (a failover can lose a write): heartbeats
    alone would keep it live and unseen by routing for good."""
    store, secrets = await registered_store(redis_url, 2)
    try:
        sync_redis(redis_url).hdel(keys.BOARD.static, "w-000")
        beats = (store.heartbeat(w, digest(s), "ready", "{}", []) for w, s in secrets.items())
        lost, kept = await asyncio.gather(*beats)
        assert (lost.status, kept.status) == (0, 1)
    finally:
        await store.close()


async def test_heartbeats_are_answered_when_only_the_board_write_fails(redis_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeats' scripts ran; their answers (sessions to stop among them) must not be lost to a failed hint."""
    store, secrets = await registered_store(redis_url, 1)
    try:
        async def board_down(*args: Any, **kwargs: Any) -> None:
            raise redis.exceptions.ConnectionError("Connection reset by peer")

        monkeypatch.setattr(store, "_publish_batch", board_down)
        outcome = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", ["w-000~notheldhere1"])
        assert outcome.status == 1 and outcome.unknown_sessions == ("w-000~notheldhere1",)
    finally:
        await store.close()


# --- the WebSocket channel ----------------------------------------------------------------------------------------


async def open_channel(http: aiohttp.ClientSession, hub: RunningHub, worker_id: str, secret: str,
                       token: str = WORKER_TOKEN) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"{hub.url}/api/v1/workers/{worker_id}/heartbeat",
                                 headers={"Authorization": f"Bearer {token}", "X-Worker-Secret": secret})


async def register_over_http(hub: RunningHub, worker_id: str, **extra: Any) -> str:
    async with hub.client() as client:
        resp = await client.post("/api/v1/workers", json=registration(worker_id, "http://127.0.0.1:1/w", **extra),
                                 headers=WORKER_AUTH)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["worker_secret"])


async def test_the_channel_answers_each_heartbeat_like_the_post_does(make_running_hub: Any) -> None:
    hub = await make_running_hub()
    secret = await register_over_http(hub, "w-ws")
    async with aiohttp.ClientSession() as http:
        ws = await open_channel(http, hub, "w-ws", secret)
        await ws.send_json({"active_sessions": ["w-ws~ghost"], "gpu_utilization": 40})
        reply = await asyncio.wait_for(ws.receive_json(), 5)
        assert reply["worker_id"] == "w-ws" and reply["state"] == "ready" and reply["max_streams"] == 5
        assert reply["stop_sessions"] == ["w-ws~ghost"]  # same reconciliation as the POST

        async with hub.client() as client:  # an SRE drain reaches the worker on its next heartbeat
            assert (await client.post("/api/v1/workers/w-ws/drain", headers=ADMIN_AUTH)).status_code == 200
            await ws.send_json({})
            assert (await asyncio.wait_for(ws.receive_json(), 5))["state"] == "draining"
            view = (await client.get("/api/v1/workers/w-ws", headers=ADMIN_AUTH)).json()
            assert view["alive"] and view["gpu_utilization"] == 0.0  # the latest heartbeat's figures
        await ws.close()


async def test_a_heartbeat_without_ack_is_answered_only_with_news(make_running_hub: Any) -> None:
    hub = await make_running_hub()
    secret = await register_over_http(hub, "w-quiet")
    async with aiohttp.ClientSession() as http, hub.client() as client:
        ws = await open_channel(http, hub, "w-quiet", secret)
        for n in range(3):  # nothing new: recorded, not answered
            await ws.send_json({"ack": False, "gpu_utilization": 10 + n})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.receive_json(), 0.5)
        view = (await client.get("/api/v1/workers/w-quiet", headers=ADMIN_AUTH)).json()
        assert view["alive"] and view["gpu_utilization"] == 12.0  # every one of them was recorded

        await ws.send_json({"ack": False, "active_sessions": ["w-quiet~ghost"]})  # news: a session to stop
        assert (await asyncio.wait_for(ws.receive_json(), 5))["stop_sessions"] == ["w-quiet~ghost"]
        assert (await client.post("/api/v1/workers/w-quiet/drain", headers=ADMIN_AUTH)).status_code == 200
        await ws.send_json({"ack": False})  # news: the hub holds another state than the one reported
        assert (await asyncio.wait_for(ws.receive_json(), 5))["state"] == "draining"
        await ws.send_json({"ack": False, "state": "draining"})  # the worker applied it: nothing new any more
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.receive_json(), 0.5)
        await ws.send_json({"ack": True, "state": "draining"})
        assert (await asyncio.wait_for(ws.receive_json(), 5))["state"] == "draining"
        await ws.close()


@pytest.mark.parametrize("token, secret", [("wrong-token", "s"), (WORKER_TOKEN, ""), ("", "s")])
async def test_a_handshake_without_the_credentials_is_refused(make_running_hub: Any, token: str,
                                                              secret: str) -> None:
    hub = await make_running_hub()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await open_channel(http, hub, "w-any", secret, token=token)
        assert refused.value.status == 403


async def close_code_after(hub: RunningHub, worker_id: str, secret: str, message: str | bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        ws = await open_channel(http, hub, worker_id, secret)
        await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type == aiohttp.WSMsgType.CLOSE, closing
        return int(closing.data), str(closing.extra)


async def test_bad_messages_close_the_channel_with_a_clear_code(make_running_hub: Any) -> None:
    hub = await make_running_hub()
    secret = await register_over_http(hub, "w-ws")
    assert await close_code_after(hub, "w-ws", "not-its-secret", "{}") == (
        4403, "the X-Worker-Secret does not match this worker")
    assert (await close_code_after(hub, "w-nobody", secret, "{}"))[0] == 4404
    code, reason = await close_code_after(hub, "w-ws", secret, '{"cpu_percent": "lots"}')
    assert code == 1007 and "cpu_percent" in reason
    assert (await close_code_after(hub, "w-ws", secret, "{not json"))[0] == 1007
    # The reason names the field; a long non-ASCII one is cut to the 123 bytes a close frame allows, not sent whole.
    code, reason = await close_code_after(hub, "w-ws", secret, '{"' + "é" * 60 + '": 1}')
    assert code == 1007 and reason.startswith("invalid heartbeat") and len(reason.encode()) <= 123
    assert (await close_code_after(hub, "w-ws", secret, b"\x00\x01"))[0] == 1003
    assert await close_code_after(hub, "w-ws", secret, "[" * (MAX_HEARTBEAT_BYTES + 1)) == (
        1009, f"a heartbeat is at most {MAX_HEARTBEAT_BYTES} bytes")  # the hub's reason, not the server's cut
    async with hub.client() as client:  # nothing above changed the worker
        view = (await client.get("/api/v1/workers/w-ws", headers=ADMIN_AUTH)).json()
        assert view["alive"] and view["state"] == "ready"


@pytest.mark.standalone_redis
async def test_redis_down_is_an_error_message_and_the_channel_stays_open(
    make_running_hub: Any, redis_server: EmbeddedRedis
) -> None:
    hub = await make_running_hub()
    secret = await register_over_http(hub, "w-ws")
    async with aiohttp.ClientSession() as http:
        ws = await open_channel(http, hub, "w-ws", secret)
        redis_server.stop()
        try:
            await ws.send_json({})
            error = await asyncio.wait_for(ws.receive_json(), 10)
            assert error["error"] == "store_unavailable"
        finally:
            redis_server.start()
        # Same channel, Redis back but empty (no persistence): the hub tells the worker to register again.
        await ws.send_json({})
        closing = await asyncio.wait_for(ws.receive(), 10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4404


@pytest.mark.parametrize("figures", ['{}', '{"gpu_utilization":41.5,"latency_ms":12.0}',
                                     ' {"note":"a \\"quoted\\" }"} '])
@pytest.mark.parametrize(("state", "drain"), [("ready", False), ("draining", True), ('odd"state', False)])
def test_a_heartbeats_board_view_is_its_figures_plus_the_boards_fields(figures: str, state: str, drain: bool) -> None:
    view = json.loads(_with_board_fields(figures, 1234, state, drain))
    assert view == {**json.loads(figures), "hb": 1234, "state": state, "drain": drain}


async def test_a_full_worker_with_the_longest_ids_can_heartbeat_by_post_and_channel(make_running_hub: Any) -> None:
    """Regression: 1,024 sessions of a worker with a 45-character id made a 66 KB heartbeat, over the 64 KiB bound
    on request bodies and channel messages: 413 and 1009, retried for ever while its leases lapsed."""
    hub = await make_running_hub()
    worker_id = "w" * 64
    secret = await register_over_http(hub, worker_id, max_streams=MAX_STREAMS_PER_WORKER)
    sessions = [f"{worker_id}~{n:064d}" for n in range(MAX_STREAMS_PER_WORKER)]  # the longest ids there can be
    beat = {"active_sessions": sessions, "gpu_utilization": 99.5, "latency_ms": 1234.5, "seq": 2**53}
    assert len(json.dumps(beat)) > 130_000
    async with hub.client() as client:
        resp = await client.post(f"/api/v1/workers/{worker_id}/heartbeat", json=beat,
                                 headers={**WORKER_AUTH, "X-Worker-Secret": secret})
        assert resp.status_code == 200, resp.text[:200]
        assert len(resp.json()["stop_sessions"]) == MAX_STREAMS_PER_WORKER  # the hub holds none of them
    async with aiohttp.ClientSession() as http:
        ws = await open_channel(http, hub, worker_id, secret)
        await ws.send_str(json.dumps(beat))
        reply = await asyncio.wait_for(ws.receive(), 5)
        assert reply.type == aiohttp.WSMsgType.TEXT, (reply.type, reply.data, reply.extra)
        assert len(json.loads(reply.data)["stop_sessions"]) == MAX_STREAMS_PER_WORKER
        await ws.close()

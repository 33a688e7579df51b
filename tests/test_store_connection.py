"""The hub's Redis client: every topology packs commands with hiredis, and what it packs round-trips intact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import uvloop
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError, SlotNotCoveredError

from hub import redis_client
from hub.group_commit import GroupCommit
from hub.redis_client import connect
from hub.store import FleetStore
from shared import keys
from shared.auth import digest
from shared.errors import StoreUnavailable
from tests.conftest import hub_settings, sync_redis, wait_for


async def test_commands_are_packed_by_hiredis_and_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[tuple[Any, ...]] = []
    original = redis_client.HiredisRespSerializer.pack

    def counting(self: Any, *args: Any) -> Any:
        packed.append(args)
        return original(self, *args)

    monkeypatch.setattr(redis_client.HiredisRespSerializer, "pack", counting)
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


#: Worker w-1's registration fields and routing board view, as the registry builds them.
_W1 = ({"url": "http://127.0.0.1:1", "region": "us-east-1", "max_streams": "2"},
       json.dumps({"worker_id": "w-1", "url": "http://127.0.0.1:1", "region": "us-east-1", "lat": 0, "lon": 0,
                   "max_streams": 2}))


class _SlowReplyProxy:
    """A TCP proxy in front of Redis that, when armed, holds the next reply past the client's socket timeout: the
    command has run, its reply comes late, and redis-py's retry sends it again on a new connection."""

    def __init__(self, upstream_port: int, hold_s: float) -> None:
        self.upstream_port, self.hold_s = upstream_port, hold_s
        self.armed = False
        self.held = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> _SlowReplyProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for pipe in (self._pipe(client_r, up_w, replies=False), self._pipe(up_r, client_w, replies=True)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if replies and self.armed:
                    self.armed = False
                    self.held += 1
                    await asyncio.sleep(self.hold_s)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


@pytest.mark.standalone_redis
async def test_a_script_resent_after_a_late_reply_does_no_harm(redis_url: str) -> None:
    """Registering, reserving, confirming and claiming are each safe to run twice: redis-py resends a command
    whose reply timed out, though Redis already ran it."""
    proxy = await _SlowReplyProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]), hold_s=0.7).start()
    settings = hub_settings(f"redis://127.0.0.1:{proxy.port}", redis_timeout_s=0.5)
    store = FleetStore(connect(settings, settings.redis_url or ""), settings)
    try:
        assert await store.register("w-1", None, "secret-a", *_W1) is not None
        await store.reserve("w-1", "w-1~warmupwarmup", {})  # scripts loaded: the resend is of EVALSHA itself
        await store.release("w-1", "w-1~warmupwarmup")
        await store.compare_and_set_claim("warm", None, "x", 1)

        proxy.armed = True  # a worker restarts and registers again with its secret
        assert await store.register("w-1", "secret-a", "secret-b", *_W1) is not None, "no 409"
        proxy.armed = True
        reservation = await store.reserve("w-1", "w-1~resentreserve", {"worker_id": "w-1"})
        assert reservation.ok and reservation.used == 1, "the resend found its own lease"
        await store.confirm("w-1", "w-1~warmupwarmup")  # loads the script
        proxy.armed = True
        assert await store.confirm("w-1", "w-1~resentreserve", 3), "the resend found its own confirmation"
        proxy.armed = True
        swapped, _ = await store.compare_and_set_claim("conv-1", None, "pending:mine", 10)
        assert swapped, "the resend found its own claim"
        beat = await store.heartbeat("w-1", digest("secret-b"), "ready", "{}", ["w-1~resentreserve"])
        assert beat.status == 1 and beat.used == 1
        proxy.armed = True
        released = await store.release("w-1", "w-1~resentreserve")
        assert released.held and released.record == {"worker_id": "w-1"}, "the resend found its own release"
        assert released.used == 0 and released.worker_url == "http://127.0.0.1:1"
        await store.take_token("client-1", 10, 0.001)  # loads the script
        proxy.armed = True
        assert await store.take_token("client-1", 10, 0.001) == 0.0
        tokens = float(await store.redis.hget(keys.rate_limit_bucket("client-1"), "tokens"))
        assert 7.9 < tokens < 8.1, f"the resend took a second token ({tokens} of 10 left after two requests)"
        assert proxy.held == 6, "each step's first reply was held past the timeout"
        again = await store.release("w-1", "w-1~resentreserve")
        assert not again.held and again.record is None, "another call's release finds nothing held"
    finally:
        await store.close()
        await proxy.close()


class _FreezableProxy(_SlowReplyProxy):
    """A TCP proxy in front of Redis that, while frozen, holds every reply (a Redis process stopped by SIGSTOP:
    the kernel still accepts connections and takes commands, and nothing answers)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port, hold_s=0)
        self.thawed = asyncio.Event()
        self.thawed.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if replies:
                    await self.thawed.wait()
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def _store_behind_a_proxy(redis_url: str, timeout_s: float) -> AsyncIterator[tuple[_FreezableProxy, FleetStore]]:
    """A store whose Redis (``redis_url``'s) can be frozen through the proxy; on exit it thaws, then closes both."""
    proxy = await _FreezableProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    settings = hub_settings(f"redis://127.0.0.1:{proxy.port}", redis_timeout_s=timeout_s)
    store = FleetStore(connect(settings, settings.redis_url or ""), settings)
    try:
        yield proxy, store
    finally:
        proxy.thawed.set()
        await store.close()
        await proxy.close()


@pytest.mark.standalone_redis
async def test_a_frozen_store_is_a_503_within_three_timeouts_not_nine(redis_url: str) -> None:
    """redis_timeout_s bounds each attempt and a step makes three, so a stopped Redis is a prompt 503. A connection
    health check (retried inside every attempt) once made it 3 x 3 timeouts, and the ALB's health check gave up
    on /ready first."""
    timeout_s = 0.3
    loop = asyncio.get_running_loop()
    async with _store_behind_a_proxy(redis_url, timeout_s) as (proxy, store):
        assert await store.register("w-1", None, "secret-a", *_W1) is not None
        assert await store.ping()
        proxy.thawed.clear()

        async def timed(step: Callable[[], Awaitable[Any]]) -> float:
            started = loop.time()
            with pytest.raises(StoreUnavailable):
                await step()
            return loop.time() - started

        # Concurrent, as requests are: all but one need a connection opened while Redis is frozen.
        took = await asyncio.gather(timed(store.ping), timed(lambda: store.reserve("w-1", "w-1~frozenstore1", {})),
                                    timed(lambda: store.read_board(None)), timed(store.ping))
        assert max(took) < 3 * timeout_s + 0.4, f"steps against a frozen store took {took} s"
        proxy.thawed.set()
        assert await store.ping(), "the store serves again once Redis does"


_LOOPS: dict[str, Callable[[Any], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", sorted(_LOOPS))
@pytest.mark.parametrize("closed", ["closed", "closing"])
def test_a_connection_closed_beneath_a_command_is_retried_not_a_500(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, loop: str, closed: str
) -> None:
    """redis-py's cluster client closes every node's connections when one command meets CLUSTERDOWN, MOVED
    re-initialisation or a pipeline's connection error, so during a master's failover other requests' commands were
    mid-send on connections closed beneath them. redis-py raised AttributeError (its writer gone) or, on uvloop as
    the hub runs, RuntimeError (the transport's handle closed): 500s. Here the close lands at that moment."""
    settings = hub_settings(redis_url)
    original = AbstractConnection._send_packed_command
    armed = {"left": 0}

    async def closed_beneath(self: AbstractConnection, command: Any) -> None:
        if armed["left"]:
            armed["left"] -= 1
            if closed == "closed":
                await self.disconnect(nowait=True)  # another coroutine's aclose() finished: no writer left
            elif self._writer is not None:
                self._writer.transport.close()  # ... or is under way: the transport closed, the writer still set
                await asyncio.sleep(0.01)
        await original(self, command)

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", closed_beneath)

    async def scenario() -> None:
        store = FleetStore(connect(settings, redis_url), settings)
        try:
            assert await store.register("w-1", None, "secret-a", *_W1) is not None
            await store.ping()
            armed["left"] = 1
            assert await store.ping(), "a plain command is sent again"
            armed["left"] = 1
            reservation = await store.reserve("w-1", "w-1~closedbeneath", {})  # a pipelined script
            assert reservation.ok and reservation.used == 1, reservation
            assert armed["left"] == 0, "the close never landed"
        finally:
            await store.close()

    _LOOPS[loop](scenario())


async def test_a_step_waits_for_a_busy_connection_slot_at_most_the_pool_wait_then_is_a_503(redis_url: str) -> None:
    """Steps queue for one of redis_max_connections slots: a queued step takes a slot as soon as one is freed, and a
    step that finds none free within redis_pool_wait_s is a clean 503, never a hang or a bare TimeoutError."""
    settings = hub_settings(redis_url, redis_max_connections=1, redis_pool_wait_s=1.0)
    store = FleetStore(connect(settings, redis_url), settings)
    held, done = asyncio.Event(), asyncio.Event()

    async def hold_the_only_slot() -> None:
        async with store._call():
            held.set()
            await done.wait()

    holder = asyncio.create_task(hold_the_only_slot())
    try:
        await held.wait()
        with pytest.raises(StoreUnavailable, match="busy"):
            async with asyncio.timeout(20):  # far past the pool wait: only an unbounded wait gets here
                await store.ping()
        queued = asyncio.create_task(store.ping())
        await asyncio.sleep(0)  # it is waiting for the slot
        done.set()
        await holder
        assert await queued, "the step queued for the slot took it when it was freed"
        assert await store.ping(), "and gave it back"
    finally:
        done.set()
        await holder
        await store.close()


@pytest.mark.standalone_redis
async def test_a_store_out_of_memory_is_a_clean_503_for_every_step_and_frees_its_slots(redis_url: str) -> None:
    """A Redis at maxmemory refuses a script's writes with an error reply inside "Error running script": that is
    the store unable to serve (a 503 and a retry), not a hub bug (a 500), for single and pipelined steps alike."""
    settings = hub_settings(redis_url, redis_max_connections=1, redis_pool_wait_s=1.0)
    store = FleetStore(connect(settings, redis_url), settings)
    admin = sync_redis(redis_url)
    try:
        assert await store.register("w-1", None, "secret-a", *_W1) is not None
        assert (await store.reserve("w-1", "w-1~beforeoom01", {})).ok
        admin.config_set("maxmemory", 1)
        try:
            for step in (lambda: store.reserve("w-1", "w-1~duringoom1", {}),
                         lambda: store.heartbeat("w-1", digest("secret-a"), "ready", "{}", ["w-1~beforeoom01"]),
                         lambda: store.register("w-1", "secret-a", "secret-b", *_W1)):
                with pytest.raises(StoreUnavailable):
                    await step()
        finally:
            admin.config_set("maxmemory", 0)
        reservation = await store.reserve("w-1", "w-1~afteroom01", {})  # the one slot was given back each time
        assert reservation.ok and reservation.used == 2, reservation
    finally:
        await store.close()


def _sending(commit: GroupCommit[Any, Any]) -> bool:
    """Whether ``commit`` has taken everything queued and is waiting for Redis to answer."""
    return commit._flusher is not None and not commit._flusher.done() and not commit._queue


@pytest.mark.standalone_redis
async def test_closing_the_store_cancels_the_steps_on_the_wire_and_those_queued_behind_them(redis_url: str) -> None:
    """Shutdown does not wait out a frozen Redis (three timeouts) nor leave a request hanging: a step whose pipeline
    is on the wire and a step queued behind it are both cancelled, and nothing is left running."""
    steps: list[asyncio.Task[Any]] = []
    async with _store_behind_a_proxy(redis_url, 5) as (proxy, store):
        try:
            assert await store.register("w-1", None, "secret-a", *_W1) is not None
            assert (await store.reserve("w-1", "w-1~warmupwarmup", {})).ok
            proxy.thawed.clear()
            steps.append(asyncio.create_task(store.reserve("w-1", "w-1~onthewire01", {})))
            steps.append(asyncio.create_task(store.heartbeat("w-1", digest("secret-a"), "ready", "{}", [])))
            await wait_for(lambda: _sending(store._steps) and _sending(store._heartbeats), 10, "both batches sent")
            steps.append(asyncio.create_task(store.reserve("w-1", "w-1~queuedbehind", {})))
            await wait_for(lambda: bool(store._steps._queue), 10, "a step queued behind the batch on the wire")
            async with asyncio.timeout(10):  # at once; 3 attempts of 5 s would be 15 s
                await store.close()
            done, _ = await asyncio.wait(steps, timeout=10)
            assert done == set(steps) and all(step.cancelled() for step in steps), steps
            assert store._steps._flusher is not None and store._steps._flusher.done()
            assert store._heartbeats._flusher is not None and store._heartbeats._flusher.done()
        finally:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)


@pytest.mark.standalone_redis
@pytest.mark.parametrize("outcome", ["answered", "store_unavailable"])
async def test_a_request_cancelled_while_its_batch_is_on_the_wire_stalls_no_other_request(
    redis_url: str, outcome: str
) -> None:
    """A client that hangs up cancels its request; the other requests of its batch, and those queued behind it, still
    get their answers (or a clean 503 when the store does not answer at all), whichever way the batch ends."""
    steps: list[asyncio.Task[Any]] = []
    async with _store_behind_a_proxy(redis_url, 0.3) as (proxy, store):
        try:
            assert await store.register("w-1", None, "secret-a", *_W1) is not None
            assert (await store.reserve("w-1", "w-1~warmupwarmup", {})).ok
            assert (await store.release("w-1", "w-1~warmupwarmup")).held  # w-1's two slots are free
            proxy.thawed.clear()
            hung_up = asyncio.create_task(store.reserve("w-1", "w-1~clienthungup", {}))
            same_batch = asyncio.create_task(store.reserve("w-1", "w-1~samebatch01", {}))
            steps += [hung_up, same_batch]
            await wait_for(lambda: _sending(store._steps), 10, "the batch sent")
            behind = asyncio.create_task(store.reserve("w-1", "w-1~queuedbehind", {}))
            steps.append(behind)
            await wait_for(lambda: bool(store._steps._queue), 10, "a step queued behind the batch on the wire")
            hung_up.cancel()
            if outcome == "answered":
                proxy.thawed.set()
            done, _ = await asyncio.wait([same_batch, behind], timeout=20)  # at most 2 x 3 timeouts of 0.3 s
            assert done == {same_batch, behind}, "a request stalled behind a cancelled one"
            if outcome == "answered":  # the hung-up request's reservation ran all the same, and holds a slot
                assert same_batch.result().ok and behind.result().reason == "full", (same_batch, behind)
            else:
                assert all(isinstance(step.exception(), StoreUnavailable) for step in (same_batch, behind)), steps
        finally:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)


async def test_a_store_that_never_accepts_the_connection_is_a_503_within_three_timeouts() -> None:
    """A Redis host gone dark (its SYNs unanswered, as a full accept queue makes them here) is a prompt 503: opening
    a connection is bounded like each command, not left to the kernel's two minutes of SYN retries."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        host, port = listener.getsockname()
        with socket.create_connection((host, port)):  # fills the accept queue: later SYNs are dropped
            timeout_s = 0.3
            settings = hub_settings(f"redis://{host}:{port}", redis_timeout_s=timeout_s)
            store = FleetStore(connect(settings, settings.redis_url or ""), settings)
            loop = asyncio.get_running_loop()
            try:
                started = loop.time()
                with pytest.raises(StoreUnavailable):
                    async with asyncio.timeout(30):  # only an unbounded connect gets here
                        await store.ping()
                took = loop.time() - started
                assert took < 3 * timeout_s + 2, f"a dark host took {took} s to be a 503"
            finally:
                await store.close()


@pytest.mark.parametrize(("error", "cannot_serve"), [
    (RedisConnectionError("Connection refused"), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (SlotNotCoveredError("Command # 1 (EVALSHA ...) of pipeline caused error: slot 866 is not covered"), True),
    (RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node"), True),
    (RedisClusterException("startup_nodes could not agree on a valid slots cache"), True),
    (RedisClusterException("Keys in request don't hash to the same slot"), False),
    (ResponseError("OOM command not allowed when used memory > 'maxmemory'."), True),
    (ResponseError("Error running script (call to f_0a1b): @user_script:12: -READONLY You can't write against a "
                   "read only replica. "), True),
    (ResponseError("Error running script (call to f_0a1b): @user_script:12: -OOM command not allowed when used "
                   "memory > 'maxmemory'. "), True),
    (ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."), True),
    (ResponseError("ERR wrong number of arguments for 'hset' command"), False),
    (ResponseError("Error running script (call to f_0a1b): @user_script:3: user_script:3: attempt to compare nil "
                   "with number"), False),
    (KeyError("url"), False),
], ids=lambda value: value if isinstance(value, bool) else str(value)[:40])
def test_an_error_is_a_503_only_when_it_says_the_store_cannot_serve_now(error: Exception, cannot_serve: bool) -> None:
    """A store that cannot serve right now is a 503 and a retry; a call that is wrong is a bug, a 500 with a
    traceback in the log. The two must never be mixed up."""
    assert redis_client.store_cannot_serve(error) is cannot_serve


async def test_a_caller_outside_the_request_slots_gets_a_connection_while_every_slot_is_in_use(redis_url: str) -> None:
    """The CloudWatch publisher uses the client outside ``FleetStore._call``: the pool keeps connections beyond the
    request slots for it, so it still publishes while requests hold every slot (on a cluster, every node's pool)."""
    settings = hub_settings(redis_url, redis_max_connections=1, redis_timeout_s=5)
    store = FleetStore(connect(settings, redis_url), settings)
    admin = sync_redis(redis_url, decode_responses=True)

    def blocked_clients() -> int:
        if isinstance(admin, redis.RedisCluster):  # one view per node
            views = admin.info("clients", target_nodes=redis.RedisCluster.ALL_NODES).values()
            return sum(int(view["blocked_clients"]) for view in views)
        return int(admin.info("clients")["blocked_clients"])

    async def a_request_holding_the_slot() -> None:
        async with store._call():
            await store.redis.blpop(["{gauges}:nothing"], timeout=2)  # its connection busy a while

    request = asyncio.create_task(a_request_holding_the_slot())
    try:
        await wait_for(lambda: blocked_clients() == 1, 10, "the request's connection blocked")
        await store.redis.set("{gauges}:published", "1")  # the publisher's write, to the same node
        assert await store.redis.get("{gauges}:published") == "1"
    finally:
        await asyncio.gather(request, return_exceptions=True)
        await store.close()


async def test_closing_the_client_closes_every_connection_it_opened(redis_url: str) -> None:
    """A hub that shut down kept its standalone pool's sockets open until garbage collection: the client did not own
    the pool it was given. Over a test run (hundreds of hubs in one process) they used up the descriptor limit."""
    import os

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = descriptors()
    client = connect(hub_settings(redis_url), redis_url)
    await asyncio.gather(*(client.set(f"{{t}}:k{i}", i) for i in range(8)))  # several connections at once
    assert descriptors() > before
    await client.aclose()
    assert descriptors() == before

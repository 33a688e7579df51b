"""Each hub's mirror of the routing board: after any mix of changes, a delta refresh sees exactly what a full read
sees, and a delta carries only what changed."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx

from hub.board import RoutingBoard
from hub.scoring import Weights
from hub.store import BoardRead
from shared import keys
from shared.models import Policy
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, flush, heartbeat, register, registration, sync_redis


def mirror(board: RoutingBoard) -> dict[str, tuple[Any, ...]]:
    """What routing depends on, per worker."""
    return {wid: (e.url, e.region, e.lat, e.lon, e.max_streams, e.used, e.state, e.heartbeat_ms, e.latency_ms,
                  e.gpu_utilization) for wid, e in board.entries.items()}


async def fresh_board(make_hub: Any) -> RoutingBoard:
    other = await make_hub()
    board: RoutingBoard = other.app.state.hub.board
    await board.refresh()
    return board


async def test_delta_refreshes_match_a_full_read_through_churn(make_hub: Any, make_worker: Any) -> None:
    hub: httpx.AsyncClient = await make_hub()
    board: RoutingBoard = hub.app.state.hub.board  # type: ignore[attr-defined]
    rng = random.Random(7)
    workers = [await make_worker(max_streams=3) for _ in range(4)]
    secrets = {f"w-{i}": (await register(hub, f"w-{i}", w))["worker_secret"] for i, w in enumerate(workers)}
    await board.refresh()
    assert mirror(board) == mirror(await fresh_board(make_hub))

    placed: list[str] = []
    for step in range(12):
        action = step % 4
        if action == 0:  # heartbeats with new figures
            for wid, secret in secrets.items():
                await heartbeat(hub, wid, secret, [], gpu_utilization=rng.uniform(0, 100),
                                latency_ms=rng.uniform(1, 90))
        elif action == 1:  # sessions start and end: used changes
            resp = await hub.post("/api/v1/sessions", json={})
            if resp.status_code == 201:
                placed.append(resp.json()["session_id"])
            if len(placed) > 2:
                ended = await hub.delete(f"/api/v1/sessions/{placed.pop(0)}")
                assert ended.status_code in (204, 404)  # 404: its worker has left meanwhile
        elif action == 2:  # a worker leaves, another joins
            gone = sorted(secrets)[0]
            resp = await hub.delete(f"/api/v1/workers/{gone}",
                                    headers={**WORKER_AUTH, "X-Worker-Secret": secrets.pop(gone)})
            assert resp.status_code == 204
            wid = f"w-new-{step}"
            secrets[wid] = (await register(hub, wid, await make_worker(max_streams=2)))["worker_secret"]
        else:  # a worker re-registers with a new registration view (more streams)
            wid = sorted(secrets)[-1]
            body = registration(wid, "http://127.0.0.1:1/moved", max_streams=9)
            resp = await hub.post("/api/v1/workers", json=body,
                                  headers={**WORKER_AUTH, "X-Worker-Secret": secrets[wid]})
            assert resp.status_code == 200, resp.text
            secrets[wid] = resp.json()["worker_secret"]
            await heartbeat(hub, wid, secrets[wid], [])
        await board.refresh()
        assert mirror(board) == mirror(await fresh_board(make_hub)), f"step {step}"
    assert set(board.entries) == set(secrets)


async def test_a_delta_carries_only_what_changed(make_hub: Any, make_worker: Any) -> None:
    hub: httpx.AsyncClient = await make_hub()
    store = hub.app.state.hub.store  # type: ignore[attr-defined]
    secrets = {f"w-{i}": (await register(hub, f"w-{i}", await make_worker()))["worker_secret"] for i in range(5)}
    whole = await store.read_board()
    assert whole.complete and set(whole.status) == set(secrets)

    await asyncio.sleep(0.01)
    await heartbeat(hub, "w-3", secrets["w-3"], [], latency_ms=12.0)
    delta = await store.read_board(whole.now_ms + 1)  # changes stamped after the whole read
    assert not delta.complete
    assert set(delta.status) == set(delta.used) == {"w-3"} and delta.static == {}

    await asyncio.sleep(0.01)
    await hub.delete("/api/v1/workers/w-1", headers={**WORKER_AUTH, "X-Worker-Secret": secrets["w-1"]})
    gone = await store.read_board(delta.now_ms + 1)
    assert gone.static == {"w-1": None} and gone.status == {"w-1": None}

    stale = await store.read_board(whole.now_ms - 3_600_000)  # older than the change log reaches: everything
    assert stale.complete and set(stale.status) == set(secrets) - {"w-1"}


def _views(*wids: str) -> dict[str, str | None]:
    return {wid: json.dumps({"url": f"http://{wid}", "region": "eu-west-1", "lat": 53.3, "lon": -6.3,
                             "max_streams": 2}) for wid in wids}


class _SteppedClockStore:
    """The board's store as a failover to a replica whose clock is ``behind_ms`` (2 s) behind leaves it: w-2
    registered after the failover, so its change is stamped before the hub's cursor and the next delta does not
    carry it."""

    def __init__(self, behind_ms: int = 2000) -> None:
        self.reads: list[int | None] = []
        self.answers = {  # (read number, whole?) -> answer
            (1, True): BoardRead(static=_views("w-1"), status={}, used={}, now_ms=1_000_000, complete=True),
            (2, False): BoardRead(static={}, status={}, used={}, now_ms=1_000_000 - behind_ms, complete=False),
            (3, True): BoardRead(static=_views("w-1", "w-2"), status={}, used={}, now_ms=998_010, complete=True),
            (4, False): BoardRead(static={}, status={}, used={}, now_ms=999_010, complete=False),
        }

    async def read_board(self, changed_since_ms: int | None = None) -> BoardRead:
        self.reads.append(changed_since_ms)
        return self.answers[len(self.reads), changed_since_ms is None]


async def test_a_redis_clock_that_went_back_makes_the_hub_read_the_whole_board() -> None:
    """Regression: after a failover to a replica whose clock was behind, changes were stamped before each hub's
    cursor and delta reads missed them for good (a registration view is written once)."""
    store = _SteppedClockStore()
    board = RoutingBoard(store, ttl_ms=10_000, retention_ms=60_000,  # type: ignore[arg-type]
                         policy=Policy.SPREAD, weights=Weights(0.5, 0.2, 0.2, 0.1), near_best_margin=0.02)
    await board.refresh()
    assert set(board.entries) == {"w-1"}
    await board.refresh()
    assert store.reads == [None, 1_000_000 - 100, None]
    assert set(board.entries) == {"w-1", "w-2"}
    await asyncio.sleep(0.2)
    await board.refresh()  # from the new clock on, deltas again
    assert store.reads[3] == 998_010 - 100 and set(board.entries) == {"w-1", "w-2"}


async def test_a_redis_clock_step_just_longer_than_the_delta_overlap_is_caught_too() -> None:
    """A step of 150 ms puts a new registration's stamp before the cursor (the overlap is 100 ms), so it must make the
    hub read the whole board like a step of seconds; a delta would not show the new worker for a minute."""
    store = _SteppedClockStore(behind_ms=150)
    board = RoutingBoard(store, ttl_ms=10_000, retention_ms=60_000,  # type: ignore[arg-type]
                         policy=Policy.SPREAD, weights=Weights(), near_best_margin=0.02)
    await board.refresh()
    await board.refresh()
    assert store.reads == [None, 1_000_000 - 100, None]
    assert set(board.entries) == {"w-1", "w-2"}


async def test_a_redis_that_restarts_empty_leaves_no_ghost_in_a_running_hubs_mirror(make_hub: Any, make_worker: Any,
                                                                                    redis_url: str) -> None:
    """Regression: an emptied Redis logs no removal, so a running hub's delta reads kept a worker that died meanwhile
    for good (listed as stale, counted in fleet_workers, unknown to `fleet forget`) while a fresh hub saw the truth."""
    hub: httpx.AsyncClient = await make_hub()
    board: RoutingBoard = hub.app.state.hub.board  # type: ignore[attr-defined]
    live = await make_worker()
    await register(hub, "w-live", live)
    await register(hub, "w-dead", await make_worker())  # its instance dies: it never heartbeats again
    await board.refresh()
    assert set(board.entries) == {"w-live", "w-dead"}

    flush(sync_redis(redis_url))  # Redis restarts empty
    await register(hub, "w-live", live)  # the live worker learns it at its next heartbeat and registers again
    await board.refresh()
    assert set(board.entries) == {"w-live"}
    listed = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert [w["worker_id"] for w in listed] == ["w-live"]
    assert mirror(board) == mirror(await fresh_board(make_hub))


async def test_a_worker_past_retention_that_is_not_on_the_board_leaves_the_mirror(make_hub: Any, make_worker: Any,
                                                                                  redis_url: str) -> None:
    """A mirror entry whose board view is gone without a logged removal: forgetting it removes nothing on the board,
    so no delta would ever drop it; the hub drops it itself."""
    hub: httpx.AsyncClient = await make_hub(retention_s=1.0)
    board: RoutingBoard = hub.app.state.hub.board  # type: ignore[attr-defined]
    await register(hub, "w-1", await make_worker())
    await asyncio.sleep(0.3)  # past the overlap of delta reads: the next no longer carries the worker's changes
    await board.refresh()
    assert set(board.entries) == {"w-1"}
    client = sync_redis(redis_url)
    for key in (keys.BOARD.static, keys.BOARD.status, keys.BOARD.used, keys.BOARD.registered):
        client.hdel(key, "w-1")  # gone from the board, and no change logged
    await asyncio.sleep(1.0)  # past retention
    await board.refresh()
    await board.refresh()
    assert board.entries == {}


async def test_a_periodic_whole_read_corrects_what_no_delta_can_carry(make_hub: Any, make_worker: Any,
                                                                      redis_url: str) -> None:
    """Board changes that were never logged (an older snapshot restored under the same epoch, a removal lost in a
    failover) reach no delta read; the whole read every ``whole_read_every_s`` corrects them, and rebuilds only the
    workers that differ."""
    hub: httpx.AsyncClient = await make_hub()
    board: RoutingBoard = hub.app.state.hub.board  # type: ignore[attr-defined]
    for wid in ("w-1", "w-2", "w-3"):
        await register(hub, wid, await make_worker(max_streams=4))
    await asyncio.sleep(0.3)  # past the overlap of delta reads: the next no longer carries the registrations
    await board.refresh()
    before = dict(board.entries)
    client = sync_redis(redis_url)
    for key in (keys.BOARD.static, keys.BOARD.status, keys.BOARD.used, keys.BOARD.registered):
        client.hdel(key, "w-1")  # gone from the board, and no change logged
    client.hset(keys.BOARD.used, "w-2", 3)  # a count no change logged either
    await board.refresh()
    assert set(board.entries) == {"w-1", "w-2", "w-3"} and board.entries["w-2"].used == 0, "a delta saw it"

    board.whole_read_every_s = 0.0  # the period is over
    await board.refresh()
    assert set(board.entries) == {"w-2", "w-3"} and board.entries["w-2"].used == 3
    assert mirror(board) == mirror(await fresh_board(make_hub))
    assert board.entries["w-3"] is before["w-3"] and board.entries["w-3"].static is before["w-3"].static, \
        "an unchanged worker was parsed and rebuilt again"

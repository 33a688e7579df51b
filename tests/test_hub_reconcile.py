"""Reconciliation: a session a worker runs that the hub does not hold is stopped through the worker's own
``DELETE /sessions/{id}``, not only named in the heartbeat's answer (a worker that ignores ``stop_sessions`` must not
keep an uncounted session); an unconfirmed lease gives its slot back at its own expiry."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from hub import registry as registry_module
from tests.conftest import ADMIN_AUTH, heartbeat, refresh, register, wait_for

STRANGER = "w-1~strangerxyz1"


async def test_a_session_the_hub_does_not_hold_is_stopped_through_the_workers_delete(hub: httpx.AsyncClient,
                                                                                     make_worker: Any) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    worker.sessions[STRANGER] = {}  # it runs a session no hub holds (say, a hub died before confirming it)
    for _ in range(3):  # a worker that ignores stop_sessions keeps reporting it
        reply = (await heartbeat(hub, "w-1", reg["worker_secret"], [STRANGER])).json()
        assert reply["stop_sessions"] == [STRANGER]
    await wait_for(lambda: worker.stopped, 5, "the hub's DELETE on the worker")
    await asyncio.sleep(0.2)  # any DELETE the other heartbeats started has landed by now
    assert worker.stopped == [STRANGER]  # once, not once per heartbeat
    assert STRANGER not in worker.sessions


async def test_a_session_still_reported_after_the_window_is_stopped_again(hub: httpx.AsyncClient, make_worker: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_STOP_AGAIN_AFTER_S", 0.3)
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    for stranger in (STRANGER, "w-1~strangerxyz2"):
        await heartbeat(hub, "w-1", reg["worker_secret"], [stranger])
    await wait_for(lambda: len(worker.stopped) == 2, 5, "both DELETEs")
    await asyncio.sleep(0.4)  # past the window: the worker (which ignored the stops) reports the first one again
    await heartbeat(hub, "w-1", reg["worker_secret"], [STRANGER])
    await wait_for(lambda: len(worker.stopped) == 3, 5, "the DELETE again")
    assert worker.stopped == [STRANGER, "w-1~strangerxyz2", STRANGER]


async def test_a_session_the_hub_holds_is_never_stopped(hub: httpx.AsyncClient, make_worker: Any) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    reply = (await heartbeat(hub, "w-1", reg["worker_secret"], [sid])).json()
    assert reply["stop_sessions"] == [] and reply["used_streams"] == 1
    await asyncio.sleep(0.2)
    assert worker.stopped == [] and sid in worker.sessions


async def test_an_unconfirmed_lease_gives_its_slot_back_at_its_own_expiry(make_hub: Any, make_worker: Any) -> None:
    """Regression: a pending lease nobody confirmed held its slot until the worker's next heartbeat after its
    expiry (up to a heartbeat interval more than the lease), though no confirmation can take it any more."""
    hub = await make_hub(pending_lease_s=0.4, worker_ttl_s=30.0, heartbeat_interval_s=10.0)
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-1", worker)
    await heartbeat(hub, "w-1", reg["worker_secret"], [])
    store = hub.app.state.hub.store
    assert (await store.reserve("w-1", "w-1~neverconfirm1", {"worker_id": "w-1"})).ok  # its hub died
    assert not (await store.reserve("w-1", "w-1~secondtry123", {"worker_id": "w-1"})).ok  # full while it holds
    await asyncio.sleep(0.5)  # past the pending lease; no heartbeat since
    read = await store.read_worker("w-1")
    assert read is not None and read[1] == 0  # the views count what the next reservation will
    assert (await store.reserve("w-1", "w-1~secondtry123", {"worker_id": "w-1"})).ok
    assert not await store.confirm("w-1", "w-1~neverconfirm1")  # and it cannot come back


async def test_a_confirmed_lease_that_lapsed_waits_for_a_heartbeat(make_hub: Any, make_worker: Any) -> None:
    """The other half of the rule: an active lease that lapsed may have lapsed only because heartbeats could not
    reach Redis; it holds its slot until a heartbeat after its expiry has not renewed it."""
    hub = await make_hub(pending_lease_s=0.4, active_lease_s=0.4, worker_ttl_s=30.0, heartbeat_interval_s=10.0)
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-1", worker)
    await heartbeat(hub, "w-1", reg["worker_secret"], [])
    store = hub.app.state.hub.store
    assert (await store.reserve("w-1", "w-1~confirmed123", {"worker_id": "w-1"})).ok
    assert await store.confirm("w-1", "w-1~confirmed123")
    await asyncio.sleep(0.5)
    assert not (await store.reserve("w-1", "w-1~secondtry123", {"worker_id": "w-1"})).ok
    reply = (await heartbeat(hub, "w-1", reg["worker_secret"], ["w-1~confirmed123"])).json()
    assert reply["used_streams"] == 1 and reply["stop_sessions"] == []  # renewed: the session goes on


async def test_a_lapsed_pending_lease_is_adopted_by_a_heartbeat_unless_a_reservation_dropped_it_first(
        make_hub: Any, make_worker: Any) -> None:
    """A failover that lost a confirmation leaves a pending lease for a session a client holds: the worker's heartbeat
    keeps it, even after the lease lapsed, as long as no reservation has dropped it (and taken its slot) first."""
    hub = await make_hub(pending_lease_s=0.4, worker_ttl_s=30.0, heartbeat_interval_s=10.0)
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-1", worker)
    secret = reg["worker_secret"]
    await heartbeat(hub, "w-1", secret, [])
    store = hub.app.state.hub.store
    assert (await store.reserve("w-1", "w-1~confirmlost1", {"worker_id": "w-1"})).ok
    await asyncio.sleep(0.5)
    reply = (await heartbeat(hub, "w-1", secret, ["w-1~confirmlost1"])).json()
    assert reply["stop_sessions"] == [] and reply["used_streams"] == 1  # adopted: the session goes on
    assert not (await store.reserve("w-1", "w-1~wantsthatslot", {"worker_id": "w-1"})).ok

    assert (await store.release("w-1", "w-1~confirmlost1")).held
    assert (await store.reserve("w-1", "w-1~confirmlost2", {"worker_id": "w-1"})).ok
    await asyncio.sleep(0.5)
    assert (await store.reserve("w-1", "w-1~tookitfirst1", {"worker_id": "w-1"})).ok  # drops the lapsed one
    reply = (await heartbeat(hub, "w-1", secret, ["w-1~confirmlost2"])).json()
    assert reply["stop_sessions"] == ["w-1~confirmlost2"] and reply["used_streams"] == 1


async def test_sre_listings_show_a_lapsed_pending_lease_as_lapsed(make_hub: Any, make_worker: Any) -> None:
    """Regression: a lapsed pending lease was listed as ``pending`` while ``fleet workers`` counted its slot free."""
    hub = await make_hub(pending_lease_s=0.4, worker_ttl_s=30.0, heartbeat_interval_s=10.0)
    worker = await make_worker(max_streams=2)
    reg = await register(hub, "w-1", worker)
    await heartbeat(hub, "w-1", reg["worker_secret"], [])
    store = hub.app.state.hub.store
    record = {"worker_id": "w-1", "worker_region": "us-east-1", "livekit_region": "us-east-1", "room": "r",
              "created_at": 1.0, "session_key": None, "location": None}
    assert (await store.reserve("w-1", "w-1~neverconfirm1", record)).ok

    async def statuses() -> tuple[str, str]:
        stored = await store.read_session("w-1", "w-1~neverconfirm1")
        [listed] = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]
        return stored.status, listed["status"]

    assert await statuses() == ("pending", "pending")
    await asyncio.sleep(0.5)  # past the pending lease; no heartbeat or reservation has dropped it yet
    assert await statuses() == ("lapsed", "lapsed")
    worker_view = (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).json()
    assert worker_view["used_streams"] == 0  # agrees with the worker's fresh view


async def test_a_worker_naming_made_up_sessions_gets_at_most_its_streams_in_deletes_per_window(
        hub: httpx.AsyncClient, make_worker: Any) -> None:
    """A worker that names fresh made-up ids in every heartbeat (up to 1,024 each) had the hub send a DELETE for
    every one, to whatever URL it registered: a thousand requests per heartbeat. The answer still names them all."""
    worker = await make_worker(max_streams=3)
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    for beat in range(4):
        made_up = [f"w-1~madeup{beat}x{i:04d}" for i in range(50)]
        reply = (await heartbeat(hub, "w-1", reg["worker_secret"], made_up)).json()
        assert sorted(reply["stop_sessions"]) == sorted(made_up)
    await wait_for(lambda: len(worker.stopped) == 3, 5, "the first DELETEs")
    await asyncio.sleep(0.3)  # any DELETE beyond the budget would have landed by now
    assert len(worker.stopped) == 3


async def test_a_worker_that_spent_its_stop_budget_has_its_next_unknown_session_stopped_in_the_next_window(
        hub: httpx.AsyncClient, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget bounds the DELETEs per window, not for good: a real worker whose every stream was once a session
    no hub held must still have the next one stopped, or it runs uncounted whenever the worker ignores the answer."""
    monkeypatch.setattr(registry_module, "_STOP_AGAIN_AFTER_S", 0.3)
    worker = await make_worker(max_streams=2)
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    await heartbeat(hub, "w-1", reg["worker_secret"], ["w-1~orphanone001", "w-1~orphantwo002"])
    await wait_for(lambda: len(worker.stopped) == 2, 5, "the first window's DELETEs")
    await asyncio.sleep(0.4)  # past the window
    await heartbeat(hub, "w-1", reg["worker_secret"], ["w-1~orphanthree3"])
    await wait_for(lambda: "w-1~orphanthree3" in worker.stopped, 5, "the DELETE in the next window")

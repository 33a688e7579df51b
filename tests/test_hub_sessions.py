"""Session placement through the hub's HTTP API, against a real redis-server and fake worker endpoints."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
import redis
from livekit import api

from hub import allocator as allocator_module
from hub import board as board_module
from hub.dispatch import Dispatched, DispatchOutcome, StopAnswer, WorkerClient
from hub.scoring import Weights
from hub.settings import DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET
from shared import keys
from shared.errors import StoreUnavailable
from shared.models import Policy, SessionDispatch
from shared.redis_server import free_port
from tests.conftest import (
    ADMIN_AUTH,
    WORKER_AUTH,
    WORKER_TOKEN,
    heartbeat,
    heartbeat_of,
    refresh,
    register,
    registration,
    sync_redis,
    wait_for,
)


async def _unreachable(*args: object, **kwargs: object) -> Any:
    """Stands in for a store step while Redis is out of reach."""
    raise StoreUnavailable("the shared store is unreachable")


async def test_session_is_placed_and_its_token_joins_exactly_that_room(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker(max_streams=2)
    await register(hub, "w-1", worker)
    await refresh(hub)

    resp = await hub.post("/api/v1/sessions", json={"identity": "alice", "location": {"lat": 40.7, "lon": -74.0}})

    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["worker"] == {"id": "w-1", "region": "us-east-1", "audio_url": None}  # its engine serves no audio WS
    assert body["session_id"] in worker.sessions  # really dispatched to the worker
    claims = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(body["livekit"]["token"])
    assert claims.identity == "alice"
    assert claims.video.room_join and claims.video.room == body["livekit"]["room"]
    assert not claims.video.room_admin and not claims.video.room_create
    agent = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(worker.sessions[body["session_id"]]["token"])
    assert agent.video.room == body["livekit"]["room"] and agent.identity.startswith("agent-")


async def test_nothing_a_rooms_participants_see_leads_to_the_session_key(hub: httpx.AsyncClient,
                                                                          make_worker) -> None:
    """The session id reads and ends a session without credentials, so it must not be derivable from what the room
    shows (its name, the agent's identity, the user's default identity), and reading the session must not hand over
    its session_key: that key joins the conversation as its owner. Before, the room was ``fleet-<the id's random
    part>``, the agent was ``agent-<session id>``, and a GET returned the key."""
    worker = await make_worker(max_streams=2)
    await register(hub, "w-1", worker)
    await refresh(hub)
    created = await hub.post("/api/v1/sessions", json={"session_key": "lesson-7f3a9c1e", "identity": "alice"})
    assert created.status_code == 201, created.text
    body = created.json()
    sid, room = body["session_id"], body["livekit"]["room"]
    agent = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(worker.sessions[sid]["token"])
    random_part = sid.rpartition("~")[2]
    seen = [room, agent.identity]
    assert not any(random_part in shown or random_part[:8] in shown for shown in seen), (sid, seen)
    assert sid not in agent.identity and room in agent.identity

    got = await hub.get(f"/api/v1/sessions/{sid}")
    assert got.status_code == 200 and "lesson-7f3a9c1e" not in got.text and got.json()["session_key"] is None
    assert got.json()["livekit"]["room"] == room  # the rest is as before
    anonymous = await hub.post("/api/v1/sessions", json={})
    default_identity = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(
        anonymous.json()["livekit"]["token"]).identity
    assert default_identity.startswith("user-")
    assert anonymous.json()["session_id"].rpartition("~")[2][:8] not in default_identity


async def test_get_and_delete_free_the_slot_at_once(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker(max_streams=1)
    await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    got = await hub.get(f"/api/v1/sessions/{sid}")
    assert got.status_code == 200 and got.json()["livekit"]["token"] is None
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503  # the only slot is taken

    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
    assert (await hub.get(f"/api/v1/sessions/{sid}")).status_code == 404
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 404
    again = await hub.post("/api/v1/sessions", json={})
    assert again.status_code == 201, again.text


async def test_a_slot_is_freed_only_once_its_worker_has_stopped_the_session(hub, make_worker) -> None:
    """Regression: the slot was freed in Redis first and the worker told afterwards, so the next session could be
    dispatched to a worker still running the ended one: refused as full, and placed elsewhere or refused."""
    worker = await make_worker(max_streams=1, stop_delay_s=0.3)
    await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
    assert worker.stopped == [sid]
    again = await hub.post("/api/v1/sessions", json={})
    assert again.status_code == 201, again.text
    assert worker.refused_full == 0


async def test_ending_a_session_frees_its_slot_even_when_the_worker_is_slow_to_stop_it(hub, make_worker) -> None:
    worker = await make_worker(max_streams=1, stop_delay_s=2.5)
    await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
    assert not worker.stopped, "the stop has not reached the worker yet"
    fleet = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert fleet[0]["used_streams"] == 0
    await wait_for(lambda: worker.stopped == [sid], 5, "the stop, finished in the background")
    assert sid not in worker.sessions


async def test_a_session_its_worker_stopped_has_ended_even_if_a_heartbeat_freed_the_slot_first(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the worker's stop and the release, the worker's heartbeat can report the session gone, and the
    heartbeat frees the slot: the release then finds nothing, but the session did exist and has ended (204)."""
    worker = await make_worker(max_streams=1)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    workers = hub.app.state.hub.allocator.workers
    real_stop = workers.stop

    async def stop_then_heartbeat(url: str, session_id: str) -> StopAnswer:
        answer = await real_stop(url, session_id)
        assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 0
        return answer

    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    monkeypatch.setattr(workers, "stop", stop_then_heartbeat)
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 404


async def test_no_capacity_is_a_clean_503_with_retry_after(hub: httpx.AsyncClient) -> None:
    resp = await hub.post("/api/v1/sessions", json={})
    assert resp.status_code == 503
    assert resp.json()["error"] == "no_capacity"
    assert int(resp.headers["Retry-After"]) >= 1


async def test_session_key_affinity_reuses_the_slot_with_a_fresh_token(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker(max_streams=3)
    await register(hub, "w-1", worker)
    await refresh(hub)
    first = await hub.post("/api/v1/sessions", json={"session_key": "lesson-42", "identity": "bob"})
    await asyncio.sleep(1.01)  # JWT times have second resolution: a fresh token must differ
    second = await hub.post("/api/v1/sessions", json={"session_key": "lesson-42", "identity": "bob"})

    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["session_id"] == second.json()["session_id"]
    assert first.json()["livekit"]["token"] != second.json()["livekit"]["token"]
    assert len(worker.sessions) == 1


async def test_a_session_key_lets_in_only_the_participant_it_was_made_for(hub: httpx.AsyncClient,
                                                                         make_worker: Any) -> None:
    """Regression: presenting someone's session_key with another identity, the workers' own ``agent-`` one included,
    minted a token to join their room as that identity."""
    worker = await make_worker(max_streams=3)
    await register(hub, "w-1", worker)
    await refresh(hub)
    verifier = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET)
    first = await hub.post("/api/v1/sessions", json={"session_key": "lesson-43", "identity": "alice"})
    assert first.status_code == 201, first.text

    other = await hub.post("/api/v1/sessions", json={"session_key": "lesson-43", "identity": "mallory"})
    assert other.status_code == 409 and other.json()["error"] == "session_key_in_use"
    agent = await hub.post("/api/v1/sessions", json={"session_key": "lesson-43",
                                                     "identity": f"agent-{first.json()['session_id']}"})
    assert agent.status_code == 422 and "agent-" in agent.json()["message"]
    # The same conversation asked again without an identity is the same participant's.
    again = await hub.post("/api/v1/sessions", json={"session_key": "lesson-43"})
    assert again.status_code == 200 and verifier.verify(again.json()["livekit"]["token"]).identity == "alice"
    assert len(worker.sessions) == 1
    metrics = (await hub.get("/metrics")).text
    assert 'fleet_allocations_total{outcome="conflict"} 1.0' in metrics


async def test_concurrent_requests_for_one_session_key_take_one_slot(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker(max_streams=10, delay_s=0.1)
    await register(hub, "w-1", worker)
    await refresh(hub)
    answers = await asyncio.gather(*[hub.post("/api/v1/sessions", json={"session_key": "k1"}) for _ in range(8)])

    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert len({a.json()["session_id"] for a in answers}) == 1
    assert len(worker.sessions) == 1


async def test_a_dead_workers_conversation_moves_on_the_next_request(hub: httpx.AsyncClient, make_worker) -> None:
    dead, alive = await make_worker(), await make_worker()
    dead_reg = await register(hub, "w-dead", dead, location={"lat": 40.7, "lon": -74.0})
    await refresh(hub)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv", "location": {"lat": 40.7, "lon": -74.0}})
    assert first.json()["worker"]["id"] == "w-dead"

    alive_reg = await register(hub, "w-alive", alive, region="us-west-2")
    for _ in range(6):  # only w-alive keeps heartbeating; w-dead's TTL (2 s) passes
        await heartbeat(hub, "w-alive", alive_reg["worker_secret"], list(alive.sessions))
        await asyncio.sleep(0.45)
    await refresh(hub)
    moved = await hub.post("/api/v1/sessions", json={"session_key": "conv", "location": {"lat": 40.7, "lon": -74.0}})

    assert moved.status_code == 201, moved.text
    assert moved.json()["worker"]["id"] == "w-alive"
    assert moved.json()["session_id"] != first.json()["session_id"]
    assert dead_reg["worker_secret"] != alive_reg["worker_secret"]

    # w-dead was only cut off, and comes back still running the old session: the move released it, so the hub
    # tells it to stop rather than renew a slot (and an agent in an empty room) for a conversation that went on.
    back = await heartbeat(hub, "w-dead", dead_reg["worker_secret"], [first.json()["session_id"]])
    assert back.status_code == 200, back.text
    assert back.json()["stop_sessions"] == [first.json()["session_id"]] and back.json()["used_streams"] == 0


async def test_drained_worker_gets_no_new_sessions_and_learns_it(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    drained = await hub.post("/api/v1/workers/w-1/drain", headers=ADMIN_AUTH)
    assert drained.status_code == 200 and drained.json()["state"] == "draining"

    hb = await heartbeat(hub, "w-1", reg["worker_secret"], [])
    assert hb.json()["state"] == "draining"
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
    # An SRE's views offer no room on it either: nothing will be placed there.
    [listed] = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    one = (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).json()
    assert (listed["free_streams"], one["free_streams"], one["max_streams"]) == (0, 0, worker.max_streams)

    await hub.post("/api/v1/workers/w-1/resume", headers=ADMIN_AUTH)
    assert (await heartbeat(hub, "w-1", reg["worker_secret"], [])).json()["state"] == "ready"
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201


async def test_a_leaving_worker_that_registers_again_stays_out_of_routing(hub: httpx.AsyncClient,
                                                                       make_worker) -> None:
    """The hub lost a worker that is draining on its own: its new registration says so, and no session reaches it
    before its next heartbeat."""
    worker = await make_worker()
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await heartbeat(hub, "w-1", secret, [], state="draining")
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url, state="draining"),
                           headers={**WORKER_AUTH, "X-Worker-Secret": secret})
    assert again.status_code == 200 and again.json()["state"] == "draining"
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
    assert (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).json()["state"] == "draining"
    assert worker.sessions == {}
    back = await hub.post("/api/v1/workers", json=registration("w-1", worker.url),  # a fresh boot is ready
                          headers={**WORKER_AUTH, "X-Worker-Secret": again.json()["worker_secret"]})
    assert back.json()["state"] == "ready"
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201


async def test_the_list_and_the_worker_view_agree_on_an_sre_drain(hub: httpx.AsyncClient, make_worker) -> None:
    """Also while the worker drains on its own, and after it registers again."""
    worker = await make_worker()
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    assert (await hub.post("/api/v1/workers/w-1/drain", headers=ADMIN_AUTH)).status_code == 200

    async def both() -> tuple[bool, bool]:
        await refresh(hub)
        [listed] = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
        one = (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).json()
        return listed["drain_requested"], one["drain_requested"]

    await heartbeat(hub, "w-1", secret, [], state="draining")  # and it is leaving on its own
    assert await both() == (True, True)
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url),
                           headers={**WORKER_AUTH, "X-Worker-Secret": secret})
    assert again.status_code == 200
    assert await both() == (True, True)


async def test_the_worker_list_shows_an_sre_drain_before_the_workers_next_heartbeat(hub: httpx.AsyncClient,
                                                                                     make_worker) -> None:
    """An SRE who drains a worker and lists the fleet at once sees the drain, not the worker's last heartbeat's
    view of it."""
    worker = await make_worker()
    await register(hub, "w-1", worker)
    assert (await hub.post("/api/v1/workers/w-1/drain", headers=ADMIN_AUTH)).status_code == 200
    await refresh(hub)
    [listed] = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert (listed["state"], listed["drain_requested"]) == ("draining", True)


async def test_unconfirmed_lease_expires_by_itself(hub: httpx.AsyncClient, make_worker) -> None:
    """A hub that dies between reserve and confirm leaves a pending lease: it must return on its own, at the
    worker's first heartbeat after it lapsed (that heartbeat does not report it)."""
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-1", worker)
    store = hub.app.state.hub.store
    taken = await store.reserve("w-1", "w-1~orphanlease1", {"worker_id": "w-1"})
    assert taken.ok
    refused = await store.reserve("w-1", "w-1~otherlease12", {"worker_id": "w-1"})
    assert not refused.ok and refused.reason == "full"
    assert await store.redis.pttl(keys.worker_keys("w-1").leases) > 0  # even the lease set cannot outlive the worker
    for _ in range(6):  # pending_lease_s = 2.5; the worker stays alive and does not report the session
        await asyncio.sleep(0.45)
        await heartbeat(hub, "w-1", reg["worker_secret"], [])
    assert (await store.reserve("w-1", "w-1~otherlease12", {"worker_id": "w-1"})).ok


async def test_heartbeats_reconcile_sessions_both_ways(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker(max_streams=3)
    reg = await register(hub, "w-1", worker)
    store = hub.app.state.hub.store
    secret = reg["worker_secret"]
    # A pending lease the worker reports is adopted (the hub died before confirming).
    assert (await store.reserve("w-1", "w-1~adoptme12345", {"worker_id": "w-1"})).ok
    reply = (await heartbeat(hub, "w-1", secret, ["w-1~adoptme12345", "w-1~strangerxyz1"])).json()
    assert reply["used_streams"] == 1
    assert reply["stop_sessions"] == ["w-1~strangerxyz1"]  # runs there, unknown here: stop it
    for _ in range(6):  # past the pending lease (2.5 s): adoption made it active, renewed by heartbeats
        await asyncio.sleep(0.45)
        reply = (await heartbeat(hub, "w-1", secret, ["w-1~adoptme12345"])).json()
    assert reply["used_streams"] == 1

    # Just confirmed, omitted by a heartbeat that may have crossed the dispatch: kept for the grace (0.5 s) ...
    assert (await store.reserve("w-1", "w-1~freshsession", {"worker_id": "w-1"})).ok
    assert await store.confirm("w-1", "w-1~freshsession")
    assert (await heartbeat(hub, "w-1", secret, ["w-1~adoptme12345"])).json()["used_streams"] == 2
    # ... then released; and a long-running session the worker stops reporting is released at once.
    await asyncio.sleep(0.6)
    assert (await heartbeat(hub, "w-1", secret, ["w-1~adoptme12345"])).json()["used_streams"] == 1
    assert (await heartbeat(hub, "w-1", secret, [])).json()["used_streams"] == 0


async def test_a_stale_heartbeat_cannot_bring_back_an_ended_session(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204

    reply = (await heartbeat(hub, "w-1", reg["worker_secret"], [sid])).json()  # sent before the worker stopped it
    assert reply["used_streams"] == 0
    assert reply["stop_sessions"] == [sid]
    assert (await hub.get(f"/api/v1/sessions/{sid}")).status_code == 404


async def test_a_session_outlives_an_outage_longer_than_its_lease(make_hub, make_worker) -> None:
    """No heartbeat reached Redis for longer than the active lease (a Redis outage). Until the worker's next
    heartbeat has its say, nothing drops the lapsed leases: not a read, not a re-registration (a worker with
    several hub URLs tries one), not a reservation. That heartbeat still reports the session, so it goes on; a
    session ended meanwhile is told to stop."""
    hub = await make_hub(active_lease_s=0.4, worker_ttl_s=30)
    worker = await make_worker(max_streams=3)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    kept, lost = [(await hub.post("/api/v1/sessions", json={})).json()["session_id"] for _ in range(2)]
    await asyncio.sleep(0.6)  # both leases lapse; no heartbeat ran meanwhile
    assert (await hub.get(f"/api/v1/sessions/{kept}")).status_code == 200, "reading a session must not drop it"
    listed = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]
    assert {s["session_id"] for s in listed} == {kept, lost}, "an SRE still sees what the worker may be running"
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url, max_streams=3),
                           headers={**WORKER_AUTH, "X-Worker-Secret": secret})
    assert again.status_code == 200
    secret = again.json()["worker_secret"]
    store = hub.app.state.hub.store
    newcomer = await store.reserve("w-1", "w-1~newcomer12345", {"worker_id": "w-1"})
    assert newcomer.ok and newcomer.used == 3, "the lapsed leases still count until a heartbeat judges them"
    released = await store.release("w-1", lost)  # e.g. ended by its user while heartbeats could not get through
    assert released.held and released.used == 2, "the board hears the count the next reservation enforces"

    reply = (await heartbeat(hub, "w-1", secret, [kept, lost])).json()
    assert reply["stop_sessions"] == [lost]
    assert reply["used_streams"] == 2  # kept, renewed, and the newcomer's pending lease
    await asyncio.sleep(0.2)
    reply = (await heartbeat(hub, "w-1", secret, [kept, "w-1~newcomer12345"])).json()
    assert reply["used_streams"] == 2 and reply["stop_sessions"] == []
    assert (await hub.get(f"/api/v1/sessions/{kept}")).status_code == 200


async def test_a_worker_registered_just_after_a_refresh_is_found(hub: httpx.AsyncClient, make_worker) -> None:
    """No 503 while a live worker has room, even right after a board read that missed it."""
    worker = await make_worker()
    await refresh(hub)  # the fleet is empty, and the mirror has just read so
    await register(hub, "w-new", worker)  # e.g. through another hub: this mirror has not seen it
    resp = await hub.post("/api/v1/sessions", json={})
    assert resp.status_code == 201, resp.text


async def test_unreachable_or_full_worker_falls_through_to_the_next(hub: httpx.AsyncClient, make_worker) -> None:
    broken = await make_worker(mode="hang")
    full = await make_worker(mode="full")
    good = await make_worker()
    for wid, w, region in (("w-hang", broken, "us-east-1"), ("w-full", full, "us-east-1"),
                           ("w-good", good, "eu-west-1")):  # farther from the user: tried last
        await register(hub, wid, w, region=region)
    await refresh(hub)

    resp = await hub.post("/api/v1/sessions", json={"location": {"lat": 40.7, "lon": -74.0}})

    assert resp.status_code == 201, resp.text
    assert resp.json()["worker"]["id"] == "w-good"
    assert broken.dispatches == full.dispatches == 1, "both were tried first"
    await refresh(hub)  # the slot counts as the store holds them, not as this hub noted them
    fleet = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert {w["worker_id"]: w["used_streams"] for w in fleet} == {"w-hang": 0, "w-full": 0, "w-good": 1}


async def test_a_worker_whose_dispatch_timed_out_is_skipped_for_a_while_though_it_heartbeats(
        hub: httpx.AsyncClient, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose engine hangs keeps heartbeating: skipped only until the next board refresh, it cost one request
    a whole dispatch timeout every second. It is skipped for ``BENCH_BASE_S`` (doubled at each failure in a row), and
    its next dispatch that succeeds ends that."""
    monkeypatch.setattr(board_module, "BENCH_BASE_S", 3.0)
    hanging, good = await make_worker(mode="hang"), await make_worker()
    hang_reg = await register(hub, "w-hang", hanging, region="us-east-1")  # nearer the user: ranked first
    await register(hub, "w-good", good, region="eu-west-1")
    await refresh(hub)
    new_york = {"location": {"lat": 40.7, "lon": -74.0}}
    first = await hub.post("/api/v1/sessions", json=new_york)
    assert first.status_code == 201 and first.json()["worker"]["id"] == "w-good", first.text
    assert hanging.dispatches == 1

    await heartbeat_of(hub, "w-hang", hang_reg["worker_secret"], hanging)  # still live, and its slots free
    await refresh(hub)
    second = await hub.post("/api/v1/sessions", json=new_york)
    assert second.status_code == 201 and second.json()["worker"]["id"] == "w-good", second.text
    assert hanging.dispatches == 1, "tried again within its bench"

    hanging.mode = "accept"  # its engine recovered
    await asyncio.sleep(3.2)
    await heartbeat_of(hub, "w-hang", hang_reg["worker_secret"], hanging)
    await refresh(hub)
    third = await hub.post("/api/v1/sessions", json=new_york)
    assert third.status_code == 201 and third.json()["worker"]["id"] == "w-hang", third.text


def test_failures_in_a_row_bench_a_worker_longer_and_a_success_ends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: clock[0])
    board = board_module.RoutingBoard(None, ttl_ms=9000, retention_ms=3_600_000,  # type: ignore[arg-type]
                                      policy=Policy.SPREAD, weights=Weights(), near_best_margin=0.05)
    benches = []
    for _ in range(6):
        board.note_failed_dispatch("w-1", "timeout")
        benches.append(board._benched["w-1"][0] - clock[0])
    assert benches == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert board._is_benched("w-1")
    clock[0] += 30.5
    assert not board._is_benched("w-1")
    board.note_dispatched("w-1")
    board.note_failed_dispatch("w-1", "timeout")
    assert board._benched["w-1"][0] - clock[0] == 2.0  # counted anew


async def test_a_blip_of_the_hubs_own_network_does_not_keep_it_from_placing_on_healthy_workers(
        hub: httpx.AsyncClient, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker a hub tried while its own network was down is benched: once the network is back, a request that
    finds no other candidate tries the benched workers rather than answer no_capacity with the fleet idle (with the
    bench doubling at each failure in a row, that 503 lasted up to ``BENCH_CAP_S`` after the blip)."""
    for wid in ("w-1", "w-2"):
        await register(hub, wid, await make_worker())
    await refresh(hub)
    workers = hub.app.state.hub.allocator.workers
    real_dispatch = workers.dispatch

    async def unreachable(url: str, spec: SessionDispatch) -> Dispatched:
        return Dispatched(DispatchOutcome.UNREACHABLE)

    monkeypatch.setattr(workers, "dispatch", unreachable)
    during = await hub.post("/api/v1/sessions", json={})
    assert during.status_code == 503, during.text
    assert all(is_benched(hub, wid) for wid in ("w-1", "w-2"))

    monkeypatch.setattr(workers, "dispatch", real_dispatch)  # the network is back; both benches still run
    after = await hub.post("/api/v1/sessions", json={})
    assert after.status_code == 201, after.text
    again = await hub.post("/api/v1/sessions", json={})
    assert again.status_code == 201, again.text


def is_benched(hub: httpx.AsyncClient, worker_id: str) -> bool:
    return hub.app.state.hub.board._is_benched(worker_id)  # type: ignore[attr-defined, no-any-return]


async def test_a_worker_that_takes_a_session_after_a_failed_dispatch_starts_its_failures_in_a_row_anew(
        hub: httpx.AsyncClient, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failures in a row bench a worker longer each time, and one that succeeds ends them: its next failure
    benches it for ``BENCH_BASE_S`` again, not for twice as long as the last one, on to ``BENCH_CAP_S``."""
    monkeypatch.setattr(board_module, "BENCH_BASE_S", 0.2)
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    workers, board = hub.app.state.hub.allocator.workers, hub.app.state.hub.board
    real_dispatch = workers.dispatch

    async def unreachable(url: str, spec: SessionDispatch) -> Dispatched:
        return Dispatched(DispatchOutcome.UNREACHABLE)

    monkeypatch.setattr(workers, "dispatch", unreachable)
    for failures in (1, 2):
        assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
        assert board._benched["w-1"][1] == failures, "failures in a row are counted"
        await asyncio.sleep(0.2 * failures + 0.1)  # past its bench
        await refresh(hub)
    monkeypatch.setattr(workers, "dispatch", real_dispatch)
    placed = await hub.post("/api/v1/sessions", json={})
    assert placed.status_code == 201, placed.text
    assert "w-1" not in board._benched


async def test_a_worker_that_took_a_session_whose_lease_had_lapsed_is_not_benched(
        hub: httpx.AsyncClient, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker answered in time; the hub or its store was too slow to confirm. Nothing is wrong with the worker:
    it is skipped until the next refresh as before, not benched for seconds as one whose dispatch failed."""
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    state = hub.app.state.hub

    async def lapsed(worker_id: str, session_id: str, accepted_at_seq: int | None) -> bool:
        return False

    monkeypatch.setattr(state.store, "confirm", lapsed)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
    assert not state.board._is_benched("w-1")


async def test_a_worker_that_took_the_session_but_answered_500_is_told_to_stop_it(hub: httpx.AsyncClient,
                                                                                  make_worker) -> None:
    """Guards against the hub freeing its slot while the worker keeps streaming into an empty room until its next
    heartbeat: any failed dispatch but a plain "full" is followed by a stop."""
    flaky = await make_worker(mode="accept_then_error")
    good = await make_worker()
    await register(hub, "w-flaky", flaky, region="us-east-1")
    await register(hub, "w-good", good, region="eu-west-1")  # farther from the user: tried second
    await refresh(hub)
    resp = await hub.post("/api/v1/sessions", json={"location": {"lat": 40.7, "lon": -74.0}})
    assert resp.status_code == 201 and resp.json()["worker"]["id"] == "w-good", resp.text
    await wait_for(lambda: flaky.dispatches and not flaky.sessions, 2, "the flaky worker's session stopped")
    assert flaky.dispatches == 1 and flaky.sessions == {} and len(flaky.stopped) == 1


@pytest.mark.standalone_redis
async def test_redis_down_answers_503_and_recovers(hub: httpx.AsyncClient, make_worker, redis_server) -> None:
    worker = await make_worker()
    await register(hub, "w-1", worker)
    await refresh(hub)
    redis_server.stop()
    try:
        down = await hub.post("/api/v1/sessions", json={})
        assert down.status_code == 503 and down.json()["error"] == "store_unavailable"
        assert "Retry-After" in down.headers
        not_ready = await hub.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "store_unavailable"
        assert int(not_ready.headers["Retry-After"]) >= 1  # a load balancer's probe, or a script, knows to retry
        assert (await hub.get("/health")).status_code == 200
    finally:
        redis_server.start()
    # Redis came back empty (no persistence): the worker re-registers and service resumes without a hub restart.
    assert (await hub.get("/ready")).status_code == 200
    await register(hub, "w-1", worker)
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201


@pytest.mark.standalone_redis
async def test_a_read_only_store_answers_503_and_a_writable_one_serves_again(hub: httpx.AsyncClient, make_worker,
                                                                           redis_server) -> None:
    """Mid-failover the old primary refuses writes (READONLY) per command, inside the pipeline that session steps
    share: that is a clean 503, not a server error."""
    worker = await make_worker()
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port)
    admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that never answers
    try:
        refused = await hub.post("/api/v1/sessions", json={})
        assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable", refused.text
        assert "Retry-After" in refused.headers and worker.sessions == {}
        beat = await heartbeat(hub, "w-1", secret, [])
        assert beat.status_code == 503 and beat.json()["error"] == "store_unavailable", beat.text
        again = await hub.post("/api/v1/workers", json=registration("w-2", worker.url), headers=WORKER_AUTH)
        assert again.status_code == 503 and again.json()["error"] == "store_unavailable", again.text
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201


async def test_sre_session_list_leaves_out_sessions_whose_lease_expired(make_hub, make_worker) -> None:
    """Found by the soak: a SIGKILLed worker's sessions stopped counting, but the SRE listing (and `fleet sessions`,
    the dashboard) kept showing them as active until retention, because no script runs on a dead worker's slot."""
    hub = await make_hub(active_lease_s=0.5, worker_ttl_s=0.8, absent_grace_s=0.0)
    worker = await make_worker()
    await register(hub, "w-dies", worker)
    await refresh(hub)
    placed = await hub.post("/api/v1/sessions", json={})
    assert placed.status_code == 201
    assert len((await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]) == 1
    await asyncio.sleep(1.2)  # the worker died: no heartbeat, its lease (0.5 s) and TTL (0.8 s) lapsed
    assert (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"] == []


async def test_a_late_heartbeat_snapshot_does_not_end_a_session_confirmed_after_it(make_hub, make_worker) -> None:
    """The worker snapshots its sessions (S not yet dispatched); the heartbeat then waits in a busy hub for longer
    than absent_grace_s while S is dispatched and confirmed. Found by the fault tests: judged by time alone, the
    script saw S confirmed "long ago" and absent, and released it. Heartbeat numbers decide it instead."""
    hub = await make_hub(absent_grace_s=0.3, worker_ttl_s=30)
    worker = await make_worker()
    secret = (await register(hub, "w-late", worker))["worker_secret"]
    await refresh(hub)
    early_seq, early = worker.snapshot()  # built before the dispatch: nothing running yet
    placed = await hub.post("/api/v1/sessions", json={})
    assert placed.status_code == 201
    sid = placed.json()["session_id"]
    await asyncio.sleep(0.5)  # the heartbeat is stuck in the hub's queue for longer than the grace
    late = (await heartbeat(hub, "w-late", secret, early, seq=early_seq)).json()
    assert late["used_streams"] == 1, "a live, confirmed session was released by a heartbeat older than it"
    reply = await heartbeat_of(hub, "w-late", secret, worker)
    assert sid in worker.sessions and sid not in reply["stop_sessions"] and reply["used_streams"] == 1


async def test_a_numbered_heartbeat_without_the_session_frees_it_at_once(make_hub, make_worker) -> None:
    """The converse: a heartbeat built after the worker took the session, and without it, proves it ended."""
    hub = await make_hub(absent_grace_s=30, worker_ttl_s=30)
    worker = await make_worker()
    secret = (await register(hub, "w-ends", worker))["worker_secret"]
    await refresh(hub)
    placed = await hub.post("/api/v1/sessions", json={})
    assert placed.status_code == 201
    worker.sessions.clear()  # the session ended by itself on the worker
    assert (await heartbeat_of(hub, "w-ends", secret, worker))["used_streams"] == 0


async def test_a_restarted_worker_numbering_its_heartbeats_anew_frees_its_old_sessions(make_hub,
                                                                                       make_worker) -> None:
    """A new process numbers its heartbeats from 0 again: its first heartbeat, without the old process's session, has
    a number below the one that session was accepted at. Once it registers, the time rule judges the session."""
    hub = await make_hub(absent_grace_s=0.2, worker_ttl_s=30)
    worker = await make_worker()
    secret = (await register(hub, "w-restarts", worker))["worker_secret"]
    for _ in range(5):
        worker.snapshot()  # the old process has sent a few heartbeats
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    assert (await heartbeat_of(hub, "w-restarts", secret, worker))["used_streams"] == 1
    again = await hub.post("/api/v1/workers", json=registration("w-restarts", worker.url),  # the new process
                           headers={**WORKER_AUTH, "X-Worker-Secret": secret})
    await asyncio.sleep(0.3)
    answer = await heartbeat(hub, "w-restarts", again.json()["worker_secret"], [], seq=1)
    assert answer.json()["used_streams"] == 0


async def test_a_confirmation_after_a_heartbeat_adopted_the_lease_keeps_the_workers_number(make_hub,
                                                                                          make_worker) -> None:
    """The worker's heartbeat reported the session before the hub's confirmation ran (it adopted the pending lease,
    with no number). The confirmation still records the worker's accepted_at_seq, so the numbered rule decides."""
    hub = await make_hub(absent_grace_s=30, worker_ttl_s=30)
    worker = await make_worker()
    secret = (await register(hub, "w-adopt", worker))["worker_secret"]
    store = hub.app.state.hub.store
    sid = "w-adopt~adoptedfirst1"
    assert (await store.reserve("w-adopt", sid, {"worker_id": "w-adopt"})).ok
    seq, _ = worker.snapshot()
    assert (await heartbeat(hub, "w-adopt", secret, [sid], seq=seq)).json()["used_streams"] == 1  # adopted
    assert await store.confirm("w-adopt", sid, seq)
    seq, _ = worker.snapshot()  # built after the worker took it, without it: it ended
    assert (await heartbeat(hub, "w-adopt", secret, [], seq=seq)).json()["used_streams"] == 0


async def test_a_placement_that_fails_after_its_reservation_leaves_no_slot_behind(
    hub: httpx.AsyncClient, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker took the session, then the store failed to confirm it: the client gets 503, and neither the worker
    nor its next heartbeat (which adopts pending leases it reports) may keep a slot no client knows of."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store

    monkeypatch.setattr(store, "confirm", _unreachable)
    failed = await hub.post("/api/v1/sessions", json={})
    assert failed.status_code == 503 and failed.json()["error"] == "store_unavailable"
    # The undo runs in the background: the stop, then the release (a heartbeat sent between the two still finds
    # the pending lease, so the test waits for the whole undo).
    await wait_for(lambda: not hub.app.state.hub.allocator._undoing, 10, "the undo")
    assert worker.stopped and not worker.sessions, "the worker was told to stop the session"
    reply = (await heartbeat(hub, "w-1", secret, list(worker.sessions))).json()
    assert reply["used_streams"] == 0, "the slot was released"


async def a_late_placement_and_its_taker(
    make_hub: Any, make_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[httpx.AsyncClient, Any, str, asyncio.Task[httpx.Response], httpx.Response]:
    """A slow store holds a placement up past its claim's lifetime; another request for the same conversation then
    places a session of its own. (hub, worker, its secret, the late request, the taker's answer.)"""
    hub = await make_hub(dispatch_timeout_s=0.2, max_dispatch_attempts=1, worker_ttl_s=30,
                         pending_lease_s=8)  # the claim lives 2.2 s, the pending lease longer
    worker = await make_worker(max_streams=3)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store
    confirm = store.confirm
    slowed, taken = asyncio.Event(), asyncio.Event()

    async def slow_once(*args: object, **kwargs: object) -> bool:
        if not slowed.is_set():
            slowed.set()
            # Held until the taker has its answer, however long that takes on a loaded machine (a fixed 2.6 s
            # left the taker 0.2 s to place its session before the late confirmation ran).
            await asyncio.wait_for(taken.wait(), 60)
        return await confirm(*args, **kwargs)

    monkeypatch.setattr(store, "confirm", slow_once)
    late = asyncio.create_task(hub.post("/api/v1/sessions", json={"session_key": "lesson-7"}))
    await slowed.wait()
    await asyncio.sleep(2.4)  # past the claim
    taker = await hub.post("/api/v1/sessions", json={"session_key": "lesson-7"})
    taken.set()
    assert taker.status_code == 201, taker.text
    return hub, worker, secret, late, taker


async def test_a_placement_whose_affinity_claim_lapsed_gives_way_to_the_one_that_took_it(
    make_hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One conversation keeps one session: the late placement is undone, not returned."""
    hub, worker, _, late, taker = await a_late_placement_and_its_taker(make_hub, make_worker, monkeypatch)
    lost = await late
    assert lost.status_code == 503 and lost.json()["error"] == "session_pending"
    metrics = (await hub.get("/metrics")).text  # a retry the client makes, not an error of the hub
    assert 'fleet_allocations_total{outcome="pending"} 1.0' in metrics
    assert 'fleet_allocations_total{outcome="error"} 0.0' in metrics
    again = await hub.post("/api/v1/sessions", json={"session_key": "lesson-7"})
    assert again.status_code == 200 and again.json()["session_id"] == taker.json()["session_id"]
    for _ in range(500):
        if len(worker.sessions) == 1:
            break
        await asyncio.sleep(0.02)
    assert list(worker.sessions) == [taker.json()["session_id"]], "the late session was stopped"


async def test_a_worker_the_script_finds_full_is_passed_over_for_one_with_room(make_hub, make_worker) -> None:
    """No 503 while a live worker has room: another hub took the nearest worker's only slot since this hub's board
    read, so the script refuses it, and the request goes on to the next worker instead of giving up."""
    hub = await make_hub(snapshot_refresh_s=60)  # this hub's mirror does not re-read on its own during the test
    near, far = await make_worker(max_streams=1), await make_worker(max_streams=1)
    await register(hub, "w-near", near, region="us-east-1")
    await register(hub, "w-far", far, region="eu-central-1")
    await refresh(hub)
    store = hub.app.state.hub.store
    assert (await store.reserve("w-near", "w-near~takenelsewhere", {"worker_id": "w-near"})).ok
    resp = await hub.post("/api/v1/sessions", json={"location": {"lat": 40.7, "lon": -74.0}})
    assert resp.status_code == 201, resp.text
    assert resp.json()["worker"]["id"] == "w-far" and near.dispatches == 0


async def test_a_late_placement_is_stopped_even_while_the_store_cannot_release_it(
    make_hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the store fails every release while the late session is undone: the worker is told to stop it
    first, so its next heartbeat frees the slot and the conversation keeps one session."""
    hub, worker, secret, late, taker = await a_late_placement_and_its_taker(make_hub, make_worker, monkeypatch)
    store = hub.app.state.hub.store
    release = store.release

    monkeypatch.setattr(store, "release", _unreachable)
    assert (await late).status_code == 503
    await wait_for(lambda: len(worker.sessions) == 1, 10, "the late session stopped")
    assert list(worker.sessions) == [taker.json()["session_id"]], "the late session was stopped"
    monkeypatch.setattr(store, "release", release)
    reply = await heartbeat_of(hub, "w-1", secret, worker)
    assert reply["used_streams"] == 1


async def test_a_placement_whose_final_claim_write_fails_is_undone(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """The session is placed and confirmed, then the store fails the write that points the conversation at it (the
    write never landed): the client gets a 503, and no session stays behind that no client could ever learn of. Nor
    does the pending claim, as when the placement itself fails: left behind, it made the client's retry wait it out
    (up to dispatch_timeout_s * max_dispatch_attempts + 2 s) before being placed."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store
    real = store.compare_and_set_claim

    async def final_write_fails(session_key: str, expected: str | None, new: str | None, ttl_s: float) -> Any:
        if new is not None and not new.startswith("pending:"):
            raise StoreUnavailable("the shared store is unreachable")
        return await real(session_key, expected, new, ttl_s)

    monkeypatch.setattr(store, "compare_and_set_claim", final_write_fails)
    resp = await hub.post("/api/v1/sessions", json={"session_key": "conv-1"})
    assert resp.status_code == 503 and resp.json()["error"] == "store_unavailable"
    monkeypatch.setattr(store, "compare_and_set_claim", real)
    await wait_for(lambda: worker.stopped, 2, "a stop")
    assert worker.sessions == {} and len(worker.stopped) == 1, "the placed session was stopped"
    reply = await heartbeat_of(hub, "w-1", secret, worker)
    assert reply["used_streams"] == 0
    await wait_for(lambda: not hub.app.state.hub.allocator._undoing, 10, "the undo")
    client = sync_redis(redis_url)
    assert client.exists(keys.session_key_claim("conv-1")) == 0, "the failed placement left its claim"
    retry = await hub.post("/api/v1/sessions", json={"session_key": "conv-1"})
    assert retry.status_code == 201, retry.text
    assert list(worker.sessions) == [retry.json()["session_id"]]


async def test_ending_a_session_survives_a_failing_claim_cleanup_and_a_lost_release_answer(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE: once the slot is released the session has ended, and the worker is told at once, even when the store
    then fails the session_key cleanup (204, not a 503 whose retry finds nothing). When the release's own answer is
    lost (a cluster does not resend), the answer is 503 but the worker is still told to stop and the slot is freed."""
    worker = await make_worker(max_streams=2)
    await register(hub, "w-1", worker)
    await refresh(hub)
    store = hub.app.state.hub.store
    real_cas, real_release = store.compare_and_set_claim, store.release

    async def cleanup_fails(session_key: str, expected: str | None, new: str | None, ttl_s: float) -> Any:
        if new is None:
            raise StoreUnavailable("the shared store is unreachable")
        return await real_cas(session_key, expected, new, ttl_s)

    async def answer_lost(worker_id: str, session_id: str) -> Any:
        await real_release(worker_id, session_id)
        raise StoreUnavailable("the shared store did not answer in time")

    first = (await hub.post("/api/v1/sessions", json={"session_key": "conv-1"})).json()["session_id"]
    monkeypatch.setattr(store, "compare_and_set_claim", cleanup_fails)
    assert (await hub.delete(f"/api/v1/sessions/{first}")).status_code == 204
    await wait_for(lambda: first in worker.stopped, 2, "the stop of the ended session")
    assert first not in worker.sessions, "the worker was told to stop the ended session"
    monkeypatch.setattr(store, "compare_and_set_claim", real_cas)
    second = await hub.post("/api/v1/sessions", json={"session_key": "conv-1"})
    assert second.status_code == 201, "the claim left behind points at an ended session and is replaced"

    sid = second.json()["session_id"]
    monkeypatch.setattr(store, "release", answer_lost)
    ended = await hub.delete(f"/api/v1/sessions/{sid}")
    assert ended.status_code == 503 and ended.json()["error"] == "store_unavailable"
    monkeypatch.setattr(store, "release", real_release)
    await wait_for(lambda: sid in worker.stopped, 2, "the stop after the lost answer")
    assert sid not in worker.sessions, "the worker was told to stop it all the same"
    fleet = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert fleet[0]["used_streams"] == 0


async def test_a_removal_whose_answer_was_lost_leaves_no_ghost_on_the_routing_board(hub: httpx.AsyncClient,
                                                                                    make_worker, redis_url) -> None:
    """The worker's keys went, but its board view stayed (the answer lost and the call resent, or the board write
    failed): other hubs kept routing to it and listing it, and nothing could remove it. Removing again completes it."""
    worker, other = await make_worker(), await make_worker()
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await register(hub, "w-2", other)
    client = sync_redis(redis_url)
    for wid in ("w-1", "w-2"):  # as if each removal ran, but only its own keys went
        client.delete(*keys.worker_keys(wid).as_list())
    gone = await hub.delete("/api/v1/workers/w-1", headers={**WORKER_AUTH, "X-Worker-Secret": secret})
    assert gone.status_code == 204
    assert (await hub.post("/api/v1/workers/w-2/forget", headers=ADMIN_AUTH)).status_code == 204
    assert client.hkeys(keys.BOARD.static) == []
    await refresh(hub)
    assert (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"] == []
    assert (await hub.post("/api/v1/workers/w-2/forget", headers=ADMIN_AUTH)).status_code == 404


async def test_a_board_that_lost_a_registration_has_the_worker_register_again(make_hub, make_worker,
                                                                              redis_url) -> None:
    """A failover of the board's shard lost its last writes: the worker's newer registration (new labels, more
    streams) while its own keys kept it. Hubs that had read it and hubs started after disagreed for good; the next
    heartbeat now has the worker register again, which every hub then reads."""
    hub = await make_hub()
    worker = await make_worker(max_streams=2)
    old = await register(hub, "w-1", worker, labels={"gpu": "a10"})
    client = sync_redis(redis_url)
    lost = {k: client.hget(k, "w-1") for k in (keys.BOARD.static, keys.BOARD.registered)}
    new = await hub.post("/api/v1/workers", json=registration("w-1", worker.url, labels={"gpu": "h100"}),
                         headers={**WORKER_AUTH, "X-Worker-Secret": old["worker_secret"]})
    assert new.status_code == 200
    for key, value in lost.items():  # the board's shard comes back without the re-registration's writes
        client.hset(key, "w-1", value)
    answer = await heartbeat(hub, "w-1", new.json()["worker_secret"], [])
    assert answer.status_code == 404, "the board's view is another registration's: register again"
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url, labels={"gpu": "h100"}),
                           headers={**WORKER_AUTH, "X-Worker-Secret": new.json()["worker_secret"]})
    assert (await heartbeat(hub, "w-1", again.json()["worker_secret"], [])).status_code == 200
    later = await make_hub()  # a hub started after the failover
    await refresh(later)
    placed = await later.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})
    assert placed.status_code == 201, placed.text


def fails_until(seconds: float, real: Any) -> Any:
    """``real``, raising StoreUnavailable for the first ``seconds`` (a Redis failover)."""
    until = asyncio.get_running_loop().time() + seconds

    async def step(*args: Any, **kwargs: Any) -> Any:
        if asyncio.get_running_loop().time() < until:
            raise StoreUnavailable("the shared store is unreachable")
        return await real(*args, **kwargs)

    return step


async def test_an_undo_outlasts_a_failover_that_also_hides_the_worker(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the undo tried the release five times (~3 s) and the stop once, ignoring its answer. When both
    failed, the worker kept reporting the session and its heartbeats renewed the lease for good: a slot held by a
    session no client knew of, and a log line saying the worker had been told."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    state = hub.app.state.hub
    store, workers = state.store, state.allocator.workers
    real_stop, stops = workers.stop, []

    async def stop_unanswered_twice(url: str, session_id: str) -> StopAnswer:
        stops.append(session_id)
        return StopAnswer.UNDELIVERED if len(stops) <= 2 else await real_stop(url, session_id)

    monkeypatch.setattr(store, "confirm", _unreachable)
    monkeypatch.setattr(store, "release", fails_until(4.0, store.release))
    monkeypatch.setattr(workers, "stop", stop_unanswered_twice)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
    await wait_for(lambda: worker.stopped, 10, "the stop, retried until the worker answered")
    assert not worker.sessions and len(stops) == 3
    await wait_for(lambda: not state.allocator._undoing, 12, "the release, retried until the store answered")
    assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 0


async def test_a_retry_is_not_handed_a_session_being_undone(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the final claim write landed but its answer was lost, so the placement was undone (the worker
    stopped it) while the claim and the lease stayed until a release got through: a retry of the conversation got
    200 and a token for a room with no agent."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store
    real_cas = store.compare_and_set_claim

    async def answer_lost(session_key: str, expected: str | None, new: str | None, ttl_s: float) -> Any:
        result = await real_cas(session_key, expected, new, ttl_s)
        if new is not None and not new.startswith("pending:"):
            raise StoreUnavailable("the answer was lost")  # the write itself landed
        return result

    monkeypatch.setattr(store, "compare_and_set_claim", answer_lost)
    monkeypatch.setattr(store, "release", fails_until(2.0, store.release))
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-9"})
    assert first.status_code == 503
    await wait_for(lambda: worker.stopped, 2, "the undo's stop")
    monkeypatch.setattr(store, "compare_and_set_claim", real_cas)
    for _ in range(50):  # the client retries while the store fails (503 store_unavailable)
        retry = await hub.post("/api/v1/sessions", json={"session_key": "conv-9"})
        if retry.status_code != 503:
            break
        await asyncio.sleep(0.1)
    assert retry.status_code == 201, retry.text  # a new placement, never 200 with the stopped session
    assert list(worker.sessions) == [retry.json()["session_id"]]
    await wait_for(lambda: not hub.app.state.hub.allocator._undoing, 8, "the undo's end")
    assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 1  # the retry's only
    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-9"})
    assert again.status_code == 200 and again.json()["session_id"] == retry.json()["session_id"]


async def test_a_placement_that_finds_no_worker_leaves_no_claim_for_the_retry_to_wait_out(
        hub: httpx.AsyncClient, make_worker, redis_url: str) -> None:
    """A session_key request that fails (no capacity, the store) releases its pending claim: the client's retry is
    placed at once when capacity is back, rather than waiting the claim out and getting `session_pending`."""
    refused = await hub.post("/api/v1/sessions", json={"session_key": "conv-retry"})
    assert refused.status_code == 503 and refused.json()["error"] == "no_capacity"
    client = sync_redis(redis_url)
    assert client.exists(keys.session_key_claim("conv-retry")) == 0, "the failed placement left its claim"
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    started = asyncio.get_running_loop().time()
    placed = await hub.post("/api/v1/sessions", json={"session_key": "conv-retry"})
    assert placed.status_code == 201, placed.text
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_a_session_from_a_hub_that_recorded_no_identity_is_handed_to_whoever_names_one(
        hub: httpx.AsyncClient, make_worker, redis_url: str) -> None:
    """Records made before identities were stored have none: a retry naming one gets the same session with a token
    for that identity, not a 409 as if the conversation were someone else's."""
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-old"})
    assert first.status_code == 201
    session_id = first.json()["session_id"]
    client = sync_redis(redis_url, decode_responses=True)
    sessions = keys.worker_keys("w-1").sessions
    record = json.loads(client.hget(sessions, session_id))
    del record["identity"]
    client.hset(sessions, session_id, json.dumps(record))
    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-old", "identity": "bob"})
    assert again.status_code == 200, again.text
    assert again.json()["session_id"] == session_id
    assert api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(again.json()["livekit"]["token"]).identity \
        == "bob"


async def test_a_worker_that_stopped_heartbeating_offers_no_free_streams_in_any_view(make_hub, make_worker) -> None:
    """An SRE (and the capacity dashboards) must not count room on a worker the router will never use: once its TTL
    has passed, the list and the worker's own view show it stale with no free stream, however few it used."""
    hub = await make_hub(worker_ttl_s=0.5)
    worker = await make_worker()
    await register(hub, "w-gone", worker)
    await asyncio.sleep(0.7)  # no heartbeat since: past its TTL
    await refresh(hub)
    [listed] = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    one = (await hub.get("/api/v1/workers/w-gone", headers=ADMIN_AUTH)).json()
    assert (listed["alive"], one["alive"]) == (False, False)
    assert 0.6 <= listed["heartbeat_age_s"] < 30 and 0.6 <= one["heartbeat_age_s"] < 30  # seconds, as documented
    assert (listed["free_streams"], one["free_streams"]) == (0, 0), "a dead worker was shown with room"
    assert (await hub.get("/api/v1/fleet", headers=ADMIN_AUTH)).json()["total"]["free_streams"] == 0
    # What the CLI and the dashboard show, and what ?state= filters on, is in the JSON too: a script selecting
    # the stale workers of the listing found none, since their `state` is still the one they registered with.
    assert (listed["state"], listed["status"], one["status"]) == ("ready", "stale", "stale")
    [stale] = (await hub.get("/api/v1/workers", params={"state": "stale"}, headers=ADMIN_AUTH)).json()["workers"]
    assert stale["status"] == "stale"
    assert (await hub.get("/api/v1/workers", params={"state": "ready"}, headers=ADMIN_AUTH)).json()["workers"] == []


async def test_a_session_listing_for_a_worker_outside_the_region_asked_for_is_a_404(hub: httpx.AsyncClient,
                                                                                   make_worker) -> None:
    """``?worker_id=&region=`` names one worker in one region: a worker in another region is not found, rather than
    listed as if it were in the region the SRE asked about."""
    worker = await make_worker()
    await register(hub, "w-east", worker, region="us-east-1")
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    mine = await hub.get("/api/v1/sessions", params={"worker_id": "w-east", "region": "us-east-1"},
                         headers=ADMIN_AUTH)
    assert mine.status_code == 200 and len(mine.json()["sessions"]) == 1
    other = await hub.get("/api/v1/sessions", params={"worker_id": "w-east", "region": "eu-west-1"},
                          headers=ADMIN_AUTH)
    assert other.status_code == 404, other.text


async def test_a_session_key_remembers_its_session_for_the_affinity_ttl_not_the_claims(
        make_hub, make_worker, redis_url: str) -> None:
    """``FLEET_AFFINITY_TTL_S`` is how long a conversation finds its session again. Left with the pending claim's
    few seconds, the next request for the key would find nothing and place a second session for it."""
    hub = await make_hub(affinity_ttl_s=600, dispatch_timeout_s=0.2, max_dispatch_attempts=1)  # a 2.2 s claim
    worker = await make_worker()
    await register(hub, "w-1", worker)
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={"session_key": "conv-long"})).status_code == 201
    client = sync_redis(redis_url)
    remembered_ms = client.pttl(keys.session_key_claim("conv-long"))
    assert 590_000 < remembered_ms <= 600_000


async def test_a_session_key_placement_that_falls_through_slow_workers_keeps_its_claim(
        make_hub, make_worker) -> None:
    """The pending claim outlasts every dispatch the placement may make: a placement that waited out two workers
    that never answered, then was taken by a slow third, is the conversation's (201), not a 503 session_pending
    for a claim that lapsed on the way, with the placed session undone."""
    hub = await make_hub(dispatch_timeout_s=1.5, max_dispatch_attempts=3, worker_ttl_s=30)
    slow = [await make_worker(mode="hang"), await make_worker(mode="hang"), await make_worker(delay_s=1.1)]
    for wid, w, region in (("w-hang-1", slow[0], "us-east-1"), ("w-hang-2", slow[1], "us-east-1"),
                           ("w-slow", slow[2], "eu-west-1")):  # farther from the user: tried last
        await register(hub, wid, w, region=region)
    await refresh(hub)
    placed = await hub.post("/api/v1/sessions", json={"session_key": "conv-slow",
                                                      "location": {"lat": 40.7, "lon": -74.0}})
    assert placed.status_code == 201, placed.text
    assert placed.json()["worker"]["id"] == "w-slow" and slow[0].dispatches == slow[1].dispatches == 1
    assert list(slow[2].sessions) == [placed.json()["session_id"]] and not slow[2].stopped
    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-slow"})
    assert again.status_code == 200 and again.json()["session_id"] == placed.json()["session_id"]


async def test_a_session_key_request_the_store_fails_mid_placement_leaves_no_claim_for_the_retry_to_wait_out(
        hub, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """As with no capacity: the store fails the confirmation, the client gets 503 store_unavailable, and its retry is
    placed at once rather than waiting out a pending claim and getting session_pending."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store
    confirm = store.confirm

    monkeypatch.setattr(store, "confirm", _unreachable)
    failed = await hub.post("/api/v1/sessions", json={"session_key": "conv-confirm"})
    assert failed.status_code == 503 and failed.json()["error"] == "store_unavailable"
    monkeypatch.setattr(store, "confirm", confirm)
    retry = await hub.post("/api/v1/sessions", json={"session_key": "conv-confirm"})
    assert retry.status_code == 201, retry.text
    await wait_for(lambda: not hub.app.state.hub.allocator._undoing, 2, "the undo of the failed placement")
    assert list(worker.sessions) == [retry.json()["session_id"]]
    assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 1


async def test_a_conversation_whose_move_the_store_failed_moves_on_the_retry(
        make_hub, make_worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving a dead worker's conversation releases its old session first; when the store fails that release the
    client gets 503 store_unavailable, and the key is not left pending: the retry moves it at once."""
    hub = await make_hub(worker_ttl_s=1.0)
    dead, alive = await make_worker(), await make_worker()
    await register(hub, "w-dead", dead)
    await refresh(hub)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-move"})
    assert first.status_code == 201 and first.json()["worker"]["id"] == "w-dead"
    store = hub.app.state.hub.store
    async with asyncio.timeout(5):  # w-dead sends no heartbeat: its TTL passes
        while (await store.read_session("w-dead", first.json()["session_id"])).worker_alive:
            await asyncio.sleep(0.05)
    secret = (await register(hub, "w-alive", alive, region="us-west-2"))["worker_secret"]
    await refresh(hub)
    release = store.release

    monkeypatch.setattr(store, "release", _unreachable)
    failed = await hub.post("/api/v1/sessions", json={"session_key": "conv-move"})
    assert failed.status_code == 503 and failed.json()["error"] == "store_unavailable"
    monkeypatch.setattr(store, "release", release)
    await heartbeat(hub, "w-alive", secret, list(alive.sessions))
    moved = await hub.post("/api/v1/sessions", json={"session_key": "conv-move"})
    assert moved.status_code == 201, moved.text
    assert moved.json()["worker"]["id"] == "w-alive" and not alive.stopped


async def test_a_session_key_made_without_an_identity_lets_in_no_one_who_names_another(hub: httpx.AsyncClient,
                                                                                      make_worker: Any) -> None:
    """The user who gave no identity got one (``user-…``), and that one is the conversation's participant: a request
    with the key naming someone else is refused, not handed a token into the room."""
    worker = await make_worker(max_streams=3)
    await register(hub, "w-1", worker)
    await refresh(hub)
    verifier = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon"})
    assert first.status_code == 201, first.text
    owner = verifier.verify(first.json()["livekit"]["token"]).identity
    assert owner.startswith("user-")

    other = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon", "identity": "mallory"})
    assert other.status_code == 409 and other.json()["error"] == "session_key_in_use", other.text
    same = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon", "identity": owner})
    assert same.status_code == 200 and verifier.verify(same.json()["livekit"]["token"]).identity == owner
    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon"})
    assert again.status_code == 200 and verifier.verify(again.json()["livekit"]["token"]).identity == owner
    assert len(worker.sessions) == 1
    metrics = (await hub.get("/metrics")).text  # an SRE's count of reuses is not one of new sessions
    assert 'fleet_allocations_total{outcome="created"} 1.0' in metrics
    assert 'fleet_allocations_total{outcome="reused"} 2.0' in metrics


async def test_a_reused_session_keys_token_joins_the_same_room_and_says_when_it_expires(
        hub: httpx.AsyncClient, make_worker: Any, redis_url: str) -> None:
    """The fresh token is for the conversation's own room (where its agent waits), as its participant, and the
    answer's expires_at is that token's own expiry, not the first token's."""
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-room", "identity": "carol"})
    assert first.status_code == 201
    session_id = first.json()["session_id"]
    client = sync_redis(redis_url, decode_responses=True)
    sessions = keys.worker_keys("w-1").sessions  # the first token was minted an hour ago
    record = json.loads(client.hget(sessions, session_id))
    record["expires_at"] = datetime.fromisoformat(record["expires_at"]).replace(year=2000).isoformat()
    client.hset(sessions, session_id, json.dumps(record))

    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-room", "identity": "carol"})
    assert again.status_code == 200, again.text
    claims = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET).verify(again.json()["livekit"]["token"])
    assert claims.identity == "carol"
    room = first.json()["livekit"]["room"]
    assert claims.video.room_join and claims.video.room == again.json()["livekit"]["room"] == room
    expires_at = datetime.fromisoformat(again.json()["expires_at"])
    assert int(expires_at.timestamp()) == jwt.decode(again.json()["livekit"]["token"],
                                                     options={"verify_signature": False})["exp"]


async def test_a_request_cancelled_while_its_worker_takes_the_session_leaves_nothing_running(
        hub: httpx.AsyncClient, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request goes away (a cancelled task, a hub shutting down) after the worker took the session but before it
    was confirmed: no client will learn of it, so the worker is told to stop it and the slot is released."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    store = hub.app.state.hub.store
    confirming = asyncio.Event()

    async def confirm_never_answers(*args: object, **kwargs: object) -> bool:
        confirming.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(store, "confirm", confirm_never_answers)
    request = asyncio.create_task(hub.post("/api/v1/sessions", json={}))
    await confirming.wait()
    assert len(worker.sessions) == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await wait_for(lambda: worker.stopped, 2, "the stop of the session no client knows of")
    await wait_for(lambda: not hub.app.state.hub.allocator._undoing, 10, "the undo")
    assert not worker.sessions
    assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 0


async def test_a_stop_that_could_not_reach_its_worker_is_logged_without_the_session_id(
        caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who reads the hub's log must not be able to end the session: the line names its worker and the start
    of its random part."""
    caplog.set_level("INFO", logger="hub.dispatch")
    client = WorkerClient(WORKER_TOKEN, timeout_s=2.0)
    try:
        answer = await client.stop(f"http://127.0.0.1:{free_port()}", "w-1~unreachAbCdEf0123")
    finally:
        await client.aclose()
    assert answer is StopAnswer.UNDELIVERED
    assert "stopping w-1~unre… on" in caplog.text and "unreachAbCdEf0123" not in caplog.text, caplog.text


async def test_the_hub_reads_each_worker_answer_for_what_it_means(make_worker: Any) -> None:
    """A dispatch or stop the worker did not answer in time is neither an acceptance nor a stop: counted as either,
    a session would run on a worker that no client, or no slot, knows of. A 404 to a stop is delivered (nothing
    runs there); a 409 is full, a 5xx a refusal (the hub stops what it may have started)."""
    taking, hanging = await make_worker(), await make_worker(mode="hang", stop_delay_s=30)
    full, failing = await make_worker(mode="full"), await make_worker(mode="error")
    client = WorkerClient(WORKER_TOKEN, timeout_s=0.3)

    def body(session_id: str) -> SessionDispatch:
        return SessionDispatch(session_id=session_id, session_key=None, room=f"fleet-{session_id}",
                               livekit_url="wss://lk.example", token="agent-token")

    try:
        taking.heartbeat_seq = 0
        accepted = await client.dispatch(taking.url, body("w-1~taken"))
        assert (accepted.outcome, accepted.accepted_at_seq) == (DispatchOutcome.ACCEPTED, 0)
        assert await client.stop(taking.url, "w-1~taken") is StopAnswer.STOPPED
        assert await client.stop(taking.url, "w-1~taken") is StopAnswer.NOT_RUNNING
        assert StopAnswer.NOT_RUNNING.delivered and not StopAnswer.UNDELIVERED.delivered
        assert (await client.dispatch(hanging.url, body("w-2~hung"))).outcome is DispatchOutcome.TIMEOUT
        assert await client.stop(hanging.url, "w-2~hung") is StopAnswer.UNDELIVERED
        assert (await client.dispatch(full.url, body("w-3~full"))).outcome is DispatchOutcome.FULL
        assert (await client.dispatch(failing.url, body("w-4~boom"))).outcome is DispatchOutcome.REFUSED
        # A URL the client cannot use (kept from before registration refused such URLs): unreachable, not a 500.
        assert (await client.dispatch("http://a..b:8000", body("w-5~bad"))).outcome is DispatchOutcome.UNREACHABLE
        assert await client.stop("http://user:pass@10.0.0.5:8000", "w-5~bad") is StopAnswer.UNDELIVERED
    finally:
        await client.aclose()



async def test_the_sre_session_list_is_oldest_first(hub: httpx.AsyncClient, make_worker) -> None:
    """`fleet sessions` and the dashboard show sessions in the order they were placed, whichever worker holds them."""
    await register(hub, "w-b", await make_worker())
    await register(hub, "w-a", await make_worker())
    await refresh(hub)
    placed = []
    for _ in range(4):
        resp = await hub.post("/api/v1/sessions", json={})
        assert resp.status_code == 201, resp.text
        placed.append(resp.json()["session_id"])
    listed = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]
    assert [s["session_id"] for s in listed] == placed
    assert len({s["worker_id"] for s in listed}) == 2, "the sessions were meant to span both workers"


async def test_forgetting_a_live_worker_is_a_409_that_leaves_it_in_place(hub: httpx.AsyncClient, make_worker) -> None:
    """`fleet forget` on a worker that still heartbeats is refused with 409 ``worker_alive`` (it would register again
    at its next heartbeat); the worker stays listed and placeable."""
    await register(hub, "w-live", await make_worker())
    refused = await hub.post("/api/v1/workers/w-live/forget", headers=ADMIN_AUTH)
    assert refused.status_code == 409 and refused.json()["error"] == "worker_alive", refused.text
    await refresh(hub)
    assert [w["worker_id"] for w in (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]] == [
        "w-live"]
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201


async def test_an_ended_session_is_stopped_at_the_url_its_worker_registered_whatever_this_hubs_board_says(
    hub, make_worker
) -> None:
    """DELETE tells the worker through the URL in the store when this hub's board has no URL for the worker yet, or
    an old one (the worker registered again at a new address since the last refresh). Guards against a stop that
    went only to the board's URL, or nowhere: the worker ran the ended session until a heartbeat reconciled it."""
    worker = await make_worker(max_streams=2)
    await register(hub, "w-1", worker)
    await refresh(hub)
    board = hub.app.state.hub.board
    unknown = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    moved = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    entry = board.entries.pop("w-1")  # not read by this hub yet
    assert (await hub.delete(f"/api/v1/sessions/{unknown}")).status_code == 204
    await wait_for(lambda: unknown in worker.stopped, 5, "the stop of a session on a worker the board lacks")

    entry.url = f"http://127.0.0.1:{free_port()}"  # the address it had before it registered again
    board.entries["w-1"] = entry
    assert (await hub.delete(f"/api/v1/sessions/{moved}")).status_code == 204
    await wait_for(lambda: moved in worker.stopped, 5, "the stop at the worker's registered URL")
    assert worker.sessions == {}


async def test_ending_a_session_waits_about_a_second_for_its_worker_not_the_whole_stop_timeout(
    make_hub, make_worker
) -> None:
    """A worker that takes longer than a second to stop a session does not hold the DELETE for the whole
    dispatch timeout: the slot is freed and the stop finishes in the background."""
    hub = await make_hub(dispatch_timeout_s=8.0)
    worker = await make_worker(max_streams=1, stop_delay_s=5.0)
    await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
    assert not worker.stopped, "the DELETE waited for the worker's slow stop"
    await wait_for(lambda: worker.stopped == [sid], 10, "the stop, finished in the background")


async def test_ending_a_session_whose_worker_and_store_both_fail_is_finished_in_the_background(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE during a Redis failover, with the worker's stop lost too: the client gets 503, and the hub keeps
    telling the worker to stop and retrying the release until both land. Guards against leaving it there: the
    worker kept running the session and reporting it, and its heartbeats renewed a slot no client held."""
    worker = await make_worker(max_streams=2)
    secret = (await register(hub, "w-1", worker))["worker_secret"]
    await refresh(hub)
    state = hub.app.state.hub
    store, workers = state.store, state.allocator.workers
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    real_stop, stops = workers.stop, []

    async def first_stop_lost(url: str, session_id: str) -> StopAnswer:
        stops.append(session_id)
        return StopAnswer.UNDELIVERED if len(stops) == 1 else await real_stop(url, session_id)

    monkeypatch.setattr(workers, "stop", first_stop_lost)
    monkeypatch.setattr(store, "release", fails_until(1.0, store.release))
    ended = await hub.delete(f"/api/v1/sessions/{sid}")
    assert ended.status_code == 503 and ended.json()["error"] == "store_unavailable"
    await wait_for(lambda: sid in worker.stopped, 10, "the stop, retried until the worker answered")
    await wait_for(lambda: not state.allocator._undoing, 10, "the release, retried until the store answered")
    assert (await heartbeat_of(hub, "w-1", secret, worker))["used_streams"] == 0


async def test_an_end_the_hub_gives_up_on_is_logged_without_the_session_id(
    hub, make_worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The id ends the session, and anyone who reads the hub's log is not meant to: the warnings of an end that could
    neither reach the worker nor the store name the session by its worker and the start of its random part."""
    worker = await make_worker()
    await register(hub, "w-1", worker)
    await refresh(hub)
    state = hub.app.state.hub
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]

    async def undelivered(url: str, session_id: str) -> StopAnswer:
        return StopAnswer.UNDELIVERED

    async def store_down(worker_id: str, session_id: str) -> Any:
        raise StoreUnavailable("failover")

    monkeypatch.setattr(allocator_module, "_UNDO_WINDOW_S", 0.05)
    monkeypatch.setattr(state.allocator.workers, "stop", undelivered)
    monkeypatch.setattr(state.store, "release", store_down)
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 503
    await wait_for(lambda: "could not tell" in caplog.text and "could not release" in caplog.text, 10,
                   "the warnings of an end given up on")
    assert keys.shown_session_id(sid) in caplog.text and sid not in caplog.text, caplog.text


async def test_labels_no_worker_has_are_refused_as_such_not_as_a_full_fleet(hub: httpx.AsyncClient,
                                                                             make_worker) -> None:
    """``no_capacity`` with Retry-After: 1 told a client to retry a request that no retry could place, forever, and
    counted it as the fleet being full. Labels that some worker has, on a worker that is full, are still that."""
    worker = await make_worker(max_streams=1)
    await register(hub, "w-1", worker, labels={"gpu": "a10g", "tier": "gold"})
    await refresh(hub)
    nobody = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100", "tier": "gold"}})
    assert nobody.status_code == 503 and "retry-after" not in nobody.headers, nobody.headers
    assert nobody.json() == {"error": "no_matching_worker",
                             "message": "No live worker has the labels gpu=h100, tier=gold."}

    assert (await hub.post("/api/v1/sessions", json={"labels": {"gpu": "a10g"}})).status_code == 201
    full = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "a10g"}})
    assert full.status_code == 503 and full.json()["error"] == "no_capacity" and full.headers["retry-after"] == "1"
    metrics = (await hub.get("/metrics")).text
    assert 'fleet_allocations_total{outcome="no_matching_worker"} 1.0' in metrics
    assert 'fleet_allocations_total{outcome="no_capacity"} 1.0' in metrics


async def test_a_worker_that_registers_with_the_labels_asked_for_is_found_at_once(make_hub, make_worker) -> None:
    """The refusal is decided after the board is read again, so a worker another hub just registered is no
    ``no_matching_worker``."""
    hub, other = await make_hub(), await make_hub()
    worker = await make_worker()
    await refresh(hub)
    await register(other, "w-new", worker, labels={"gpu": "h100"})
    placed = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})
    assert placed.status_code == 201, placed.text


async def test_a_user_who_gave_no_identity_is_named_after_the_room_on_every_token(
        hub: httpx.AsyncClient, make_worker, redis_url: str) -> None:
    """The default identity is drawn from the room, like the agent's, so no part of the session id shows in the
    room; and a retry of a conversation whose record holds no identity (made by an older hub, whose room was named
    after the same random part) is let in under the name its first token had, not as a second participant."""
    await register(hub, "w-1", await make_worker(max_streams=2))
    await refresh(hub)
    verifier = api.TokenVerifier(DEV_LIVEKIT_KEY, DEV_LIVEKIT_SECRET)
    first = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon-room"})
    assert first.status_code == 201, first.text
    room, session_id = first.json()["livekit"]["room"], first.json()["session_id"]
    assert room.startswith("fleet-") and len(bytes.fromhex(room.removeprefix("fleet-"))) == 12  # 96 random bits
    identity = verifier.verify(first.json()["livekit"]["token"]).identity
    assert identity == f"user-{room.removeprefix('fleet-')[:8]}"
    assert not any(part in identity for part in session_id.split(keys.SESSION_ID_SEPARATOR))

    client = sync_redis(redis_url, decode_responses=True)
    sessions = keys.worker_keys("w-1").sessions
    record = json.loads(client.hget(sessions, session_id))
    del record["identity"]
    client.hset(sessions, session_id, json.dumps(record))
    again = await hub.post("/api/v1/sessions", json={"session_key": "conv-anon-room"})
    assert again.status_code == 200 and again.json()["session_id"] == session_id, again.text
    assert verifier.verify(again.json()["livekit"]["token"]).identity == identity


async def test_labels_of_any_one_worker_count_while_it_is_drained_and_not_once_it_has_left(hub: httpx.AsyncClient,
                                                                                       make_worker) -> None:
    """Labels one worker has, on a full or drained worker, are asked again later (``no_capacity``, Retry-After): the
    drain ends. Once the only worker with them has deregistered, no retry places the session
    (``no_matching_worker``)."""
    a10g, h100 = await make_worker(max_streams=1), await make_worker(max_streams=1)
    reg = await register(hub, "w-a10g", a10g, labels={"gpu": "a10g"})
    await register(hub, "w-h100", h100, labels={"gpu": "h100"})
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})).status_code == 201
    full = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})
    assert full.status_code == 503 and full.json()["error"] == "no_capacity", full.text

    assert (await hub.post("/api/v1/workers/w-a10g/drain", headers=ADMIN_AUTH)).status_code == 200
    await refresh(hub)
    drained = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "a10g"}})
    assert drained.status_code == 503 and drained.json()["error"] == "no_capacity", drained.text
    assert drained.headers["retry-after"] == "1"

    left = await hub.delete("/api/v1/workers/w-a10g", headers={**WORKER_AUTH, "X-Worker-Secret": reg["worker_secret"]})
    assert left.status_code == 204
    await refresh(hub)
    gone = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "a10g"}})
    assert gone.status_code == 503 and gone.json()["error"] == "no_matching_worker", gone.text
    assert "retry-after" not in gone.headers


async def test_labels_only_a_silent_worker_has_are_no_matching_worker_until_it_heartbeats_again(
        hub: httpx.AsyncClient, make_worker) -> None:
    """A worker that stopped heartbeating (its group scaled in, its instance died) stays on the board until
    retention, an hour by default. Counting its labels told clients to retry every second for that hour
    (``no_capacity``, Retry-After: 1); its labels are on offer again once it heartbeats."""
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-h100", worker, labels={"gpu": "h100"})
    await asyncio.sleep(2.2)  # the test TTL is 2 s
    await refresh(hub)
    silent = await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})
    assert silent.status_code == 503 and silent.json()["error"] == "no_matching_worker", silent.text
    assert "retry-after" not in silent.headers
    listed = (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
    assert [w["status"] for w in listed] == ["stale"]  # still on the board: only its labels are not offered

    await heartbeat_of(hub, "w-h100", reg["worker_secret"], worker)
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={"labels": {"gpu": "h100"}})).status_code == 201


async def test_labels_asked_together_must_be_one_workers(hub: httpx.AsyncClient, make_worker) -> None:
    """``gpu=a10g`` on one worker and ``tier=silver`` on another place no session asking for both: that is
    ``no_matching_worker``, not a full fleet to retry forever."""
    await register(hub, "w-gold", await make_worker(max_streams=1), labels={"gpu": "a10g", "tier": "gold"})
    await register(hub, "w-silver", await make_worker(max_streams=1), labels={"gpu": "h100", "tier": "silver"})
    await refresh(hub)
    for labels in ({"gpu": "a10g", "tier": "silver"}, {"tier": "silver", "gpu": "a10g"}):
        both = await hub.post("/api/v1/sessions", json={"labels": labels})
        assert both.status_code == 503 and both.json() == {
            "error": "no_matching_worker", "message": "No live worker has the labels gpu=a10g, tier=silver."}, both.text


async def test_ending_a_session_the_hub_does_not_hold_never_reaches_its_worker(hub: httpx.AsyncClient,
                                                                              make_worker: Any) -> None:
    """The client routes take no credential: a DELETE of a made-up id naming a real worker was relayed to that
    worker, with the fleet token, as fast as anyone could send them."""
    worker = await make_worker()
    await register(hub, "w-1", worker)
    await refresh(hub)
    for i in range(5):
        resp = await hub.delete(f"/api/v1/sessions/w-1~madeup{i:05d}")
        assert resp.status_code == 404 and resp.json()["error"] == "session_not_found"
    await asyncio.sleep(0.2)
    assert worker.stopped == []


async def test_a_worker_is_never_given_the_session_key(hub: httpx.AsyncClient, make_worker: Any) -> None:
    """The key joins the conversation as its owner; the agent does not need it, and the worker's own GET /sessions
    would show it to anyone holding the fleet token."""
    worker = await make_worker()
    await register(hub, "w-1", worker)
    await refresh(hub)
    created = await hub.post("/api/v1/sessions", json={"session_key": "conversation-7f3a9c1e5b2d"})
    assert created.status_code == 201, created.text
    dispatched = worker.sessions[created.json()["session_id"]]
    assert "conversation-7f3a9c1e5b2d" not in json.dumps(dispatched), dispatched

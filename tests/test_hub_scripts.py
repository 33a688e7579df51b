"""Each session script's own checks, at the store, against a real Redis.

The routing board is a hint that may be a refresh behind, so the scripts re-check what they act on: a reservation
the worker's liveness and state, a confirmation that its pending lease is still held. A hub whose board says
"ready" must still not place a session on a worker that died or was drained a moment ago.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from hub.store import RELEASE_RECEIPT_MS, _lease_status
from shared import keys
from shared.auth import digest
from shared.models import SessionStatus
from tests.conftest import registered_store, sync_redis


def _redis_now_ms() -> int:
    return int(time.time() * 1000)  # the test's redis-server runs on this machine's clock


async def test_a_reservation_rechecks_liveness_and_state_whatever_the_board_says(redis_url: str) -> None:
    store, secrets = await registered_store(redis_url, 4, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-000", "w-000~liveready1", {})).ok, "a live, ready worker takes a session"

        # w-001 died: its last sign of life is older than the TTL, though no hub has noticed yet.
        r.hset(keys.worker_keys("w-001").info, "hb", _redis_now_ms() - store.settings.ttl_ms - 1000)
        stale = await store.reserve("w-001", "w-001~diedjust01", {})
        assert (stale.ok, stale.reason) == (False, "stale")

        # w-002 was drained by an SRE a moment ago.
        assert await store.set_drain("w-002", True) == "draining"
        drained = await store.reserve("w-002", "w-002~sredrain01", {})
        assert (drained.ok, drained.reason) == (False, "draining")

        # w-003 drains itself (it is leaving) and said so in its heartbeat.
        beat = await store.heartbeat("w-003", digest(secrets["w-003"]), "draining", "{}", [])
        assert beat.status == 1
        leaving = await store.reserve("w-003", "w-003~leaving001", {})
        assert (leaving.ok, leaving.reason) == (False, "draining")

        assert await store.set_drain("w-002", False) == "ready"
        assert (await store.reserve("w-002", "w-002~resumed001", {})).ok, "a resume makes it routable again"
    finally:
        await store.close()
    held = {f"w-{i:03d}": r.zrange(keys.worker_keys(f"w-{i:03d}").leases, 0, -1) for i in range(4)}
    assert held == {"w-000": ["w-000~liveready1"], "w-001": [], "w-002": ["w-002~resumed001"], "w-003": []}


async def test_a_pending_lease_past_its_expiry_cannot_be_confirmed(redis_url: str) -> None:
    """A dispatch that outlasted its pending lease is not confirmed: the slot counted as free from the lease's
    expiry on, and the hub stops the session on the worker instead."""
    store, _ = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    leases = keys.worker_keys("w-000").leases
    try:
        assert (await store.reserve("w-000", "w-000~slowdisp01", {})).ok
        assert (await store.reserve("w-000", "w-000~intime0001", {})).ok
        r.zadd(leases, {"w-000~slowdisp01": _redis_now_ms() - 1})  # its pending lease lapsed meanwhile
        assert not await store.confirm("w-000", "w-000~slowdisp01")
        assert await store.confirm("w-000", "w-000~intime0001")
    finally:
        await store.close()
    assert float(r.zscore(leases, "w-000~slowdisp01") or 0) < _redis_now_ms(), "the lapsed lease was not renewed"
    assert r.hkeys(keys.worker_keys("w-000").active) == ["w-000~intime0001"]


async def test_a_heartbeat_drops_a_lapsed_pending_lease_and_keeps_a_live_worker(redis_url: str) -> None:
    """A reservation whose dispatch never confirmed, and that the worker does not report, frees its slot at the next
    heartbeat: the board then offers it again (a full-looking worker gets no reservation, whose script would purge
    it). And each heartbeat pushes the worker's keys' expiry back to the full retention."""
    store, secrets = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    worker = keys.worker_keys("w-000")
    try:
        assert (await store.reserve("w-000", "w-000~neverconf1", {})).ok
        r.zadd(worker.leases, {"w-000~neverconf1": _redis_now_ms() - 1})
        r.pexpire(worker.info, 5_000)  # as if the worker had been registered for nearly the whole retention
        beat = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", [])
        assert (beat.status, beat.used) == (1, 0)
    finally:
        await store.close()
    assert r.zcard(worker.leases) == 0 and r.hlen(worker.sessions) == 0
    assert r.pttl(worker.info) > store.settings.retention_s * 1000 - 60_000, "a live worker's keys outlive retention"


async def test_a_release_counts_only_the_leases_a_reservation_would(redis_url: str) -> None:
    store, _ = await registered_store(redis_url, 1, max_streams=3)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        for sid in ("w-000~lapsedpend", "w-000~endingnow1"):
            assert (await store.reserve("w-000", sid, {"sid": sid})).ok
        r.zadd(keys.worker_keys("w-000").leases, {"w-000~lapsedpend": _redis_now_ms() - 1})
        released = await store.release("w-000", "w-000~endingnow1")
        assert released.held and released.record == {"sid": "w-000~endingnow1"}
        assert released.used == 0, "the board is told what the next reservation will count"
    finally:
        await store.close()


async def test_a_dead_workers_lapsed_session_is_not_found(redis_url: str) -> None:
    """GET /api/v1/sessions/{id} of a session whose worker died and whose lease lapsed is a 404, not a session a
    client would try to join."""
    store, _ = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    worker = keys.worker_keys("w-000")
    try:
        assert (await store.reserve("w-000", "w-000~deadworker", {"room": "r"})).ok
        assert await store.confirm("w-000", "w-000~deadworker")
        found = await store.read_session("w-000", "w-000~deadworker")
        assert found is not None and found.status == "active" and found.worker_alive
        r.zadd(worker.leases, {"w-000~deadworker": _redis_now_ms() - 1})
        assert (await store.read_session("w-000", "w-000~deadworker")) is not None, "a live worker may renew it"
        r.hset(worker.info, "hb", _redis_now_ms() - store.settings.ttl_ms - 1000)
        assert await store.read_session("w-000", "w-000~deadworker") is None
    finally:
        await store.close()


async def test_a_deregistration_takes_everything_the_worker_held(redis_url: str) -> None:
    """A worker that deregisters and comes back under the same id starts with all its slots free."""
    store, secrets = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-000", "w-000~beforegone", {"room": "r"})).ok
        assert await store.confirm("w-000", "w-000~beforegone")
        assert await store.deregister("w-000", "not-its-secret") == -1
        assert await store.deregister("w-000", secrets["w-000"]) == 1
    finally:
        await store.close()
    assert [r.exists(key) for key in keys.worker_keys("w-000").as_list()] == [0, 0, 0, 0]


async def test_a_redis_clock_that_went_back_does_not_empty_a_clients_bucket(redis_url: str) -> None:
    """After a failover to a replica whose clock is behind, a bucket last refilled 'in the future' is not drained by
    the negative time since: the client keeps the tokens it had."""
    store, _ = await registered_store(redis_url, 0)
    r = sync_redis(redis_url, decode_responses=True)
    bucket = keys.rate_limit_bucket("client-1")
    try:
        r.hset(bucket, mapping={"tokens": "5", "at": str(_redis_now_ms() + 5_000)})
        assert await store.take_token("client-1", 5, 10) == 0.0
    finally:
        await store.close()
    assert 3.9 < float(r.hget(bucket, "tokens")) < 4.1


async def test_a_reservation_refused_as_full_corrects_the_board(redis_url: str) -> None:
    """A board that shows room the worker does not have (a write lost in a failover, or a hub a refresh behind)
    would send every request to a full worker until its next heartbeat: the refusal itself writes the true count."""
    store, _ = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-000", "w-000~fullone001", {})).ok
        assert (await store.reserve("w-000", "w-000~fulltwo001", {})).ok
        r.hset(keys.BOARD.used, "w-000", 0)  # the board lost its count
        refused = await store.reserve("w-000", "w-000~onetoomany", {})
        assert (refused.ok, refused.reason, refused.used) == (False, "full", 2)
        assert r.hget(keys.BOARD.used, "w-000") == "2", "the refusal left the board showing room"
    finally:
        await store.close()


async def test_a_resent_confirmation_leaves_the_session_judged_by_the_workers_number(redis_url: str) -> None:
    """redis-py resends a confirmation whose reply timed out, though Redis already ran it. The resend must leave the
    record as one confirmation made it ('<at>:<accepted_at_seq>'): heartbeats judge the session by that number, an
    earlier one proving nothing and a later one without the session ending it (a record the heartbeat script cannot
    read would fail every heartbeat of the worker that omits the session)."""
    store, secrets = await registered_store(redis_url, 1, max_streams=2)
    r = sync_redis(redis_url, decode_responses=True)
    worker = keys.worker_keys("w-000")
    sid = "w-000~confirmtwice"
    try:
        assert (await store.reserve("w-000", sid, {})).ok
        assert await store.confirm("w-000", sid, 7)
        assert await store.confirm("w-000", sid, 7), "the resend found its own confirmation"
        assert r.hget(worker.active, sid).count(":") == 1, "the resend recorded the number a second time"
        earlier = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", [], 7)
        assert (earlier.status, earlier.used) == (1, 1), "a heartbeat from before the session proves nothing"
        later = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", [], 8)
        assert (later.status, later.used) == (1, 0), "a later heartbeat without the session ends it"
    finally:
        await store.close()


async def test_a_bucket_takes_its_last_whole_token(redis_url: str) -> None:
    """A bucket holding exactly one token admits one more request and is then empty: the last whole token counts.
    Otherwise a burst of 1 (one session request at a time per client) never takes a token, and its client is never
    limited at all; a larger bucket's last token is never spent either."""
    store, _ = await registered_store(redis_url, 0)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert await store.take_token("client-1", 1, 0.5) == 0.0
        assert await store.take_token("client-1", 1, 0.5) > 0.0, "a burst of 1 let a second request straight in"
        bucket = keys.rate_limit_bucket("client-2")
        r.hset(bucket, mapping={"tokens": "1", "at": str(_redis_now_ms() + 5_000)})  # no refill meanwhile
        assert await store.take_token("client-2", 3, 0.5) == 0.0
        assert float(r.hget(bucket, "tokens")) < 0.01, "the last whole token was not taken"
        assert await store.take_token("client-2", 3, 0.5) > 0.0
    finally:
        await store.close()


async def test_a_heartbeat_whose_board_view_is_another_registrations_answers_unknown_and_only_it(
    redis_url: str,
) -> None:
    """A failover that lost the board's last writes leaves a worker's routing view from an earlier registration:
    its heartbeat answers "unknown" (it registers again and every hub sees it as it is), while a worker of the same
    batch whose view is its own is answered as usual."""
    store, secrets = await registered_store(redis_url, 2)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-000", "w-000~heldsession", {})).ok
        assert (await store.reserve("w-001", "w-001~heldsession", {})).ok
        r.hset(keys.BOARD.registered, "w-000", "1")  # the view of a registration long gone
        stale, fine = await asyncio.gather(  # one batch
            store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", ["w-000~heldsession"]),
            store.heartbeat("w-001", digest(secrets["w-001"]), "ready", "{}", ["w-001~heldsession"]))
        assert stale.status == 0, stale
        assert (fine.status, fine.used, fine.unknown_sessions) == (1, 1, ()), fine
    finally:
        await store.close()


async def test_a_heartbeat_names_exactly_the_sessions_the_hub_does_not_hold(redis_url: str) -> None:
    store, secrets = await registered_store(redis_url, 1)
    try:
        assert (await store.reserve("w-000", "w-000~heldsession", {})).ok
        beat = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}",
                                     ["w-000~heldsession", "w-000~notheld0001", "w-000~notheld0002"])
        assert beat.status == 1 and sorted(beat.unknown_sessions) == ["w-000~notheld0001", "w-000~notheld0002"]
    finally:
        await store.close()


async def test_a_heartbeat_whose_board_write_fails_still_answers_with_its_figures(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routing board is a hint: when the store cannot take its write after the scripts ran (the board's node
    failing over), the step's own answer stands and the next heartbeat publishes the figures again. Neither a 503
    nor an "unknown" that would make a healthy worker register again."""
    store, secrets = await registered_store(redis_url, 1)
    try:
        assert (await store.reserve("w-000", "w-000~heldsession", {})).ok

        async def board_unreachable(*args: Any, **kwargs: Any) -> Any:
            raise RedisConnectionError("the board's node is failing over")

        monkeypatch.setattr(store, "_publish_batch", board_unreachable)
        beat = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", ["w-000~heldsession"])
        assert (beat.status, beat.used) == (1, 1), beat
        released = await store.release("w-000", "w-000~heldsession")
        assert released.held and released.used == 0, released
    finally:
        await store.close()


async def test_an_sre_removal_of_a_worker_whose_keys_expired_removes_its_routing_view_too(redis_url: str) -> None:
    """The worker's own keys are gone (retention) but its routing board view is left: the removal reports the
    worker removed and takes the ghost off the board; a worker that was never there is unknown."""
    store, _ = await registered_store(redis_url, 1)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        r.delete(*keys.worker_keys("w-000").as_list())
        assert r.hexists(keys.BOARD.static, "w-000")
        assert await store.deregister("w-000", None) == 1
        assert not r.hexists(keys.BOARD.static, "w-000"), "a ghost left on the routing board"
        assert await store.deregister("w-000", None) == 0, "removed once only"
        assert await store.deregister("w-never", None) == 0
    finally:
        await store.close()


async def test_an_sre_listing_of_more_workers_than_one_pipeline_shows_every_one(redis_url: str) -> None:
    """The listing reads workers 500 at a time: the worker at a chunk's edge is listed like any other."""
    store, _ = await registered_store(redis_url, 1)
    try:
        assert (await store.reserve("w-000", "w-000~atthechunkedge", {"worker_id": "w-000"})).ok
        ids = [f"gone-{i:04d}" for i in range(499)] + ["w-000"] + [f"gone-{i:04d}" for i in range(499, 1001)]
        listed = await store.sessions_of(ids)
        assert set(listed) == set(ids)
        assert listed["w-000"] == {"w-000~atthechunkedge": {"worker_id": "w-000", "status": "pending"}}
    finally:
        await store.close()


async def test_a_workers_keys_expire_even_if_it_dies_right_after_taking_a_session(redis_url: str) -> None:
    """The keys a reservation or a confirmation creates inherit the worker's expiry: a worker that dies before any
    heartbeat leaves nothing in Redis for ever."""
    store, _ = await registered_store(redis_url, 1)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-000", "w-000~diessoon001", {})).ok
        assert await store.confirm("w-000", "w-000~diessoon001")
    finally:
        await store.close()
    assert [r.pttl(key) > 0 for key in keys.worker_keys("w-000").as_list()] == [True] * 4


async def test_a_release_resent_after_a_lost_reply_answers_as_the_first_did(redis_url: str) -> None:
    """redis-py resends a release whose reply timed out, with the same token: the resend answers held, with the
    session's record, as the first run did. Another release (another token) finds nothing held. The receipt that
    makes this work is short-lived, and the session leaves nothing else behind."""
    store, _ = await registered_store(redis_url, 1)
    r = sync_redis(redis_url, decode_responses=True)
    worker = keys.worker_keys("w-000")
    sid = "w-000~releasedtwice"
    receipt = keys.release_receipt("w-000", sid)

    async def release(token: str) -> list[Any]:
        return list(await store._release(keys=[*worker.as_list(), receipt], args=[sid, token, RELEASE_RECEIPT_MS]))

    try:
        assert (await store.reserve("w-000", sid, {"room": "r"})).ok
        assert await store.confirm("w-000", sid)
        first = await release("token-first")
        assert first[:3] == [1, 0, '{"room":"r"}'] and first[3]
        assert await release("token-first") == first, "the resend did not answer as the first run"
        assert (await release("token-other"))[:3] == [0, 0, None]
    finally:
        await store.close()
    assert 0 < r.pttl(receipt) <= RELEASE_RECEIPT_MS, "the receipt outlives any resend"
    assert [r.hexists(worker.active, sid), r.hexists(worker.sessions, sid), r.zscore(worker.leases, sid)] == [
        False, False, None]


async def test_a_heartbeat_after_an_active_lease_lapsed_that_does_not_renew_it_frees_its_slot(redis_url: str) -> None:
    """An active lease that lapsed since the worker's last heartbeat, and that the next heartbeat does not report, is
    dropped by that heartbeat, though its absent grace has not run out: the slot is free at once."""
    store, secrets = await registered_store(redis_url, 1, absent_grace_s=60.0)
    r = sync_redis(redis_url, decode_responses=True)
    sid = "w-000~lapsedunrenew"
    try:
        assert (await store.reserve("w-000", sid, {})).ok
        assert await store.confirm("w-000", sid)
        r.zadd(keys.worker_keys("w-000").leases, {sid: _redis_now_ms() - 1})  # lapsed (an outage, say)
        beat = await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", [])
        assert (beat.status, beat.used) == (1, 0)
    finally:
        await store.close()


async def test_a_worker_that_drained_itself_and_registers_again_is_ready(redis_url: str) -> None:
    """A worker process that was leaving (its heartbeats said 'draining') and starts again registers as ready: the
    state the old process reported does not keep the new one out of routing."""
    store, secrets = await registered_store(redis_url, 1)
    fields = {"url": "http://127.0.0.1:1/w0", "region": "us-east-1", "max_streams": "5"}
    try:
        assert (await store.heartbeat("w-000", digest(secrets["w-000"]), "draining", "{}", [])).state == "draining"
        again = await store.register("w-000", secrets["w-000"], "the-new-process", fields, "{}")
        assert again is not None and again.state == "ready"
    finally:
        await store.close()


async def test_a_reservation_resent_after_a_lost_reply_takes_no_second_slot(redis_url: str) -> None:
    """redis-py resends a reservation whose reply timed out though Redis ran it: the resend is answered as taken,
    with the same count, even when that lease filled the worker (not refused as full while holding the slot)."""
    store, _ = await registered_store(redis_url, 1, max_streams=1)
    try:
        first = await store.reserve("w-000", "w-000~reservedtwice", {})
        again = await store.reserve("w-000", "w-000~reservedtwice", {})
        assert (first.ok, first.used) == (True, 1)
        assert (again.ok, again.used) == (True, 1), again
    finally:
        await store.close()


async def test_a_heartbeat_renews_a_session_it_reports_for_a_whole_active_lease(redis_url: str) -> None:
    """A reported session's lease runs for ``active_lease_s`` from the heartbeat, whatever the absent grace: an SRE
    listing still shows it if the worker dies just after."""
    store, secrets = await registered_store(redis_url, 1, active_lease_s=120.0, absent_grace_s=0.5)
    r = sync_redis(redis_url, decode_responses=True)
    sid = "w-000~renewedlease1"
    try:
        assert (await store.reserve("w-000", sid, {})).ok
        assert await store.confirm("w-000", sid)
        r.zadd(keys.worker_keys("w-000").leases, {sid: _redis_now_ms() - 1})
        assert (await store.heartbeat("w-000", digest(secrets["w-000"]), "ready", "{}", [sid])).used == 1
    finally:
        await store.close()
    assert float(r.zscore(keys.worker_keys("w-000").leases, sid) or 0) > _redis_now_ms() + 60_000


def test_a_pending_lease_counts_as_lapsed_from_the_very_millisecond_of_its_expiry() -> None:
    """As the scripts judge it (a lease scored at or before now has lapsed): an SRE listing must not show as pending
    a slot a reservation already counts free."""
    assert _lease_status(False, 1_000, 1_000) == SessionStatus.LAPSED
    assert _lease_status(False, 1_001, 1_000) == SessionStatus.PENDING
    assert _lease_status(True, 1_000, 1_000) == SessionStatus.ACTIVE


def _calls(r: Any, command: str) -> int:
    """How many times the Redis server (every primary of a cluster) ran ``command`` since its stats were reset."""
    if isinstance(r, redis.RedisCluster):
        per_node = r.info("commandstats", target_nodes=redis.RedisCluster.PRIMARIES).values()
    else:
        per_node = [r.info("commandstats")]
    return sum(stats.get(f"cmdstat_{command}", {}).get("calls", 0) for stats in per_node)


async def test_an_sre_listing_reads_the_leases_of_only_the_workers_that_hold_a_session(redis_url: str) -> None:
    """An idle worker costs the listing one command: a fleet of mostly idle workers is listed without reading the
    lease sets of any of them."""
    store, _ = await registered_store(redis_url, 3)
    r = sync_redis(redis_url, decode_responses=True)
    try:
        assert (await store.reserve("w-001", "w-001~busy", {"worker_id": "w-001"})).ok
        if isinstance(r, redis.RedisCluster):
            r.config_resetstat(target_nodes=redis.RedisCluster.PRIMARIES)
        else:
            r.config_resetstat()
        listed = await store.sessions_of(["w-000", "w-001", "w-002"])
        assert listed == {"w-000": {}, "w-001": {"w-001~busy": {"worker_id": "w-001", "status": "pending"}},
                          "w-002": {}}
        assert _calls(r, "hgetall") == 3
        assert _calls(r, "zrangebyscore") == _calls(r, "hkeys") == 1
    finally:
        await store.close()

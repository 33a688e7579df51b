"""The hub's door to Redis: one method per atomic step, and the group commits that share round trips.

Connection failures and timeouts become ``StoreUnavailable`` here (``hub/redis_client.py`` tells them apart), so
callers never see redis-py errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from hub import scripts
from hub.group_commit import GroupCommit
from hub.redis_client import Client, as_store_unavailable, store_cannot_serve, unavailable_as_store_error
from hub.settings import HubSettings
from shared import keys
from shared.auth import digest
from shared.errors import StoreUnavailable
from shared.models import SessionStatus

log = logging.getLogger(__name__)

#: How long a release leaves its receipt: longer than a resend of the call can come (the client's timeout times its
#: retries), short enough that ended sessions' receipts stay few.
RELEASE_RECEIPT_MS = 60_000


@dataclass(frozen=True, slots=True)
class Registered:
    used: int
    max_streams: int
    state: str


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    status: int  # 1 ok, 0 unknown worker, -1 bad secret
    used: int = 0
    max_streams: int = 0
    state: str = "ready"
    unknown_sessions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Step:
    """One script on one worker's slot, run in a pipeline with the steps of other requests."""

    script: AsyncScript
    worker_id: str
    args: list[Any]
    #: Reads the worker's new slot count, for the routing board, from the script's reply (None: nothing to say).
    board_used: Callable[[Any], int | None] | None = None
    #: Keys after the worker's own four, in the same slot (a script's header names them).
    extra_keys: tuple[str, ...] = ()

    @property
    def keys(self) -> list[str]:
        return [*keys.worker_keys(self.worker_id).as_list(), *self.extra_keys]


@dataclass(frozen=True, slots=True)
class _Beat:
    worker_id: str
    status: str  # the heartbeat's figures, a JSON object
    args: list[Any]


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    reason: str  # '' when ok, else unknown | stale | draining | full | exists
    used: int
    max_streams: int
    url: str = ""


@dataclass(frozen=True, slots=True)
class Released:
    held: bool  # False: the hub did not hold the session (never, or not any more)
    used: int  # the worker's streams in use after
    record: dict[str, Any] | None  # the session as it was held
    worker_url: str


@dataclass(frozen=True, slots=True)
class StoredSession:
    record: dict[str, Any]
    status: SessionStatus
    worker_alive: bool
    worker_url: str


@dataclass(frozen=True, slots=True)
class BoardRead:
    """The routing board's three views (worker id -> JSON), whole or (``complete=False``) only what changed;
    in a delta, None marks a worker that left the board."""

    static: dict[str, str | None]
    status: dict[str, str | None]
    used: dict[str, str | None]
    now_ms: int
    complete: bool
    #: Which dataset the board is (``keys.BoardKeys.epoch``): another one than at the last read means a Redis that
    #: restarted empty, whose lost workers no delta reports.
    epoch: str = ""


class FleetStore:
    def __init__(self, client: Client, settings: HubSettings) -> None:
        self.redis = client
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.redis_max_connections)
        self._register = client.register_script(scripts.REGISTER)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._reserve = client.register_script(scripts.RESERVE)
        self._confirm = client.register_script(scripts.CONFIRM)
        self._release = client.register_script(scripts.RELEASE)
        self._read_session = client.register_script(scripts.READ_SESSION)
        self._read_worker = client.register_script(scripts.READ_WORKER)
        self._set_drain = client.register_script(scripts.SET_DRAIN)
        self._deregister = client.register_script(scripts.DEREGISTER)
        self._cas = client.register_script(scripts.COMPARE_AND_SET)
        self._publish = client.register_script(scripts.PUBLISH_BOARD)
        self._bucket = client.register_script(scripts.RATE_LIMIT_BUCKET)
        self._read_board = client.register_script(scripts.READ_BOARD)
        self._publish_batch = client.register_script(scripts.PUBLISH_BOARD_BATCH)
        self._heartbeats: GroupCommit[_Beat, HeartbeatOutcome] = GroupCommit(self._commit_heartbeats,
                                                                              name="heartbeats")
        self._steps: GroupCommit[_Step, Any] = GroupCommit(self._commit_steps, name="session steps")

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One step's Redis work: waits (at most ``redis_pool_wait_s``) for a connection slot, and turns
        unavailability into ``StoreUnavailable``.

        Both clients' pools raise at their limit (the cluster's per-node pools made a 1,000-request burst get
        500s); bounding concurrent steps to the pool size gives both the same behaviour: a queue, then a clean 503.
        """
        if self._slots.locked():  # every slot is busy: queue, boundedly (a free slot is taken without a timer)
            try:
                async with asyncio.timeout(self.settings.redis_pool_wait_s):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise StoreUnavailable("every connection to the shared store is busy") from exc
        else:
            await self._slots.acquire()
        try:
            async with unavailable_as_store_error():
                yield
        finally:
            self._slots.release()

    async def close(self) -> None:
        await self._heartbeats.aclose()
        await self._steps.aclose()
        await self.redis.aclose()

    async def ping(self) -> bool:
        async with self._call():
            return bool(await self.redis.ping())

    # --- workers ------------------------------------------------------------------------------------------

    async def register(
        self, worker_id: str, presented_secret: str | None, new_secret: str, fields: dict[str, str], static: str,
        *, drain_requested: bool = False,
    ) -> Registered | None:
        """None when a live worker already holds the id and ``presented_secret`` is not its secret.
        ``drain_requested``: the worker says an SRE had drained it, which drains it again if Redis lost its keys."""
        flat = [x for kv in fields.items() for x in kv] + ["static", static]
        s = self.settings
        async with self._call():
            res = await self._register(
                keys=keys.worker_keys(worker_id).as_list(),
                args=[digest(presented_secret) if presented_secret else "", digest(new_secret), s.ttl_ms,
                      int(s.retention_s * 1000), "1" if drain_requested else "0", *flat],
            )
            if int(res[0]) != 1:
                return None
            out = Registered(used=int(res[1]), max_streams=int(res[2]), state=str(res[3]))
            status = {"hb": int(res[4]), "state": out.state, "drain": int(res[5]) == 1}
            await self._publish_board(worker_id, static=static, status=json.dumps(status), used=out.used,
                                      registered_at=int(res[4]))
        return out

    async def heartbeat(self, worker_id: str, secret_digest: str, state: str, status: str, sessions: list[str],
                        seq: int | None = None) -> HeartbeatOutcome:
        """Record a heartbeat (``secret_digest`` is ``shared.auth.digest`` of the worker's secret). Concurrent
        heartbeats share Redis round trips (see ``hub.group_commit``)."""
        s = self.settings
        args = [secret_digest, int(s.active_lease_s * 1000), int(s.absent_grace_s * 1000), int(s.retention_s * 1000),
                state, status, "" if seq is None else seq, *sessions]
        return await self._heartbeats.submit(_Beat(worker_id, status, args))

    async def _commit_heartbeats(self, beats: list[_Beat]) -> list[HeartbeatOutcome | Exception]:
        """One pipeline of HEARTBEAT scripts (one per worker slot), then one board write for the whole batch."""
        outcomes: list[HeartbeatOutcome | Exception] = []
        board: list[Any] = []
        async with self._call():
            replies = await self._run_many([_Step(self._heartbeat, b.worker_id, b.args) for b in beats])
            for beat, res in zip(beats, replies, strict=True):
                if isinstance(res, Exception):
                    outcomes.append(res)
                elif int(res[0]) != 1:
                    outcomes.append(HeartbeatOutcome(status=int(res[0])))
                else:
                    out = HeartbeatOutcome(status=1, used=int(res[1]), max_streams=int(res[2]), state=str(res[3]),
                                           unknown_sessions=tuple(str(x) for x in res[7:]))
                    outcomes.append(out)
                    drain = int(res[5]) == 1  # an SRE's drain, also while the worker drains on its own
                    board += [beat.worker_id, _with_board_fields(beat.status, int(res[4]), out.state, drain), out.used,
                              res[6]]  # its registration: a board view of another one is stale
            if board:
                off_board = await self._publish_board_batch(board)
                if off_board:
                    # Live, but its routing board view is gone or another registration's (the board's last writes were
                    # lost in a failover): routing would never see it as it is. "Unknown" makes it register again.
                    outcomes = [HeartbeatOutcome(status=0) if isinstance(o, HeartbeatOutcome) and
                                b.worker_id in off_board else o for b, o in zip(beats, outcomes, strict=True)]
        return outcomes

    async def _run_many(self, steps: list[_Step]) -> list[Any]:
        """The steps' scripts in one pipeline; per-step errors come back in place of results.

        Loads a script when Redis lost it (a restart or failover), like redis-py does for single calls.
        """
        results = await self._evalsha_pipeline(steps)
        missing = [i for i, res in enumerate(results) if isinstance(res, NoScriptError)]
        if missing:
            for script in {id(steps[i].script): steps[i].script for i in missing}.values():
                await self.redis.script_load(script.script)
            for i, res in zip(missing, await self._evalsha_pipeline([steps[i] for i in missing]), strict=True):
                results[i] = res
        # A step's own error reply can say the store is not usable right now (LOADING after a restart, READONLY
        # during a failover): that is the same clean 503 a failed round trip gives, not a server error.
        return [as_store_unavailable(res) if isinstance(res, Exception) and store_cannot_serve(res) else res
                for res in results]

    async def _evalsha_pipeline(self, steps: list[_Step]) -> list[Any]:
        pipe: Pipeline | ClusterPipeline = self.redis.pipeline(transaction=False)
        for step in steps:
            # execute_command, not pipe.evalsha: redis-py blocks the helper in cluster pipelines because it cannot
            # reload a missing script there; _run_many does that itself. The cluster routes by the keys given.
            step_keys = step.keys
            pipe.execute_command("EVALSHA", step.script.sha, len(step_keys), *step_keys, *step.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _run_step(self, script: AsyncScript, worker_id: str, args: list[Any],
                        board_used: Callable[[Any], int | None] | None = None, extra_keys: tuple[str, ...] = ()) -> Any:
        """One script on a worker's slot. Concurrent requests' steps share Redis round trips (``hub.group_commit``);
        each script is as atomic as ever, only the trip is shared."""
        return await self._steps.submit(_Step(script, worker_id, args, board_used, extra_keys))

    async def _commit_steps(self, steps: list[_Step]) -> list[Any]:
        """One pipeline of the steps' scripts, then one board write of the slot counts they changed."""
        async with self._call():
            results = await self._run_many(steps)
            board: list[Any] = []
            for step, res in zip(steps, results, strict=True):
                if step.board_used is not None and not isinstance(res, Exception):
                    used = step.board_used(res)
                    if used is not None:
                        board += [step.worker_id, "", used, ""]  # '': the status view stays, any registration
            if board:
                await self._publish_board_batch(board)
        return results

    async def _publish_board_batch(self, board: list[Any]) -> set[str]:
        """Write a batch's figures to the routing board; the ids of the workers not on it. The board is only a
        routing hint (the workers' own keys hold the truth, and the batch's scripts have run): when the store
        cannot take the write, the next heartbeat of each worker publishes its figures again."""
        try:
            skipped = await self._publish_batch(keys=keys.BOARD.as_list(), args=board)
        except Exception as exc:
            if not store_cannot_serve(exc):
                raise
            log.info("could not publish %d workers' figures to the board", len(board) // 4)
            return set()
        return {str(worker_id) for worker_id in skipped}

    async def deregister(self, worker_id: str, secret: str | None) -> int:
        """1 removed (also when only its routing board view was left), 0 unknown, -1 bad secret. ``secret=None`` is
        an SRE removal, refused (-2) while the worker is live."""
        async with self._call():
            presented = digest(secret) if secret is not None else "*"
            res = int(await self._deregister(keys=keys.worker_keys(worker_id).as_list(),
                                             args=[presented, self.settings.ttl_ms]))
            if res in (0, 1):
                # Its keys are gone either way. A board view left behind (the answer lost and the call resent, or
                # the board write failed) would be a ghost nothing else removes: removing it completes the removal.
                on_board = await self._publish_board(worker_id, remove=True)
                if res == 0 and on_board:
                    res = 1
        return res

    async def set_drain(self, worker_id: str, drain: bool) -> str | None:
        async with self._call():
            state = await self._set_drain(keys=[keys.worker_keys(worker_id).info], args=["1" if drain else "0"])
            if state:
                raw = await self.redis.hget(keys.BOARD.status, worker_id)
                status = json.loads(raw) if raw else {}
                status.update(state=state, drain=drain)
                await self._publish_board(worker_id, status=json.dumps(status, separators=(",", ":")))
        return str(state) if state else None

    async def read_worker(self, worker_id: str) -> tuple[int, int, dict[str, str]] | None:
        """(now_ms, used, info fields) as Redis holds them, or None when unknown."""
        async with self._call():
            res = await self._read_worker(keys=keys.worker_keys(worker_id).as_list(), args=[])
        if int(res[1]) < 0:
            return None
        flat = res[2:]
        return int(res[0]), int(res[1]), dict(zip(flat[::2], flat[1::2], strict=True))

    # --- sessions -----------------------------------------------------------------------------------------

    async def reserve(self, worker_id: str, session_id: str, record: dict[str, Any]) -> Reservation:
        s = self.settings
        res = await self._run_step(self._reserve, worker_id, [session_id, int(s.pending_lease_s * 1000), s.ttl_ms,
                                                              json.dumps(record, separators=(",", ":"))],
                                   board_used=_used_after_reserve)
        if int(res[0]) == 1:
            return Reservation(ok=True, reason="", used=int(res[1]), max_streams=int(res[2]), url=str(res[3]))
        return Reservation(ok=False, reason=str(res[1]), used=int(res[2]), max_streams=int(res[3]))

    async def confirm(self, worker_id: str, session_id: str, accepted_at_seq: int | None = None) -> bool:
        lease_ms = int(self.settings.active_lease_s * 1000)
        seq = "" if accepted_at_seq is None else accepted_at_seq
        res = await self._run_step(self._confirm, worker_id, [session_id, lease_ms, seq])
        return int(res[0]) == 1

    async def release(self, worker_id: str, session_id: str) -> Released:
        """Safe to run twice (a resend of the same call answers as the first did); a second release of the same
        session by another call finds nothing held."""
        res = await self._run_step(self._release, worker_id, [session_id, secrets.token_hex(8), RELEASE_RECEIPT_MS],
                                   board_used=_used_after_release,
                                   extra_keys=(keys.release_receipt(worker_id, session_id),))
        return Released(held=int(res[0]) == 1, used=int(res[1]), record=json.loads(res[2]) if res[2] else None,
                        worker_url=str(res[3] or ""))

    async def holds_session(self, worker_id: str, session_id: str) -> bool:
        """Whether the worker's keys hold this session; a step of the group commit, as an end's release is."""
        res = await self._run_step(self._read_session, worker_id, [session_id, self.settings.ttl_ms])
        return bool(res[0])

    async def read_session(self, worker_id: str, session_id: str) -> StoredSession | None:
        async with self._call():
            res = await self._read_session(keys=keys.worker_keys(worker_id).as_list(),
                                           args=[session_id, self.settings.ttl_ms])
        if not res[0]:
            return None
        return StoredSession(record=json.loads(res[0]), status=SessionStatus(res[1]), worker_alive=int(res[2]) == 1,
                             worker_url=str(res[3] or ""))

    async def sessions_of(self, worker_ids: list[str],
                          alive: Collection[str] = ()) -> dict[str, dict[str, dict[str, Any]]]:
        """worker id -> session id -> record with its status; an SRE listing, pipelined.

        A worker in ``alive`` shows every lease it holds (one that lapsed is its next heartbeat's to renew or
        drop). Another shows only leases that have not lapsed: a dead worker's records stay until its keys
        expire, as no heartbeat comes to drop them.
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        async with self._call():
            seconds, micros = await self.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            for start in range(0, len(worker_ids), 500):
                chunk = worker_ids[start:start + 500]
                pipe = self.redis.pipeline(transaction=False)
                for wid in chunk:
                    pipe.hgetall(keys.worker_keys(wid).sessions)
                records_of = dict(zip(chunk, await pipe.execute(), strict=True))
                out.update((wid, {}) for wid, records in records_of.items() if not records)
                # Then the leases of the workers that hold a record: an idle worker costs the listing one command.
                holding = [wid for wid, records in records_of.items() if records]
                if not holding:
                    continue
                pipe = self.redis.pipeline(transaction=False)
                for wid in holding:
                    wk = keys.worker_keys(wid)
                    pipe.hkeys(wk.active)
                    pipe.zrangebyscore(wk.leases, "-inf" if wid in alive else f"({now_ms}", "+inf", withscores=True)
                results = await pipe.execute()
                for i, wid in enumerate(holding):
                    active, expiries = set(results[2 * i]), dict(results[2 * i + 1])
                    out[wid] = {sid: {**json.loads(raw), "status": _lease_status(sid in active, expiries[sid], now_ms)}
                                for sid, raw in records_of[wid].items() if sid in expiries}
        return out

    # --- session-key affinity ------------------------------------------------------------------------------

    async def get_claim(self, session_key: str) -> str | None:
        async with self._call():
            value = await self.redis.get(keys.session_key_claim(session_key))
        return str(value) if value else None

    async def compare_and_set_claim(self, session_key: str, expected: str | None, new: str | None,
                                    ttl_s: float) -> tuple[bool, str | None]:
        """(swapped, current value when not swapped)."""
        async with self._call():
            res = await self._cas(keys=[keys.session_key_claim(session_key)],
                                  args=[expected or "", new or "", int(ttl_s * 1000)])
        if res == 1:
            return True, None
        return False, str(res) if res else None

    # --- routing board -----------------------------------------------------------------------------------

    async def read_board(self, changed_since_ms: int | None = None) -> BoardRead:
        """What a hub needs to route, in one round trip (one script on ``{idx}``): everything, or only what changed
        since ``changed_since_ms`` (Redis time) when that is recent enough for the board's change log."""
        since = "" if changed_since_ms is None else str(changed_since_ms)
        async with self._call():
            res = await self._read_board(keys=keys.BOARD.as_list(), args=[since, scripts.BOARD_DELTA_HORIZON_MS])
        return BoardRead(static=_pairs(res[0]), status=_pairs(res[1]), used=_pairs(res[2]),
                         now_ms=int(res[3]) * 1000 + int(res[4]) // 1000, complete=int(res[5]) == 1,
                         epoch=str(res[6]))

    async def forget_on_board(self, worker_ids: list[str]) -> list[str]:
        """Drop long-silent workers from the board (their own keys have expired by retention); the ids of those that
        were not on it (their removal logs no change, so no hub's delta read will report it)."""
        absent: list[str] = []
        async with self._call():
            for wid in worker_ids:
                if not await self._publish_board(wid, remove=True):
                    absent.append(wid)
        return absent

    async def _publish_board(self, worker_id: str, *, static: str = "", status: str = "", used: int | None = None,
                             remove: bool = False, registered_at: int | None = None) -> bool:
        """False when a removal found the worker not on the board. ``registered_at`` goes with a ``static`` view:
        when its registration ran, as the worker's info hash records it."""
        used_arg = "" if used is None else used
        res = await self._publish(keys=keys.BOARD.as_list(),
                                  args=[worker_id, static, status, used_arg, "1" if remove else "0",
                                        "" if registered_at is None else registered_at])
        return int(res) == 1

    # --- rate limiting ------------------------------------------------------------------------------------

    async def take_token(self, client: str, capacity: int, rate_per_s: float) -> float:
        """0 when allowed, else seconds to wait (never 0: a refusal must not read as allowed)."""
        async with self._call():
            res = await self._bucket(keys=[keys.rate_limit_bucket(client)],
                                     args=[capacity, rate_per_s, secrets.token_hex(8)])
        return 0.0 if int(res[0]) == 1 else max(int(res[1]), 1) / 1000.0


def _lease_status(confirmed: bool, expiry_ms: float, now_ms: int) -> SessionStatus:
    """As ``READ_SESSION`` judges a lease: a pending one past its expiry has lapsed (its slot counts free)."""
    if confirmed:
        return SessionStatus.ACTIVE
    return SessionStatus.LAPSED if expiry_ms <= now_ms else SessionStatus.PENDING


def _used_after_reserve(res: Any) -> int | None:
    """RESERVE's count for the board: taken, or refused as full (the board believed there was room)."""
    if int(res[0]) == 1:
        return int(res[1])
    return int(res[2]) if res[1] == "full" else None


def _used_after_release(res: Any) -> int:
    return int(res[1])


def _pairs(raw: str) -> dict[str, str | None]:
    """A flat [field, value, ...] JSON array (HGETALL or HMGET encoded by a script) as a dict; a value that is
    JSON ``false`` (HMGET of a field that is gone) becomes None."""
    flat = json.loads(raw)
    if not isinstance(flat, list):  # cjson encodes an empty table as {}
        return {}
    it = iter(flat)
    return {str(k): None if v is False else str(v) for k, v in zip(it, it, strict=True)}


_STATES = frozenset({"ready", "draining"})


def _with_board_fields(obj: str, hb: int, state: str, drain: bool) -> str:
    """A heartbeat's figures (a JSON object string) with the board's fields added, without parsing or
    re-serialising anything: this runs once per heartbeat."""
    if state not in _STATES:  # always one of two literals; anything else goes through the JSON encoder
        extra = json.dumps({"hb": hb, "state": state, "drain": drain}, separators=(",", ":"))
    else:
        extra = f'{{"hb":{hb},"state":"{state}","drain":{"true" if drain else "false"}}}'
    body = obj.strip()
    return extra if body == "{}" else body[:-1] + "," + extra[1:]

"""Reconciliation's other half: a session a worker runs that the hub does not hold is stopped through the worker's
own ``DELETE /sessions/{id}``, not only named in the heartbeat's answer (a worker that ignores ``stop_sessions``
must not keep an uncounted session)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import heartbeat, refresh, register, wait_for

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


async def test_a_session_the_hub_holds_is_never_stopped(hub: httpx.AsyncClient, make_worker: Any) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    sid = (await hub.post("/api/v1/sessions", json={})).json()["session_id"]
    reply = (await heartbeat(hub, "w-1", reg["worker_secret"], [sid])).json()
    assert reply["stop_sessions"] == [] and reply["used_streams"] == 1
    await asyncio.sleep(0.2)
    assert worker.stopped == [] and sid in worker.sessions

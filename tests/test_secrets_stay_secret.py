"""Secrets never appear in logs, error bodies or /metrics: a full run is captured at DEBUG and searched."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from pydantic import ValidationError

from shared import keys
from shared.models import WorkerRegistration
from shared.redis_server import EmbeddedRedis
from tests.conftest import (
    ADMIN_AUTH,
    ADMIN_TOKEN,
    WORKER_AUTH,
    WORKER_TOKEN,
    heartbeat,
    refresh,
    register,
    registration,
)
from tests.harness import WorkerProcess, running_hubs
from worker.engines.synthetic import SyntheticEngine
from worker.hub_client import HubClient
from worker.sessions import SessionManager
from worker.settings import WorkerSettings

LIVEKIT_SECRET = "lk-secret-0123456789abcdef0123456789abcdef"
HUB_URL_PASSWORD = "hub-pw-0123456789"


async def test_no_secret_reaches_logs_bodies_or_metrics(make_hub, make_worker,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub = await make_hub(livekit_regions=json.dumps([{"region": "eu", "url": "wss://lk", "lat": 50, "lon": 8,
                                                      "api_key": "key", "api_secret": LIVEKIT_SECRET}]))
    worker = await make_worker(max_streams=1)
    reg = await register(hub, "w-1", worker)
    await refresh(hub)
    bodies = []
    for resp in [
        await hub.post("/api/v1/sessions", json={"session_key": "k"}),
        await hub.post("/api/v1/sessions", json={}),  # 503: full
        await hub.post("/api/v1/workers", json=registration("w-1", "http://x:1"), headers=WORKER_AUTH),  # 409
        await heartbeat(hub, "w-1", "wrong-secret", []),  # 403
        await hub.get("/api/v1/workers", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}),  # 401
        await hub.post("/api/v1/sessions", json={"location": {"lat": 99, "lon": 0}}),  # 422
        await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH),
        await hub.get("/api/v1/sessions", headers=ADMIN_AUTH),
        await hub.get("/metrics"),
    ]:
        bodies.append(resp.text)
    worker.mode = "error"
    await hub.delete(f"/api/v1/sessions/{json.loads(bodies[0])['session_id']}")
    await hub.post("/api/v1/sessions", json={})  # dispatch refused with a 500: logged as a warning

    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert caplog.records, "the run logged nothing: the search would prove nothing"
    for secret in (WORKER_TOKEN, ADMIN_TOKEN, reg["worker_secret"], LIVEKIT_SECRET):
        assert secret not in logged
        assert all(secret not in body for body in bodies)


def test_a_hub_url_with_credentials_is_refused_without_echoing_them() -> None:
    """Regression: a hub URL with credentials (``http://user:pw@hub``) was logged whole, password included, by every
    failed registration (aiohttp refuses them next to the worker token's Authorization header, so every one fails).
    It is now refused at start; neither the refusal nor the settings' repr repeats it."""
    with pytest.raises(ValidationError, match="a hub URL must not carry credentials") as refused:
        WorkerSettings(hub_urls=[f"http://fleet:{HUB_URL_PASSWORD}@127.0.0.1:8080"])
    assert HUB_URL_PASSWORD not in str(refused.value)
    assert "127.0.0.1:8080" not in repr(WorkerSettings(hub_urls=["http://127.0.0.1:8080"]))


def test_a_livekit_deployment_with_a_mistake_is_refused_without_echoing_its_secret() -> None:
    """pydantic's errors carry the offending input; for a deployment missing a field that input is the whole entry,
    ``api_secret`` included. The refusal names the field and why, never the value."""
    from hub.settings import HubSettings

    entry = {"region": "eu", "lat": 50.1, "lon": 8.7, "api_key": "key", "api_secret": LIVEKIT_SECRET}
    for broken, field in ((entry, "url"), ({**entry, "url": "wss://lk", "lat": "north"}, "lat")):
        with pytest.raises(ValidationError, match=f"invalid deployment: {field}: ") as refused:
            HubSettings(livekit_regions=json.dumps([broken]))
        assert LIVEKIT_SECRET not in str(refused.value)


def test_a_session_id_is_shown_in_logs_by_its_worker_and_four_characters() -> None:
    assert keys.shown_session_id("w-1~NI0ARShUaJZncmB7") == "w-1~NI0A…"
    assert keys.shown_session_id("not-one-of-ours") == "not-…"


def test_a_hub_url_with_credentials_is_described_without_them() -> None:
    """/health shows the hub that answered last: its URL without the user:password it was configured with."""
    hub_url = f"https://fleet:{HUB_URL_PASSWORD}@hub.example:8443"
    reg = WorkerRegistration(worker_id="w-cred", url="http://127.0.0.1:1", region="us-east-1", max_streams=1)
    client = HubClient([hub_url], WORKER_TOKEN, reg, SessionManager(SyntheticEngine(), 1))
    client.hub_url = hub_url  # as after a heartbeat it answered
    assert client.describe()["hub"] == "https://hub.example:8443"


def test_no_secret_reaches_the_logs_or_metrics_of_real_processes(redis_server: EmbeddedRedis) -> None:
    """The same search over what real `fleet hub` and `fleet worker` processes write at DEBUG (uvicorn's and the
    libraries' lines included, which the in-process test above cannot capture) and serve on /metrics and /health,
    through a session's whole life and the worker's drain."""
    if not redis_server.running:  # a fault test may have stopped it
        redis_server.start()
    livekit = json.dumps([{"region": "eu", "url": "wss://lk", "lat": 50, "lon": 8, "api_key": "key",
                           "api_secret": LIVEKIT_SECRET}])
    with running_hubs(1, redis_server.url, log_level="DEBUG", livekit_regions=livekit) as [hub]:
        worker = WorkerProcess([hub.url], "wp-secrets", log_level="DEBUG").start()
        try:
            httpx.get(f"{hub.url}/api/v1/workers", headers=ADMIN_AUTH, timeout=10)  # reads the board afresh
            created = httpx.post(f"{hub.url}/api/v1/sessions", json={"session_key": "k"}, timeout=10)
            assert created.status_code == 201, created.text
            session = created.json()
            served = [httpx.get(f"{hub.url}/metrics", timeout=10).text,
                      httpx.get(f"{worker.url}/metrics", timeout=10).text,
                      httpx.get(f"{worker.url}/health", timeout=10).text,
                      httpx.get(f"{hub.url}/api/v1/sessions", headers=ADMIN_AUTH, timeout=10).text,
                      httpx.get(f"{hub.url}/api/v1/workers", headers={"Authorization": "Bearer wrong"},
                                timeout=10).text]
            assert httpx.delete(f"{hub.url}/api/v1/sessions/{session['session_id']}", timeout=10).status_code == 204
        finally:
            assert worker.stop() == 0  # drains and deregisters, logging as it goes
        logged = hub.log_tail(10_000_000) + worker.log_tail(10_000_000)
    # Both processes' own lines, DEBUG ones among them: an empty search would prove nothing.
    assert all(part in logged for part in (" DEBUG ", "hub.registry", "worker.hub_client", "Uvicorn running")), logged
    for secret in (WORKER_TOKEN, ADMIN_TOKEN, LIVEKIT_SECRET, session["livekit"]["token"]):
        assert secret not in logged
        assert all(secret not in text for text in served)
    # The session id ends the session: above DEBUG, lines show its worker and the start of its random part only.
    above_debug = [line for line in logged.splitlines() if " DEBUG " not in line]
    assert not [line for line in above_debug if session["session_id"] in line]
    assert any(keys.shown_session_id(session["session_id"]) in line for line in above_debug), logged

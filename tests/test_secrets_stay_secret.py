"""Secrets never appear in logs, error bodies or /metrics: a full run is captured at DEBUG and searched."""

from __future__ import annotations

import json
import logging

import pytest

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
from worker.settings import WorkerSettings

LIVEKIT_SECRET = "lk-secret-0123456789abcdef0123456789abcdef"


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


def test_hub_url_credentials_stay_out_of_the_worker_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a hub URL with credentials (``https://user:pw@hub``) was printed whole by repr(settings)."""
    monkeypatch.setenv("FLEET_HUB_URLS", "https://fleet:hub-pw-0123456789@hub.example")
    settings = WorkerSettings()
    assert settings.hub_urls == ["https://fleet:hub-pw-0123456789@hub.example"]
    assert "hub-pw" not in repr(settings) and "hub-pw" not in str(settings)

"""Schemathesis fuzzes the worker's OpenAPI contract over real HTTP: no 5xx, and every answer matches the schema.

The worker runs as the agent runs it: ``create_worker_app`` on uvicorn with a ``SessionManager`` over the synthetic
engine, in a thread of its own. Sessions end by themselves after a moment so the fuzzer's dispatches never fill it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from shared.redis_server import free_port
from worker.app import create_worker_app
from worker.engines.synthetic import SyntheticEngine
from worker.sessions import SessionManager

TOKEN = "fuzz-worker-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _manager() -> SessionManager:
    # One frame a second of trivial work: the fuzzer may start hundreds of sessions and must not load the CPU.
    engine = SyntheticEngine(fps=1.0, work_per_frame=1, session_duration_s=0.5)
    return SessionManager(engine, max_streams=10_000)


@pytest.fixture(scope="module")
def live_worker() -> Iterator[tuple[str, SessionManager]]:
    manager = _manager()
    asyncio.run(manager.engine.start())
    port = free_port()
    app = create_worker_app(manager, TOKEN, lambda: {"worker_id": "fuzz-worker"})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{url}/health", timeout=2).status_code == 200
    yield url, manager
    server.should_exit = True
    thread.join(timeout=10)


# The schema the worker serves, taken from the app itself; calls go to a live worker over HTTP.
schema = schemathesis.openapi.from_dict(create_worker_app(_manager(), TOKEN).openapi())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_worker_api_never_fails_on_any_input(case, live_worker: tuple[str, SessionManager]) -> None:  # type: ignore[no-untyped-def]
    url, _ = live_worker
    # Left out on purpose, as for the hub: unknown query parameters are ignored rather than refused, and valid
    # dispatches may rightly be refused (409 duplicate when the generator repeats a session id). 5xx and
    # response-schema checks all stay on; the generic "no 5xx" check is replaced by a stricter one: the worker
    # answers 503 only when its engine fails, which the synthetic engine never does here, so any 5xx fails.
    response = case.call(base_url=url, headers=AUTH)
    assert response.status_code < 500, response.text
    case.validate_response(response, excluded_checks=[negative_data_rejection, positive_data_acceptance,
                                                      not_a_server_error])


def test_worker_tokens_are_required_on_the_session_routes(live_worker: tuple[str, SessionManager]) -> None:
    """Guards the auth the fuzzer bypasses (it always sends the token): every session route answers 401 without."""
    url, _ = live_worker
    for method, path in (("GET", "/sessions"), ("POST", "/sessions"), ("DELETE", "/sessions/x")):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + TOKEN}):
            resp = httpx.request(method, f"{url}{path}", headers=headers, json={}, timeout=5)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["error"] == "unauthorized"


def test_a_refused_dispatch_never_echoes_its_input(live_worker: tuple[str, SessionManager]) -> None:
    """Regression: the worker's 422 quoted pydantic's errors with their input, i.e. a dispatch body with the agent's
    LiveKit token whenever a field was missing. Now, like the hub: where and why, never the value."""
    url, _ = live_worker
    resp = httpx.post(f"{url}/sessions", headers=AUTH, timeout=5,
                      json={"room": "r", "livekit_url": "ws://lk", "token": "SECRET-AGENT-JWT"})
    assert resp.status_code == 422 and "SECRET-AGENT-JWT" not in resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "session_id"]
    wrong = httpx.put(f"{url}/sessions", headers=AUTH, timeout=5)  # GET and POST /sessions are two routes
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET, POST"

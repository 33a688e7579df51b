"""Schemathesis fuzzes the hub's OpenAPI contract over real HTTP: no 5xx, and every answer matches the schema."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from hub.main import create_app
from shared.models import MAX_STREAMS_PER_WORKER
from shared.redis_server import EmbeddedRedis, free_port
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, hub_settings, registration
from tests.fakes import serving


class _AcceptEverything(BaseHTTPRequestHandler):
    """A worker endpoint that takes every dispatch, so a 5xx from the hub is never 'just full'."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(201)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_DELETE(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class LiveHub:
    """A hub over HTTP, and one registered worker whose secret lets the fuzzer past the per-worker check: without
    it every heartbeat and deregistration would stop at 403/404 and their handlers would never run."""

    worker_id = "fuzz-worker"

    def __init__(self, url: str, worker_url: str) -> None:
        self.url, self.worker_url, self.secret = url, worker_url, ""
        self.register()

    def register(self) -> None:
        reg = httpx.post(f"{self.url}/api/v1/workers", headers=WORKER_AUTH, json=registration(
            self.worker_id, self.worker_url, max_streams=MAX_STREAMS_PER_WORKER))
        assert reg.status_code == 200, reg.text
        self.secret = reg.json()["worker_secret"]


@pytest.fixture(scope="module")
def live_hub() -> Iterator[LiveHub]:
    with serving(_AcceptEverything) as worker_url, EmbeddedRedis() as server:
        port = free_port()
        settings = hub_settings(server.url, dispatch_timeout_s=0.5, worker_ttl_s=3600)
        uv = uvicorn.Server(uvicorn.Config(create_app(settings),
                                           host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield LiveHub(url, worker_url)
        uv.should_exit = True
        thread.join(timeout=10)
        redis.Redis.from_url(server.url).flushall()


# The schema the hub serves, taken from the app itself; calls go to a live hub over HTTP.
schema = schemathesis.openapi.from_dict(create_app(hub_settings("redis://unused")).openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_hub_api_never_fails_on_any_input(case, live_hub: LiveHub) -> None:  # type: ignore[no-untyped-def]
    security = str(case.operation.definition.raw.get("security", ""))
    headers = ADMIN_AUTH if "AdminToken" in security else WORKER_AUTH if "WorkerToken" in security else {}
    acts_as_the_worker = "WorkerToken" in security and "worker_id" in (case.path_parameters or {})
    if acts_as_the_worker:  # a heartbeat or deregistration that passes the per-worker check and reaches the handler
        case.path_parameters["worker_id"] = live_hub.worker_id
        headers = {**headers, "X-Worker-Secret": live_hub.secret}
    # Left out on purpose: unknown query parameters are ignored rather than refused (as most web APIs do); and the
    # generator ignores dict-key patterns (propertyNames) on `labels`, so it calls requests with invalid label keys
    # "valid". 5xx, response-schema and Allow-header checks all stay on.
    # The generic "no 5xx" check is replaced by a precise one: the only 5xx the contract allows is a 503, either
    # retryable (e.g. the workers with the labels asked for are full) with its code and Retry-After, or
    # `no_matching_worker` (no worker has those labels at all) without Retry-After; never a 500.
    response = case.call(base_url=live_hub.url, headers=headers)
    if acts_as_the_worker and case.method.upper() == "DELETE" and response.status_code == 204:
        live_hub.register()  # deregistered for real: back for the next examples
    if response.status_code >= 500:
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        if error == "no_matching_worker":  # no retry would help: no Retry-After
            assert "retry-after" not in response.headers, response.headers
        else:
            assert error in {"no_capacity", "store_unavailable", "session_pending"}
            assert int(response.headers["retry-after"][0]) >= 1  # schemathesis: lower-case names, lists of values
    case.validate_response(response, excluded_checks=[negative_data_rejection,
                                                      positive_data_acceptance, not_a_server_error])


def test_the_session_contract_refuses_agent_identities_as_the_hub_does() -> None:
    """Regression: the OpenAPI schema let `identity: "agent-…"` pass, which the hub refuses (a user must never join
    as a worker's agent), so a client generated from the contract learned of it only from a 422."""
    import jsonschema_rs

    spec = create_app(hub_settings("redis://unused")).openapi()
    validator = jsonschema_rs.validator_for({**spec["components"]["schemas"]["SessionRequest"],
                                             "components": spec["components"]})
    assert validator.is_valid({"identity": "alice"}) and validator.is_valid({"identity": None})
    assert validator.is_valid({"identity": "my-agent-7"})
    assert not validator.is_valid({"identity": "agent-w-1~abcdefghijkl"})

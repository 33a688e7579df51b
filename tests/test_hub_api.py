"""The hub's edge: authentication, validation, limits, configuration and the explain view."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import httpx
import pytest
from fastapi.security import HTTPAuthorizationCredentials
from livekit import api
from pydantic import ValidationError

from hub.api import deps
from hub.main import create_app
from hub.scoring import Weights
from hub.settings import HubSettings
from shared.models import MAX_STREAMS_PER_WORKER
from shared.redis_server import EmbeddedRedis
from tests.conftest import (
    ADMIN_AUTH,
    ADMIN_TOKEN,
    WORKER_AUTH,
    WORKER_TOKEN,
    heartbeat,
    hub_settings,
    refresh,
    register,
    registration,
    sync_redis,
    wait_for,
)

LIVEKIT = [
    {"region": "us-east", "url": "wss://lk-use.example", "lat": 38.9, "lon": -77.4, "api_key": "k1",
     "api_secret": "s1-0123456789abcdef0123456789abcdef"},
    {"region": "eu", "url": "wss://lk-eu.example", "lat": 50.1, "lon": 8.7, "api_key": "k2",
     "api_secret": "s2-0123456789abcdef0123456789abcdef"},
]


async def test_tokens_are_required_and_checked(hub: httpx.AsyncClient) -> None:
    body = registration("w-1", "http://127.0.0.1:9")
    assert (await hub.post("/api/v1/workers", json=body)).status_code == 401
    wrong = await hub.post("/api/v1/workers", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert (await hub.post("/api/v1/workers", json=body, headers=ADMIN_AUTH)).status_code == 401
    assert (await hub.get("/api/v1/workers", headers=WORKER_AUTH)).status_code == 401
    assert (await hub.get("/api/v1/fleet", headers=ADMIN_AUTH)).status_code == 200


async def test_a_refused_bearer_token_says_which_scheme_to_use(hub: httpx.AsyncClient) -> None:
    """RFC 9110 §11.6.1: a 401 names the scheme it wants (WWW-Authenticate), for the worker and the admin routes
    alike, missing token or wrong one; clients and proxies rely on it."""
    body = registration("w-1", "http://127.0.0.1:9")
    for refused in (await hub.post("/api/v1/workers", json=body),
                    await hub.post("/api/v1/workers", json=body, headers={"Authorization": "Bearer nope"}),
                    await hub.get("/api/v1/fleet"), await hub.get("/api/v1/fleet", headers=WORKER_AUTH)):
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", refused.headers
        assert refused.json()["error"] == "unauthorized"


async def test_the_hub_reads_a_bearer_token_whatever_the_schemes_case_and_the_spaces_around_it(
        hub: httpx.AsyncClient) -> None:
    """RFC 9110 §11.1, as on the worker: ``bearer`` or a token padded with spaces is still the token, on the admin
    and the worker routes alike, and a padded wrong one is still refused."""
    for header in (f"bearer {ADMIN_TOKEN}", f"BEARER {ADMIN_TOKEN}", f"Bearer   {ADMIN_TOKEN}  "):
        assert (await hub.get("/api/v1/fleet", headers={"Authorization": header})).status_code == 200, header
    padded = {"Authorization": f"Bearer    {WORKER_TOKEN}"}
    assert (await hub.post("/api/v1/workers", json=registration("w-1", "http://127.0.0.1:9"),
                           headers=padded)).status_code == 200
    wrong = {"Authorization": f"Bearer  {ADMIN_TOKEN}x "}
    assert (await hub.get("/api/v1/fleet", headers=wrong)).status_code == 401
    # FastAPI strips the token itself only since fastapi#14786 (2026); the floor in pyproject is older, and
    # there HTTPBearer hands the guard the spaces.
    deps._check(HTTPAuthorizationCredentials(scheme="Bearer", credentials=f"  {ADMIN_TOKEN} "), ADMIN_TOKEN, "admin")


def test_bearer_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token compared with ``==`` leaks, through timing, how much of a guess is right; every secret check goes
    through ``hmac.compare_digest``, and a missing value never matches."""
    import hmac

    from shared import auth

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    guess = "test-worker-tokeX"
    assert auth.secret_matches(WORKER_TOKEN, WORKER_TOKEN) and not auth.secret_matches(guess, WORKER_TOKEN)
    assert compared == [(WORKER_TOKEN.encode(), WORKER_TOKEN.encode()), (guess.encode(), WORKER_TOKEN.encode())]
    assert not auth.secret_matches(None, WORKER_TOKEN) and not auth.secret_matches("", WORKER_TOKEN)


async def test_a_worker_can_act_only_as_itself(hub: httpx.AsyncClient, make_worker) -> None:
    worker = await make_worker()
    reg = await register(hub, "w-1", worker)
    # The shared fleet token alone cannot heartbeat, deregister or take over a live worker's id.
    assert (await hub.post("/api/v1/workers/w-1/heartbeat", json={}, headers=WORKER_AUTH)).status_code == 403
    assert (await heartbeat(hub, "w-1", "forged-secret", [])).status_code == 403
    assert (await hub.delete("/api/v1/workers/w-1", headers=WORKER_AUTH)).status_code == 403
    forged = await hub.delete("/api/v1/workers/w-1", headers={**WORKER_AUTH, "X-Worker-Secret": "forged-secret"})
    assert forged.status_code == 403
    takeover = await hub.post("/api/v1/workers", json=registration("w-1", "http://evil:1"), headers=WORKER_AUTH)
    assert takeover.status_code == 409 and takeover.json()["error"] == "worker_conflict"
    view = (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).json()
    assert view["url"] == worker.url  # nothing changed
    # With its secret the worker re-registers, and then deregisters.
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url),
                           headers={**WORKER_AUTH, "X-Worker-Secret": reg["worker_secret"]})
    assert again.status_code == 200
    new_secret = again.json()["worker_secret"]
    gone = await hub.delete("/api/v1/workers/w-1", headers={**WORKER_AUTH, "X-Worker-Secret": new_secret})
    assert gone.status_code == 204
    assert (await heartbeat(hub, "w-1", again.json()["worker_secret"], [])).status_code == 404
    assert (await hub.get("/api/v1/workers/w-1", headers=ADMIN_AUTH)).status_code == 404


async def test_a_registration_whose_answer_was_lost_can_be_sent_again(hub: httpx.AsyncClient, make_worker) -> None:
    """A re-registration ran, but its answer (with the new secret) never reached the worker. Sent again with the
    same new secret the worker chose, it is the same registration, not a lock-out until the TTL lapses."""
    worker = await make_worker()
    old = (await register(hub, "w-1", worker))["worker_secret"]
    chosen = "n" * 20 + "0123456789abcdef"
    headers = {**WORKER_AUTH, "X-Worker-Secret": old, "X-Worker-New-Secret": chosen}
    lost = await hub.post("/api/v1/workers", json=registration("w-1", worker.url), headers=headers)
    assert lost.status_code == 200  # ...but the worker never hears of it
    assert (await heartbeat(hub, "w-1", old, [])).status_code == 403
    again = await hub.post("/api/v1/workers", json=registration("w-1", worker.url), headers=headers)
    assert again.status_code == 200 and again.json()["worker_secret"] == chosen
    assert (await heartbeat(hub, "w-1", chosen, [])).status_code == 200
    # Without the old secret, knowing a chosen secret is not enough to take the id over.
    other = {**WORKER_AUTH, "X-Worker-New-Secret": "x" * 40}
    assert (await hub.post("/api/v1/workers", json=registration("w-1", "http://evil:1"),
                           headers=other)).status_code == 409
    short = {**WORKER_AUTH, "X-Worker-Secret": chosen, "X-Worker-New-Secret": "too-short"}
    refused = await hub.post("/api/v1/workers", json=registration("w-1", worker.url), headers=short)
    assert refused.status_code == 422 and "too-short" not in refused.text


async def test_a_registration_keeps_a_drain_only_where_the_hub_lost_the_worker(hub: httpx.AsyncClient,
                                                                                make_worker: Any) -> None:
    """``drain_requested`` in a registration restores an SRE's drain the hub lost with the worker's keys (Redis
    restarted empty); a hub that still holds the worker keeps its own flag (a resume made meanwhile wins)."""
    worker = await make_worker()
    fresh = await hub.post("/api/v1/workers", json=registration("w-new", worker.url, drain_requested=True),
                           headers=WORKER_AUTH)
    assert fresh.status_code == 200 and fresh.json()["state"] == "draining"
    view = (await hub.get("/api/v1/workers/w-new", headers=ADMIN_AUTH)).json()
    assert view["state"] == "draining" and view["drain_requested"]
    assert (await hub.post("/api/v1/workers/w-new/resume", headers=ADMIN_AUTH)).json()["state"] == "ready"

    for resumed in (False, True):  # never drained (no flag stored), and drained then resumed (flag 0)
        wid = f"w-{int(resumed)}"
        secret = (await register(hub, wid, worker))["worker_secret"]
        if resumed:
            assert (await hub.post(f"/api/v1/workers/{wid}/drain", headers=ADMIN_AUTH)).status_code == 200
            assert (await hub.post(f"/api/v1/workers/{wid}/resume", headers=ADMIN_AUTH)).status_code == 200
        again = await hub.post("/api/v1/workers", json=registration(wid, worker.url, drain_requested=True),
                               headers={**WORKER_AUTH, "X-Worker-Secret": secret})
        assert again.status_code == 200 and again.json()["state"] == "ready", wid
        view = (await hub.get(f"/api/v1/workers/{wid}", headers=ADMIN_AUTH)).json()
        assert view["state"] == "ready" and not view["drain_requested"], wid
    await refresh(hub)
    listed = {w["worker_id"]: w["drain_requested"] for w in
              (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]}
    assert listed == {"w-new": False, "w-0": False, "w-1": False}


@pytest.mark.parametrize("body", [
    {"location": {"lat": 91, "lon": 0}},
    {"location": {"lat": 0, "lon": -180.5}},
    {"location": {"lat": 0, "lon": 180.5}},
    {"location": {"lat": "NaN", "lon": 0}},
    {"location": {"lat": "Infinity", "lon": 0}},
    {"session_key": ""},
    {"session_key": "a" * 129},
    {"session_key": "lesson 42"},
    {"session_key": "léçon"},
    {"labels": {"gpu": 3}},
    {"labels": {f"k{i}": "v" for i in range(33)}},  # at most 32
    {"labels": {"team": "a\nb"}},  # a label value is one printable line
    {"labels": {"team": "\x1b[2J"}},
    {"labels": {"team": "\x9b2J"}},  # the one-character CSI of the C1 controls
    {"labels": {"team": "a\u2028b"}},  # a line separator to str.splitlines()
    {"labels": {"team": "rm\x7f\x7f"}},
    {"surprise": True},
    {"region": "../../etc"},
    {"region": "xx-nowhere-1"},  # was silently the default region
    {"identity": "a\x00b"},
    [1, 2, 3],
    {"location": {"lat": True, "lon": 2}},  # was read as lat 1.0
    {"location": {"lat": "48.8", "lon": "2.3"}},  # a number is sent as a number
])
async def test_invalid_session_requests_get_a_clear_422(hub: httpx.AsyncClient, body: object) -> None:
    resp = await hub.post("/api/v1/sessions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "invalid_request" and resp.json()["message"]
    assert "Traceback" not in resp.text


async def test_a_422_lists_every_problem_up_to_ten_and_its_message_is_the_first(hub: httpx.AsyncClient) -> None:
    """A caller fixes a request in one round: the detail names each field that is wrong (at most ten, whatever the
    body holds), and the message reads the first of them."""
    three = await hub.post("/api/v1/sessions", json={"location": {"lat": 91, "lon": 500}, "session_key": ""})
    assert three.status_code == 422
    assert sorted(tuple(d["loc"]) for d in three.json()["detail"]) == [
        ("body", "location", "lat"), ("body", "location", "lon"), ("body", "session_key")]
    assert three.json()["message"].startswith(".".join(three.json()["detail"][0]["loc"][1:]) + ": ")
    many = await hub.post("/api/v1/sessions", json={"labels": {f"k{i}": i for i in range(20)}})
    assert many.status_code == 422 and len(many.json()["detail"]) == 10


async def test_bad_worker_input_changes_nothing(hub: httpx.AsyncClient) -> None:
    for body in (registration("wörker", "http://x:1"), registration("w{1}", "http://x:1"),
                 registration("w-1", "ftp://x"), registration("w-1", "http://x:1", max_streams=-1),
                 {**registration("w-1", "http://x:1"), "gpus": "A10G"},
                 registration("w-1", "http://x:1", region="xx-nowhere-1"),  # was ranked as if it stood at 0, 0
                 {**registration("w-1", "http://x:1"), "labels": {"tier": "gold\r\nforged"}}):
        assert (await hub.post("/api/v1/workers", json=body, headers=WORKER_AUTH)).status_code == 422
    assert (await hub.get("/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"] == []
    bad_hb = await hub.post("/api/v1/workers/w-1/heartbeat", json={"cpu_percent": 1e9}, headers=WORKER_AUTH)
    assert bad_hb.status_code == 422


async def test_oversized_deep_and_malformed_bodies(hub: httpx.AsyncClient) -> None:
    big = await hub.post("/api/v1/sessions", content=b'{"identity": "' + b"a" * 70_000 + b'"}',
                         headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"

    async def chunks():  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(20):
            yield b" " * 4096
    streamed = await hub.post("/api/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413

    deep = await hub.post("/api/v1/sessions", content=b"[" * 30_000 + b"]" * 30_000,
                          headers={"Content-Type": "application/json"})
    assert 400 <= deep.status_code < 500 and deep.json()["error"]
    broken = await hub.post("/api/v1/sessions", content=b'{"location": ', headers={"Content-Type": "application/json"})
    assert broken.status_code == 422
    assert broken.json()["message"] == "the body is not valid JSON (at character 13)"
    untyped = await hub.post("/api/v1/sessions", content=b'{"region": "eu-central-1"}')  # curl -d without -H
    assert untyped.status_code == 422
    assert untyped.json()["message"] == "the body must be a JSON object, sent with Content-Type: application/json"
    listed = await hub.post("/api/v1/sessions", json=[])
    assert listed.status_code == 422 and "must be a JSON object" in listed.json()["message"]
    nested = await hub.post("/api/v1/sessions", json={"location": "Berlin"})  # a field, not the body, is no object
    assert nested.status_code == 422 and nested.json()["message"].startswith("location: "), nested.text


@pytest.mark.parametrize(("body", "said"), [
    (b'{"identity": "\xff\xfe"}', "the body is not valid UTF-8"),
    (b'{"location": {"lat": ' + b"9" * 5000 + b', "lon": 0}}', "a number in the body has too many digits"),
    (b'{"labels": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "the body's JSON is nested too deeply"),
], ids=["not-utf8", "long-number", "deep"])
async def test_a_body_the_json_parser_raises_on_gets_a_400_that_says_why(hub: httpx.AsyncClient, body: bytes,
                                                                          said: str) -> None:
    """FastAPI answers these with one catch-all ("There was an error parsing the body"), which left the caller to
    guess which of the three it was."""
    resp = await hub.post("/api/v1/sessions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json() == {"error": "bad_request", "message": said}, resp.text


async def test_a_path_with_a_trailing_slash_is_a_json_404_not_a_redirect(hub: httpx.AsyncClient) -> None:
    """The redirect named http:// behind a load balancer that ends TLS (a client following it left https), and
    answered an empty body."""
    for method, path in (("POST", "/api/v1/sessions/"), ("GET", "/metrics/"), ("GET", "/api/v1/workers/")):
        resp = await hub.request(method, path, headers={"X-Forwarded-Proto": "https", **ADMIN_AUTH}, json={})
        assert resp.status_code == 404 and "location" not in resp.headers, (path, resp.status_code, resp.headers)
        slashless = path.rstrip("/")
        assert resp.json() == {"error": "not_found",
                               "message": f"Not Found: {path} has no route, {slashless} has (no trailing slash)"}
    nowhere = await hub.get("/nowhere/", headers=ADMIN_AUTH)
    assert nowhere.json() == {"error": "not_found", "message": "Not Found"}  # no route either way: no hint


async def test_a_validators_message_is_given_without_pydantics_prefix(hub: httpx.AsyncClient) -> None:
    resp = await hub.post("/api/v1/sessions", json={"identity": "agent-7"})
    assert resp.status_code == 422
    assert resp.json()["message"] == "identity: identities beginning with 'agent-' are the workers' agents'"


async def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused(make_hub) -> None:
    """``FLEET_MAX_BODY_BYTES`` is the largest body accepted, announced by Content-Length or streamed."""
    hub = await make_hub(max_body_bytes=256)

    def body(size: int) -> bytes:
        return b"{" + b" " * (size - 2) + b"}"

    async def streamed(data: bytes):  # no Content-Length
        for i in range(0, len(data), 100):
            yield data[i:i + 100]
    json_type = {"Content-Type": "application/json"}
    for send in (lambda data: data, streamed):
        at_limit = await hub.post("/api/v1/sessions", content=send(body(256)), headers=json_type)
        assert at_limit.status_code == 503 and at_limit.json()["error"] == "no_capacity"  # placed: no workers
        over = await hub.post("/api/v1/sessions", content=send(body(257)), headers=json_type)
        assert over.status_code == 413 and over.json() == {
            "error": "body_too_large", "message": "request bodies are limited to 256 bytes"}
        assert over.content == b'{"error":"body_too_large","message":"request bodies are limited to 256 bytes"}'


async def test_unknown_routes_and_ids_are_json_404s(hub: httpx.AsyncClient) -> None:
    for path in ("/nope", "/api/v1/sessions/not-a-session", "/api/v1/sessions/w-1~abcdefghijkl"):
        resp = await hub.get(path)
        assert resp.status_code == 404 and resp.json()["error"] in ("not_found", "session_not_found")
    assert (await hub.get("/api/v1/workers/ghost", headers=ADMIN_AUTH)).status_code == 404
    assert (await hub.post("/api/v1/workers/ghost/drain", headers=ADMIN_AUTH)).status_code == 404


async def test_an_unexpected_failure_is_a_json_500_that_tells_the_caller_nothing_of_its_cause(
    hub: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug or a library's surprise is logged for the SRE with its traceback; the caller gets the error body and a
    fixed message, never the exception's text (it may carry a Redis URL with its password, a token, a path)."""
    cause = "redis://:hunter2-password@10.0.0.5:6379 went away"

    async def broken(session_id: str) -> None:
        raise RuntimeError(cause)

    monkeypatch.setattr(hub.app.state.hub.allocator, "get", broken)  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=hub.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        resp = await client.get("/api/v1/sessions/w-1~abcdefghijkl")
    assert resp.status_code == 500
    assert resp.json() == {"error": "internal_error", "message": "the hub could not handle this request"}
    assert "hunter2" not in resp.text and "RuntimeError" not in resp.text and "Traceback" not in resp.text
    assert any(r.exc_info and cause in str(r.exc_info[1]) for r in caplog.records), "the SRE sees the cause"
    # The route, not the path: a session's path holds its id, and the id ends the session.
    assert "GET /api/v1/sessions/{session_id}" in caplog.text and "abcdefghijkl" not in caplog.text, caplog.text


async def test_a_listed_origins_page_reads_the_500_of_an_unexpected_failure(
        make_hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The 500 carries the CORS headers, so a page's developer sees the hub's answer, not a CORS failure that says
    nothing; it still tells the caller nothing of its cause, which the SRE finds in the log."""
    hub = await make_hub(cors_origins=["https://app.example.com"])

    async def broken(session_id: str) -> None:
        raise RuntimeError("redis://:hunter2-password@10.0.0.5:6379 went away")

    monkeypatch.setattr(hub.app.state.hub.allocator, "get", broken)  # type: ignore[attr-defined]
    resp = await hub.get("/api/v1/sessions/w-1~abcdefghijkl", headers={"Origin": "https://app.example.com"})
    assert resp.status_code == 500 and resp.headers["access-control-allow-origin"] == "https://app.example.com"
    assert resp.json() == {"error": "internal_error", "message": "the hub could not handle this request"}
    assert any(r.exc_info and "hunter2" in str(r.exc_info[1]) for r in caplog.records), "the SRE sees the cause"
    # Answered inside the middlewares, it is logged by its route too, not by the path that holds the session id.
    assert "GET /api/v1/sessions/{session_id}" in caplog.text and "abcdefghijkl" not in caplog.text, caplog.text


async def test_a_client_past_its_burst_is_refused_even_when_its_next_token_is_due_within_a_second(make_hub) -> None:
    """The limit holds at any rate: at 2 requests a second a client's next token is 0.5 s away, and a request
    sent before it is still a 429 (with Retry-After: 1, the header's smallest whole number), not let through.
    (At 10 a second, a runner loaded enough to take 0.1 s over three requests let the third one through.)"""
    hub = await make_hub(rate_limit_per_s=2, rate_limit_burst=2)
    codes = [(await hub.post("/api/v1/sessions", json={})).status_code for _ in range(2)]
    assert codes == [503, 503]  # through to placement (no workers)
    limited = await hub.post("/api/v1/sessions", json={})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1", limited.headers


async def test_reading_or_ending_a_session_id_of_no_worker_is_a_404(hub: httpx.AsyncClient) -> None:
    """A session id is ``<worker id>~<random>``; one that names no worker (a typo, a truncated copy, a guess) is
    a session the hub does not hold, whether read or ended: 404, never a 500."""
    for session_id in ("not-a-session", "~abcdefghijkl", "w-1~", "w%20x~abc", "a" * 200):
        for method in ("GET", "DELETE"):
            resp = await hub.request(method, f"/api/v1/sessions/{session_id}")
            assert resp.status_code == 404 and resp.json()["error"] == "session_not_found", (method, session_id)


def test_production_refuses_unsafe_defaults(redis_url: str) -> None:
    with pytest.raises(ValidationError, match=r"FLEET_REDIS_URL.*FLEET_WORKER_TOKEN.*FLEET_ADMIN_TOKEN.*LIVEKIT"):
        HubSettings(env="prod")
    with pytest.raises(ValidationError, match="FLEET_ADMIN_TOKEN must differ from FLEET_WORKER_TOKEN"):
        HubSettings(env="prod", redis_url=redis_url, worker_token="s" * 32, admin_token="s" * 32,
                    livekit_regions=json.dumps(LIVEKIT))
    with pytest.raises(ValidationError) as refused:  # the error names what is wrong, never the values it was given
        HubSettings(env="prod", worker_token="w-secret-" * 4, admin_token="a-secret-" * 4)
    assert "w-secret-" not in str(refused.value) and "a-secret-" not in str(refused.value)
    dev_secret = json.dumps([{**LIVEKIT[0], "api_secret": "secret"}])
    with pytest.raises(ValidationError, match="LiveKit API secrets must not be the dev default"):
        HubSettings(env="prod", redis_url=redis_url, worker_token="w" * 32, admin_token="a" * 32,
                    livekit_regions=dev_secret)
    ok = HubSettings(env="prod", redis_url="rediss://:redis-auth-token@cache:6379", worker_token="w" * 32,
                     admin_token="a" * 32, livekit_regions=json.dumps(LIVEKIT))
    for secret in ("s1-0123", "w" * 32, "a" * 32, "redis-auth-token"):
        assert secret not in repr(ok) and secret not in str(ok)  # secrets never print
    short_lk = json.dumps([{**LIVEKIT[0], "api_secret": "x" * 31}])
    for kwargs, said in (({"worker_token": "w" * 31}, "FLEET_WORKER_TOKEN must have at least 32"),
                         ({"admin_token": "a" * 31}, "FLEET_ADMIN_TOKEN must have at least 32"),
                         ({"livekit_regions": short_lk}, "LiveKit API secrets must have at least 32")):
        good = {"redis_url": redis_url, "worker_token": "w" * 32, "admin_token": "a" * 32,
                "livekit_regions": json.dumps(LIVEKIT)}
        with pytest.raises(ValidationError, match=said):  # guessable in seconds
            HubSettings(env="prod", **{**good, **kwargs})


def test_configuration_that_would_fail_every_request_stops_the_hub_at_start(tmp_path) -> None:
    secret_entry = json.dumps([{**LIVEKIT[0], "lat": "north", "api_secret": "do-not-print-me"}])
    for livekit_regions, said in (("[]", "lists no LiveKit deployment"),
                                  (str(tmp_path / "gone.yaml"), "cannot be read"),
                                  (secret_entry, "invalid deployment: lat: Input should be a valid number")):
        with pytest.raises(ValidationError, match=said) as refused:
            HubSettings(livekit_regions=livekit_regions)
        assert "do-not-print-me" not in str(refused.value)
    with pytest.raises(ValidationError, match=r"'proxy\.internal' is not an IP address or CIDR"):
        HubSettings(trusted_proxies=["10.0.0.0/8", "proxy.internal"])
    with pytest.raises(ValidationError, match="has no known coordinates"):  # every user with no location
        HubSettings(default_region="xx-nowhere-1")
    with pytest.raises(ValidationError, match="weight_load"):  # every score became NaN; explain showed null
        HubSettings(weight_load=float("inf"))
    with pytest.raises(ValidationError, match="livekit_token_ttl_s"):  # every token's expiry overflowed: a 500 each
        HubSettings(livekit_token_ttl_s=10**12)
    typo = tmp_path / "livekit.yaml"  # a YAML error quotes the line it stopped at: here, the secret's
    typo.write_text("- region: eu\n  url: wss://lk\n  api_secret: `do-not-print-me-either\n")
    with pytest.raises(ValidationError, match="not valid YAML at line 3") as refused:
        HubSettings(livekit_regions=str(typo))
    assert "do-not-print-me-either" not in str(refused.value)


def test_an_inline_livekit_value_is_never_echoed_and_each_region_is_named_once() -> None:
    """A value that is not a list was taken for a path, and the "no such file" error quoted it, secret and all."""
    entry = {**LIVEKIT[0], "api_secret": "do-not-print-me-" + "s" * 20}
    one_line_yaml = "region: eu api_secret: " + entry["api_secret"]
    for livekit_regions, said in ((json.dumps(entry), "expected a list of deployments"),
                                  (one_line_yaml, "names a file that cannot be read")):
        with pytest.raises(ValidationError, match=said) as refused:
            HubSettings(livekit_regions=livekit_regions)
        assert "do-not-print-me" not in str(refused.value)
    inline_yaml = "\n".join(f"- {key}: {value}" if n == 0 else f"  {key}: {value}"
                            for n, (key, value) in enumerate(entry.items()))
    assert [d.region for d in HubSettings(livekit_regions=inline_yaml).livekit_deployments] == [entry["region"]]
    # Sessions find their deployment by region name: a second one under the same name got the other's URL.
    twice = json.dumps([LIVEKIT[0], {**LIVEKIT[1], "region": LIVEKIT[0]["region"]}])
    with pytest.raises(ValidationError, match=f"names a region more than once: {LIVEKIT[0]['region']}"):
        HubSettings(livekit_regions=twice)


async def test_a_worker_url_the_hub_could_not_call_is_refused_at_registration(hub: httpx.AsyncClient) -> None:
    """Once registered, such a URL turned every placement that ranked the worker first into a 500."""
    for url in ("http://user:pass@10.0.0.5:8000", "http://user@10.0.0.5:8000", "http://a..b:8000",
                f"http://{'a' * 70}.example.com"):
        resp = await hub.post("/api/v1/workers", json=registration("w-bad", url), headers=WORKER_AUTH)
        assert resp.status_code == 422 and resp.json()["error"] == "invalid_request", (url, resp.text)
        assert "pass@" not in resp.text


async def test_livekit_region_minimises_the_media_path_and_location_sources(
    make_hub, make_worker, tmp_path
) -> None:
    config = tmp_path / "livekit.yaml"
    config.write_text(json.dumps(LIVEKIT))  # JSON is valid YAML
    hub = await make_hub(livekit_regions=str(config))
    eu_worker = await make_worker()
    await register(hub, "w-eu", eu_worker, region="eu-central-1")
    await refresh(hub)

    berlin = await hub.post("/api/v1/sessions", json={"location": {"lat": 52.5, "lon": 13.4}})
    assert berlin.status_code == 201
    lk = berlin.json()["livekit"]
    assert lk["region"] == "eu" and lk["url"] == "wss://lk-eu.example"
    claims = api.TokenVerifier("k2", LIVEKIT[1]["api_secret"]).verify(lk["token"])
    assert claims.video.room == lk["room"]
    assert LIVEKIT[1]["api_secret"] not in berlin.text

    explain = await hub.get("/api/v1/route/explain", params={"region": "us-west-2"}, headers=ADMIN_AUTH)
    assert explain.json()["location_source"] == "region"
    cand = explain.json()["candidates"][0]
    assert cand["worker_id"] == "w-eu" and cand["factors"]["distance_km"] > 8000
    assert set(cand["factors"]) == {"distance_km", "rtt_ms", "distance", "load", "latency", "capacity"}
    half = await hub.get("/api/v1/route/explain", params={"lat": 52.5}, headers=ADMIN_AUTH)  # was the default region
    assert half.status_code == 422 and "lat and lon are given together" in half.text
    nowhere = await hub.get("/api/v1/route/explain", params={"region": "xx-nowhere-1"}, headers=ADMIN_AUTH)
    assert nowhere.status_code == 422 and "has no known coordinates" in nowhere.text


def test_a_location_is_taken_from_the_body_then_cloudfront_then_the_region_then_the_default() -> None:
    """The explain view shows where a user was placed from (``location_source``): the SRE reading it must see which
    of the four sources won, each named for what it is."""
    from hub.allocator import ResolvedLocation, resolve_location
    from shared.models import Location

    body, edge = Location(lat=52.5, lon=13.4), Location(lat=35.6, lon=139.7)
    oregon, frankfurt = resolve_location(None, None, "us-west-2", "eu-central-1"), resolve_location(
        None, None, None, "eu-central-1")
    assert resolve_location(body, edge, "us-west-2", "eu-central-1") == ResolvedLocation(body, "body")
    assert resolve_location(None, edge, "us-west-2", "eu-central-1") == ResolvedLocation(edge, "cloudfront")
    assert oregon.source == "region" and frankfurt.source == "default"
    assert oregon.location.lon < -100 and 0 < frankfurt.location.lon < 15


async def test_a_worker_in_a_region_missing_from_the_table_is_placed_where_it_says(make_hub, make_worker) -> None:
    """A worker in a region with no known coordinates stood at 0, 0: users near it went elsewhere, users near the
    Gulf of Guinea came to it. Now such a registration must say where it is, and newer regions are known."""
    hub = await make_hub()
    bangkok, singapore, elsewhere = await make_worker(), await make_worker(), await make_worker()
    await register(hub, "w-bkk", bangkok, region="ap-southeast-7")
    await register(hub, "w-sin", singapore, region="ap-southeast-1")
    unlisted = registration("w-new", elsewhere.url, region="xx-newplace-1", location={"lat": 52.5, "lon": 13.4})
    assert (await hub.post("/api/v1/workers", json=unlisted, headers=WORKER_AUTH)).status_code == 200
    without = registration("w-lost", elsewhere.url, region="xx-newplace-1")
    refused = await hub.post("/api/v1/workers", json=without, headers=WORKER_AUTH)
    assert refused.status_code == 422 and "send `location`" in refused.text
    await refresh(hub)
    near_bangkok = await hub.get("/api/v1/route/explain", params={"lat": 13.7, "lon": 100.5}, headers=ADMIN_AUTH)
    assert [c["worker_id"] for c in near_bangkok.json()["candidates"]][:2] == ["w-bkk", "w-sin"]
    near_berlin = await hub.get("/api/v1/route/explain", params={"lat": 52.5, "lon": 13.4}, headers=ADMIN_AUTH)
    assert near_berlin.json()["candidates"][0]["worker_id"] == "w-new"


async def test_the_explain_view_lists_as_many_candidates_as_asked_between_one_and_a_hundred(
    make_hub, make_worker
) -> None:
    """``limit`` bounds the candidates listed; 0 or 101 is a 422 naming ``limit``, not a list of another length."""
    hub = await make_hub()
    for i in range(3):
        await register(hub, f"w-{i}", await make_worker(), region="eu-central-1")
    await refresh(hub)
    for limit, listed in ((1, 1), (2, 2), (100, 3)):
        resp = await hub.get("/api/v1/route/explain", params={"limit": limit}, headers=ADMIN_AUTH)
        assert len(resp.json()["candidates"]) == listed, (limit, resp.text)
    for limit in (0, 101, -1):
        resp = await hub.get("/api/v1/route/explain", params={"limit": limit}, headers=ADMIN_AUTH)
        assert resp.status_code == 422 and resp.json()["message"].startswith("query.limit: "), (limit, resp.text)


async def test_cloudfront_viewer_headers_locate_the_user(make_hub, make_worker) -> None:
    hub = await make_hub()
    near, far = await make_worker(), await make_worker()
    await register(hub, "w-tokyo", near, region="ap-northeast-1")
    await register(hub, "w-virginia", far, region="us-east-1")
    await refresh(hub)
    headers = {"CloudFront-Viewer-Latitude": "35.6", "CloudFront-Viewer-Longitude": "139.7"}
    resp = await hub.post("/api/v1/sessions", json={}, headers=headers)
    assert resp.json()["worker"]["id"] == "w-tokyo"
    # The body beats the headers.
    body_loc = await hub.post("/api/v1/sessions", json={"location": {"lat": 40.7, "lon": -74}}, headers=headers)
    assert body_loc.json()["worker"]["id"] == "w-virginia"
    # Coordinates no place has (a header forged or mangled on the way) are ignored, not a 4xx or 5xx to the user.
    for bogus in ({"CloudFront-Viewer-Latitude": "123", "CloudFront-Viewer-Longitude": "139.7"},
                  {"CloudFront-Viewer-Latitude": "35.6", "CloudFront-Viewer-Longitude": "500"},
                  {"CloudFront-Viewer-Latitude": "nan", "CloudFront-Viewer-Longitude": "inf"}):
        placed = await hub.post("/api/v1/sessions", json={"region": "us-east-1"}, headers=bogus)
        assert placed.status_code == 201 and placed.json()["worker"]["id"] == "w-virginia", (bogus, placed.text)


def test_garbled_or_half_cloudfront_viewer_headers_are_ignored_not_a_500() -> None:
    """CloudFront's viewer headers can arrive mangled or one without the other (a proxy that drops one, a client
    forging them): the request is then placed by its body or region, never answered with a 500."""
    from starlette.requests import Request

    from hub.api.sessions import cloudfront_location

    def located(**headers: str) -> object:
        raw = [(f"cloudfront-viewer-{k}".encode(), v.encode()) for k, v in headers.items()]
        return cloudfront_location(Request({"type": "http", "method": "POST", "path": "/", "headers": raw}))

    assert located(latitude="35.6", longitude="139.7") is not None
    for headers in ({"latitude": "35.6"}, {"longitude": "139.7"}, {"latitude": "35.6", "longitude": ""},
                    {"latitude": "north", "longitude": "139.7"}, {"latitude": "35.6", "longitude": "1e999x"},
                    {"latitude": "35,6", "longitude": "139,7"}):
        assert located(**headers) is None, headers


async def test_session_creation_is_rate_limited_per_client(make_hub) -> None:
    hub = await make_hub(rate_limit_per_s=1, rate_limit_burst=3, trusted_proxies=["127.0.0.1"])
    codes = [(await hub.post("/api/v1/sessions", json={})).status_code for _ in range(4)]
    assert codes[:3] == [503, 503, 503]  # allowed through to placement (no workers)
    limited = await hub.post("/api/v1/sessions", json={})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    metrics = (await hub.get("/metrics")).text  # regression: refusals before placement were never counted
    assert 'fleet_allocations_total{outcome="rate_limited"} 2.0' in metrics
    assert 'fleet_allocation_seconds_count{outcome="rate_limited"} 2.0' in metrics  # the histogram agrees
    assert 'fleet_allocations_total{outcome="no_capacity"} 3.0' in metrics


def test_openapi_documents_the_contract() -> None:
    from hub.main import create_app

    schema = create_app(HubSettings(worker_token=WORKER_TOKEN, admin_token=ADMIN_TOKEN)).openapi()
    paths = schema["paths"]
    for path, method in [("/api/v1/sessions", "post"), ("/api/v1/sessions/{session_id}", "delete"),
                         ("/api/v1/workers", "post"), ("/api/v1/workers/{worker_id}/heartbeat", "post"),
                         ("/api/v1/workers/{worker_id}/drain", "post"), ("/api/v1/fleet", "get"),
                         ("/api/v1/route/explain", "get"), ("/ready", "get"), ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    assert "503" in paths["/api/v1/sessions"]["post"]["responses"]
    # A client generated from the contract gets methods named as the handlers are, and reads Retry-After.
    operations = [operation for methods in paths.values() for operation in methods.values()]
    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids)) and {"create_session", "get_session", "end_session", "list_workers"} <= set(ids)
    for status in ("429", "503"):
        assert "Retry-After" in paths["/api/v1/sessions"]["post"]["responses"][status]["headers"], status
    assert "no_matching_worker" in paths["/api/v1/sessions"]["post"]["responses"]["503"]["description"]
    # Every 422 is the hub's own error body, never FastAPI's {"detail": [...]}.
    for path, methods in paths.items():
        for method, operation in methods.items():
            if "422" in operation["responses"]:
                body = operation["responses"]["422"]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, body)


def test_the_contract_says_a_404_for_a_session_means_it_has_ended() -> None:
    """A client generated from the contract learns, for reading and for ending a session, that a 404 is
    ``session_not_found``: the session has ended, and ending it again is done."""
    paths = create_app(HubSettings(worker_token=WORKER_TOKEN, admin_token=ADMIN_TOKEN)).openapi()["paths"]
    for method in ("get", "delete"):
        answer = paths["/api/v1/sessions/{session_id}"][method]["responses"]["404"]
        assert "session_not_found" in answer["description"], (method, answer)
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


@pytest.mark.parametrize("body", [{"labels": {"bad key": "v"}}, {"region": "ap-south-9"}])
async def test_a_body_the_hub_refuses_the_contract_refuses_too(hub: httpx.AsyncClient, body: dict[str, Any]) -> None:
    """A client that checks its requests against /openapi.json learns of these before the hub answers 422: a label
    key of the wrong form (the schema had the key pattern only as patternProperties, which let any other key
    through) and a region of the right form that the hub has no coordinates for."""
    import jsonschema_rs

    assert (await hub.post("/api/v1/sessions", json=body)).status_code == 422
    contract = (await hub.get("/openapi.json")).json()
    request = jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/SessionRequest",
                                                  "components": contract["components"]})
    assert not request.is_valid(body)
    assert request.is_valid({"labels": {"gpu": "a10g"}, "region": "eu-west-1"})


async def test_head_is_answered_wherever_get_is(make_running_hub: Any) -> None:
    """Over real HTTP (uvicorn): headers as for GET, no body; auth and 404s as for GET; POST-only paths stay 405."""
    running = await make_running_hub()
    async with httpx.AsyncClient(base_url=running.url, timeout=5) as client:
        get, head = await client.get("/health"), await client.head("/health")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"] != "0"
        assert (await client.head("/dashboard")).status_code == 200
        assert (await client.head("/api/v1/workers")).status_code == 401
        assert (await client.head("/api/v1/workers", headers=ADMIN_AUTH)).status_code == 200
        assert (await client.head("/api/v1/sessions/w-1~abcdefghijkl")).status_code == 404
        assert (await client.head("/api/v1/workers/w-1/heartbeat")).status_code == 405


async def test_a_405_names_every_method_of_the_path(hub: httpx.AsyncClient) -> None:
    """/api/v1/sessions is served by two routers (public POST, admin GET); Allow lists both."""
    wrong = await hub.put("/api/v1/sessions", json={})
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET, POST"
    assert wrong.json()["error"] == "method_not_allowed"


async def test_the_start_up_heap_is_frozen_while_a_hub_runs_and_released_after(redis_url: str) -> None:
    app = create_app(hub_settings(redis_url))
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000  # modules, routes, schemas: out of the collector's generations
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("url", [
    "redis://", "redis:///1", "redis://:pw@/0", "redis://[::1]:6379/0", "unix:///run/redis.sock?db=2",
    "redis://user:pw@h:1/2", "rediss://h:6379?ssl_cert_reqs=none", "redis+cluster://h:7000",
    "rediss+cluster://:tok%23en@h:6379",
])
def test_every_redis_url_redis_py_reads_is_accepted(url: str) -> None:
    assert HubSettings(redis_url=url).redis_url == url


@pytest.mark.parametrize("url", [
    "redis://:Top#SecretTail@h:6379", "redis://default:4567#SecretTail@127.0.0.1:6379/0", "redis://u:12?x@h:6379",
    "redis://:ab/cd@h:6379", "redis://h:6379/x", "http://h:6379",
])
def test_a_redis_url_with_an_unencoded_password_is_refused_without_echoing_it(url: str) -> None:
    """Regression: with a username before it, a password starting with digits and holding '#' passed, and the hub
    went on to connect to a host named after the username."""
    with pytest.raises(ValidationError) as err:
        HubSettings(redis_url=url)
    assert "SecretTail" not in str(err.value) and "Top" not in str(err.value)


async def test_a_reused_session_key_keeps_the_livekit_deployment_its_session_was_placed_on(
    make_hub, make_worker, tmp_path
) -> None:
    """A New York user on a Frankfurt worker is placed on the EU SFU (the shorter media path), though the US one is
    nearer the user: asking again with the session_key, or reading the session, names that same SFU and signs for
    it. Another one would send the client to a room where the agent never is."""
    config = tmp_path / "livekit.yaml"
    config.write_text(json.dumps(LIVEKIT))
    hub = await make_hub(livekit_regions=str(config))
    await register(hub, "w-eu", await make_worker(), region="eu-central-1")
    await refresh(hub)
    ask = {"session_key": "conv-sfu", "location": {"lat": 40.7, "lon": -74.0}}

    first = await hub.post("/api/v1/sessions", json=ask)
    assert first.status_code == 201, first.text
    assert first.json()["livekit"]["region"] == "eu"
    again = await hub.post("/api/v1/sessions", json=ask)
    assert again.status_code == 200, again.text
    lk = again.json()["livekit"]
    assert (lk["region"], lk["url"], lk["room"]) == ("eu", "wss://lk-eu.example", first.json()["livekit"]["room"])
    assert api.TokenVerifier("k2", LIVEKIT[1]["api_secret"]).verify(lk["token"]).video.room == lk["room"]
    read = (await hub.get(f"/api/v1/sessions/{first.json()['session_id']}")).json()["livekit"]
    assert (read["region"], read["url"]) == ("eu", "wss://lk-eu.example")


async def test_the_explain_view_ranks_by_the_policy_asked_for(make_hub, make_worker) -> None:
    """``?policy=pack`` shows the ranking pack would make (the busier worker first), not the hub's default one."""
    hub = await make_hub(policy="spread")
    await register(hub, "w-idle", await make_worker(), region="eu-central-1")
    busy = await register(hub, "w-busy", await make_worker(), region="eu-central-1")
    assert (await heartbeat(hub, "w-busy", busy["worker_secret"], [], gpu_utilization=90.0)).status_code == 200
    await refresh(hub)
    for policy, first in (("spread", "w-idle"), ("pack", "w-busy")):
        resp = await hub.get("/api/v1/route/explain", params={"lat": 50.1, "lon": 8.7, "policy": policy},
                             headers=ADMIN_AUTH)
        assert resp.json()["policy"] == policy, resp.text
        assert [c["worker_id"] for c in resp.json()["candidates"]] == [first, ({"w-idle", "w-busy"} - {first}).pop()]


async def test_half_a_location_in_the_explain_view_names_the_missing_coordinate(hub: httpx.AsyncClient) -> None:
    """``?lat=`` without ``lon`` (or the reverse) is a 422 that points at the coordinate left out."""
    for given, missing in (("lat", "lon"), ("lon", "lat")):
        resp = await hub.get("/api/v1/route/explain", params={given: 10.0}, headers=ADMIN_AUTH)
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["query", missing], resp.text


async def test_the_explain_view_names_the_livekit_deployment_of_its_first_candidate(make_hub, make_worker) -> None:
    """The LiveKit region an explanation shows is the one a session placed now would use: beside its head worker,
    not beside the last candidate listed."""
    hub = await make_hub(livekit_regions=json.dumps(LIVEKIT))
    await register(hub, "w-eu", await make_worker(), region="eu-central-1")
    await register(hub, "w-use", await make_worker(), region="us-east-1")
    await refresh(hub)
    for (lat, lon), head, livekit in (((52.5, 13.4), "w-eu", "eu"), ((40.7, -74.0), "w-use", "us-east")):
        explain = (await hub.get("/api/v1/route/explain", params={"lat": lat, "lon": lon}, headers=ADMIN_AUTH)).json()
        assert len(explain["candidates"]) == 2 and explain["candidates"][0]["worker_id"] == head, explain
        assert explain["livekit_region"] == livekit, explain


async def test_a_bad_label_in_the_explain_view_is_a_422_naming_that_label(hub: httpx.AsyncClient) -> None:
    """``?label=engine=<too long>`` points at ``engine``, as a session request's 422 would, not at every label."""
    resp = await hub.get("/api/v1/route/explain", params={"label": ["gpu=a10g", "engine=" + "x" * 129]},
                         headers=ADMIN_AUTH)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["query", "label", "engine"], resp.text


async def test_a_label_given_twice_in_the_explain_view_is_a_422_not_its_last_value(hub: httpx.AsyncClient) -> None:
    """``?label=gpu=a10g&label=gpu=t4`` asks for no worker a session request could ask for; the SRE hears which
    label was doubled instead of reading candidates for ``gpu=t4`` alone."""
    resp = await hub.get("/api/v1/route/explain", params={"label": ["gpu=a10g", "gpu=t4"]}, headers=ADMIN_AUTH)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["query", "label", "gpu"], resp.text


async def test_an_overlong_region_filter_is_a_422_not_an_empty_list(hub: httpx.AsyncClient) -> None:
    """No region name is 33 characters long: an SRE's typo is named, not answered with "no workers"."""
    for path in ("/api/v1/workers", "/api/v1/sessions"):
        resp = await hub.get(path, params={"region": "eu-central-1" * 3}, headers=ADMIN_AUTH)
        assert resp.status_code == 422 and resp.json()["message"].startswith("query.region: "), (path, resp.text)


async def test_metrics_are_served_under_their_plain_path_only(hub: httpx.AsyncClient) -> None:
    """The load balancer keeps ``/metrics`` inside by matching the path as sent: a percent-encoded spelling, which
    the server decodes to the same route, must be a 404 rather than the metrics."""
    assert (await hub.get("/metrics")).text.startswith("# HELP")
    assert (await hub.get("/metrics", params={"name[]": "fleet_workers"})).status_code == 200
    for path in ("/%6detrics", "/%6Detrics", "/metric%73"):
        resp = await hub.get(path)
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", (path, resp.text)
        assert "fleet_" not in resp.text


async def test_a_worker_stands_where_its_registration_says_even_in_a_known_region(hub: httpx.AsyncClient) -> None:
    """A registration's ``location`` wins over its region's centre (a region's zones can be far apart); without
    one the worker stands at the centre of its region."""
    placed = registration("w-placed", "http://127.0.0.1:9/w", region="us-east-1", location={"lat": 40.7, "lon": -74.0})
    centred = registration("w-centred", "http://127.0.0.1:9/w", region="us-east-1")
    for body in (placed, centred):
        assert (await hub.post("/api/v1/workers", json=body, headers=WORKER_AUTH)).status_code == 200
    assert (await hub.get("/api/v1/workers/w-placed", headers=ADMIN_AUTH)).json()["location"] == {"lat": 40.7,
                                                                                                   "lon": -74.0}
    centre = (await hub.get("/api/v1/workers/w-centred", headers=ADMIN_AUTH)).json()["location"]
    assert centre != {"lat": 40.7, "lon": -74.0} and abs(centre["lat"] - 38.9) < 1, centre


async def test_behind_a_cdn_each_viewer_has_its_own_session_rate_limit(make_hub) -> None:
    """With ``client_address_header`` set, the viewer the CDN names is the client: one viewer past its burst is
    refused while another, arriving through the same edge, is not."""
    hub = await make_hub(rate_limit_per_s=1, rate_limit_burst=1, trusted_proxies=["127.0.0.1"],
                         client_address_header="CloudFront-Viewer-Address")
    edge = {"X-Forwarded-For": "130.176.0.7"}

    async def ask(viewer: str) -> int:
        headers = {**edge, "CloudFront-Viewer-Address": f"{viewer}:443"}
        return (await hub.post("/api/v1/sessions", json={}, headers=headers)).status_code

    assert [await ask("198.51.100.10"), await ask("198.51.100.10")] == [503, 429]  # no workers: 503 once through
    assert await ask("203.0.113.20") == 503


async def test_a_worker_or_heartbeat_past_the_wire_bounds_is_refused(hub: httpx.AsyncClient) -> None:
    """A worker offering more streams than one heartbeat may list could never report them all, and figures past
    100 % or an error rate past 1 would skew every score it gets: each is a 422, the bound itself is accepted."""
    too_many = registration("w-1", "http://127.0.0.1:9", max_streams=MAX_STREAMS_PER_WORKER + 1)
    assert (await hub.post("/api/v1/workers", json=too_many, headers=WORKER_AUTH)).status_code == 422
    full = await hub.post("/api/v1/workers", json=registration("w-1", "http://127.0.0.1:9",
                                                               max_streams=MAX_STREAMS_PER_WORKER),
                          headers=WORKER_AUTH)
    assert full.status_code == 200, full.text
    secret = full.json()["worker_secret"]
    at_bounds = {"cpu_percent": 100, "memory_percent": 100, "gpu_utilization": 100, "error_rate": 1}
    assert (await heartbeat(hub, "w-1", secret, [], **at_bounds)).status_code == 200
    for past in ({"cpu_percent": 100.5}, {"memory_percent": 101}, {"gpu_utilization": 150}, {"error_rate": 1.5}):
        resp = await heartbeat(hub, "w-1", secret, [], **past)
        assert resp.status_code == 422 and resp.json()["message"].startswith(next(iter(past))), (past, resp.text)


def test_the_log_level_is_read_in_any_case() -> None:
    """``FLEET_LOG_LEVEL=debug`` is what an SRE types: it means DEBUG, not a refusal to start."""
    assert HubSettings(log_level="debug").log_level == "DEBUG"
    assert HubSettings(log_level="Warning").log_level == "WARNING"
    with pytest.raises(ValidationError, match="log_level"):
        HubSettings(log_level="verbose")


async def test_an_oversized_body_gets_its_413_over_real_http(make_running_hub: Any) -> None:
    """Through uvicorn the refusal must be a well-formed answer (its Content-Length that of its body), announced
    or streamed, or the client waits for bytes that never come."""
    running = await make_running_hub(max_body_bytes=1024)

    async def chunks():  # no Content-Length
        for _ in range(4):
            yield b" " * 512
    async with httpx.AsyncClient(base_url=running.url, timeout=5) as client:
        for content in (b"{" + b" " * 2000 + b"}", chunks()):
            resp = await client.post("/api/v1/sessions", content=content, headers={"Content-Type": "application/json"})
            assert resp.status_code == 413 and resp.json() == {
                "error": "body_too_large", "message": "request bodies are limited to 1024 bytes"}


async def test_each_client_has_its_own_rate_limit(make_hub: Any) -> None:
    """One client past its burst is refused; another, behind the same trusted proxy, is still let through."""
    hub = await make_hub(rate_limit_per_s=0.01, rate_limit_burst=2, trusted_proxies=["127.0.0.1"])
    first, second = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    codes = [(await hub.post("/api/v1/sessions", json={}, headers=first)).status_code for _ in range(3)]
    assert codes == [503, 503, 429]  # through to placement (no workers), then limited
    assert (await hub.post("/api/v1/sessions", json={}, headers=second)).status_code == 503
    assert (await hub.post("/api/v1/sessions", json={}, headers=first)).status_code == 429


async def test_an_ipv6_client_spends_the_rate_limit_of_its_slash_64(make_hub: Any) -> None:
    """A host is routinely given a whole /64: counting each of its addresses apart gave it 2^64 rate limits. Another
    /64 has its own, and an IPv4-mapped address is its IPv4."""
    hub = await make_hub(rate_limit_per_s=0.01, rate_limit_burst=2, trusted_proxies=["127.0.0.1"])

    async def asked(address: str) -> int:
        return (await hub.post("/api/v1/sessions", json={}, headers={"X-Forwarded-For": address})).status_code

    assert [await asked(f"2001:db8:1:2::{n}") for n in (1, 2, 3)] == [503, 503, 429]
    assert await asked("2001:db8:1:3::1") == 503
    assert [await asked(a) for a in ("::ffff:203.0.113.7", "203.0.113.7", "::ffff:203.0.113.7")] == [503, 503, 429]


async def test_a_worker_id_is_at_most_64_characters_so_its_sessions_can_always_be_found(
        hub: httpx.AsyncClient, make_worker: Any) -> None:
    """A session id names its worker; the hub finds a session's worker from it. A 64-character id is the longest a
    registration takes and its sessions are read and ended like any other; a 65-character one is refused, or its
    sessions would be placed and then never found again."""
    longest = "w" * 64
    await register(hub, longest, await make_worker())
    await refresh(hub)
    placed = await hub.post("/api/v1/sessions", json={})
    assert placed.status_code == 201 and placed.json()["worker"]["id"] == longest, placed.text
    session_id = placed.json()["session_id"]
    assert (await hub.get(f"/api/v1/sessions/{session_id}")).status_code == 200
    assert (await hub.delete(f"/api/v1/sessions/{session_id}")).status_code == 204
    too_long = await hub.post("/api/v1/workers", json=registration("w" * 65, "http://127.0.0.1:9"),
                              headers=WORKER_AUTH)
    assert too_long.status_code == 422 and too_long.json()["message"].startswith("worker_id: ")


async def test_the_configured_near_best_margin_decides_which_candidates_share_the_traffic(
        make_hub: Any, make_worker: Any) -> None:
    """``FLEET_NEAR_BEST_MARGIN`` reaches the routing: a margin as wide as the scores lets a far worker share a
    Berlin user's traffic, the default keeps it to the near one."""
    berlin = {"lat": 52.5, "lon": 13.4}
    wide = await make_hub(near_best_margin=1.0)
    await register(wide, "w-eu", await make_worker(), region="eu-central-1")
    await register(wide, "w-us", await make_worker(), region="us-west-2")
    for hub, near_best in ((wide, {"w-eu": True, "w-us": True}), (await make_hub(), {"w-eu": True, "w-us": False})):
        await refresh(hub)
        explain = await hub.get("/api/v1/route/explain", params=berlin, headers=ADMIN_AUTH)
        assert {c["worker_id"]: c["near_best"] for c in explain.json()["candidates"]} == near_best


async def test_a_stopped_hub_leaves_no_loop_running(redis_url: str) -> None:
    """Its routing-board refresh would go on reading a closed store, logging a failure a second, in a process that
    outlives the app (tests, an embedding server)."""
    app = create_app(hub_settings(redis_url))
    async with app.router.lifespan_context(app):
        assert "routing board refresh" in {task.get_name() for task in asyncio.all_tasks()}
    assert "routing board refresh" not in {task.get_name() for task in asyncio.all_tasks()}


async def test_a_hub_without_a_redis_url_stops_the_redis_server_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """In dev the hub starts its own redis-server; stopping the hub must not leave it running on its port."""
    started: list[EmbeddedRedis] = []

    class Recorded(EmbeddedRedis):
        def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
            started.append(self)
            return super().start(timeout_s)

    monkeypatch.setattr("hub.main.EmbeddedRedis", Recorded)
    app = create_app(HubSettings(worker_token=WORKER_TOKEN, admin_token=ADMIN_TOKEN))
    async with app.router.lifespan_context(app):
        assert len(started) == 1 and started[0].running
    assert not started[0].running


@pytest.mark.standalone_redis
async def test_a_stopped_hub_leaves_no_connection_open(redis_url: str) -> None:
    """Neither to Redis nor to workers: a process that outlives the app (tests, an embedding server) would hold
    them until it exits."""
    probe = sync_redis(redis_url)
    before = probe.info("clients")["connected_clients"]
    app = create_app(hub_settings(redis_url))
    async with app.router.lifespan_context(app):
        await app.state.hub.board.refresh()
        assert probe.info("clients")["connected_clients"] > before
    await wait_for(lambda: probe.info("clients")["connected_clients"] <= before, 5, "its connections to close")
    assert app.state.hub.allocator.workers._http.closed  # its HTTP session to the workers


def test_each_score_weight_is_read_from_its_own_variable() -> None:
    settings = HubSettings(weight_distance=0.4, weight_load=0.3, weight_latency=0.2, weight_capacity=0.1)
    assert settings.weights == Weights(distance=0.4, load=0.3, latency=0.2, capacity=0.1)


def test_a_livekit_file_is_read_as_yaml_by_either_extension_and_a_proxy_network_may_name_a_host(tmp_path) -> None:
    """``.yml`` is as much YAML as ``.yaml``; ``10.0.0.5/8`` (a host's address with its network's prefix, as
    ``ip addr`` prints it) means the network 10.0.0.0/8."""
    config = tmp_path / "livekit.yml"
    config.write_text("\n".join(f"- {key}: {value}" if n == 0 else f"  {key}: {value}"
                                for n, (key, value) in enumerate(LIVEKIT[0].items())))
    assert [d.region for d in HubSettings(livekit_regions=str(config)).livekit_deployments] == ["us-east"]
    assert HubSettings(trusted_proxies=["10.0.0.5/8"]).trusted_proxies == ["10.0.0.5/8"]


async def test_the_explain_view_reads_the_board_itself_rather_than_waiting_for_the_hubs_loop(make_hub) -> None:
    """An SRE asks why after a change another hub just made: the view re-reads a board older than half a second
    and shows a worker registered a moment ago, even when this hub's own refresh loop is minutes away."""
    asked = await make_hub(snapshot_refresh_s=600)
    other = await make_hub()
    await refresh(asked)
    await asyncio.sleep(0.6)
    resp = await other.post("/api/v1/workers", json=registration("w-new", "http://127.0.0.1:9"), headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    await heartbeat(other, "w-new", resp.json()["worker_secret"], [])
    explain = await asked.get("/api/v1/route/explain", params={"lat": 40.7, "lon": -74.0}, headers=ADMIN_AUTH)
    assert [c["worker_id"] for c in explain.json()["candidates"]] == ["w-new"], explain.text


async def test_an_explanation_without_candidates_says_why(make_hub, make_worker) -> None:
    """An empty table said nothing of whether the labels were wrong or the fleet full: the SRE had to guess."""
    hub = await make_hub()

    async def note(*labels: str) -> str | None:
        resp = await hub.get("/api/v1/route/explain", params={"label": list(labels)}, headers=ADMIN_AUTH)
        assert resp.status_code == 200, resp.text
        return resp.json()["note"]

    assert await note() == "no worker is registered (no_capacity)"
    await register(hub, "w-1", await make_worker(max_streams=1), labels={"gpu": "a10g"})
    await refresh(hub)
    assert await note() is None
    assert await note("gpu=h100") == "no live worker has the labels gpu=h100 (no_matching_worker)"
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    assert await note("gpu=a10g") == "every worker that could take the session is full, draining or stale (no_capacity)"


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_token_stops_the_hub_and_the_worker_at_start_in_dev_too(empty: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``FLEET_ADMIN_TOKEN=`` started a hub that refused every SRE request (no bearer token matches an empty one),
    with nothing saying why; the same for the worker token, between hubs and workers."""
    from worker.settings import WorkerSettings

    for settings, variable in ((HubSettings, "FLEET_ADMIN_TOKEN"), (HubSettings, "FLEET_WORKER_TOKEN"),
                               (WorkerSettings, "FLEET_WORKER_TOKEN")):
        monkeypatch.setenv(variable, empty)
        with pytest.raises(ValidationError, match="must not be empty"):
            settings()
        monkeypatch.delenv(variable)
    assert HubSettings().env == "dev"


async def test_a_listed_origins_page_may_call_the_client_routes_and_no_other(make_hub) -> None:
    """A web client app calls the hub from the browser (``FLEET_CORS_ORIGINS``): its preflight and its requests are
    answered for its origin, with Retry-After readable; another origin, and every SRE route, get no CORS answer."""
    hub = await make_hub(cors_origins=["https://app.example.com"])
    page = {"Origin": "https://app.example.com"}
    preflight = await hub.options("/api/v1/sessions", headers={
        **page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    asked = await hub.post("/api/v1/sessions", json={}, headers=page)
    assert asked.status_code == 503 and asked.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "retry-after" in asked.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-credentials" not in asked.headers

    other = await hub.post("/api/v1/sessions", json={}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    refused = await hub.options("/api/v1/sessions", headers={"Origin": "https://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in refused.headers
    for path in ("/api/v1/workers", "/api/v1/fleet"):
        sre = await hub.options(path, headers={**page, "Access-Control-Request-Method": "GET",
                                               "Access-Control-Request-Headers": "authorization"})
        assert "access-control-allow-origin" not in sre.headers, path
        listed = await hub.get(path, headers={**page, **ADMIN_AUTH})
        assert listed.status_code == 200 and "access-control-allow-origin" not in listed.headers


async def test_without_cors_origins_no_page_of_another_origin_is_answered(hub: httpx.AsyncClient) -> None:
    asked = await hub.post("/api/v1/sessions", json={}, headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in asked.headers


@pytest.mark.parametrize("origin", ["*", "https://app.example.com/", "app.example.com", "https://*.example.com"])
def test_a_cors_origin_is_an_origin_not_a_pattern_or_a_url(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        HubSettings(cors_origins=[origin])


async def test_a_listed_origins_page_may_read_and_end_its_session_but_send_no_bearer_token(make_hub) -> None:
    """The client routes include reading and ending a session by its id (``GET``/``DELETE``
    /api/v1/sessions/{id}), so those are answered for the page too; a preflight asking to send an Authorization header
    is not, so a page cannot use a token it got hold of on the SRE's listing that shares the path."""
    hub = await make_hub(cors_origins=["https://app.example.com"])
    page = {"Origin": "https://app.example.com"}
    path = "/api/v1/sessions/w-1~nothing-here"
    end = await hub.options(path, headers={**page, "Access-Control-Request-Method": "DELETE"})
    assert end.status_code == 200 and end.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "DELETE" in end.headers["access-control-allow-methods"]
    read = await hub.get(path, headers=page)
    assert read.status_code == 404 and read.headers["access-control-allow-origin"] == "https://app.example.com"

    bearer = await hub.options("/api/v1/sessions", headers={
        **page, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert bearer.status_code != 200 and "authorization" not in bearer.headers.get(
        "access-control-allow-headers", "").lower()


async def test_the_sre_session_listing_answers_no_other_origin_though_it_shares_the_client_path(make_hub) -> None:
    """``GET /api/v1/sessions`` is the SRE's listing, on the path where clients create sessions: it answers no page of
    another origin, not even a preflight without Authorization; creating there still does."""
    hub = await make_hub(cors_origins=["https://app.example.com"])
    page = {"Origin": "https://app.example.com"}
    listing = await hub.options("/api/v1/sessions", headers={**page, "Access-Control-Request-Method": "GET"})
    assert listing.status_code == 400, listing.headers  # a refused preflight: the browser sends no GET
    assert "GET" not in listing.headers.get("access-control-allow-methods", "")
    listed = await hub.get("/api/v1/sessions", headers={**page, **ADMIN_AUTH})
    assert listed.status_code == 200 and "access-control-allow-origin" not in listed.headers, listed.headers
    refused = await hub.get("/api/v1/sessions", headers=page)
    assert refused.status_code == 401 and "access-control-allow-origin" not in refused.headers, refused.headers
    create = await hub.options("/api/v1/sessions", headers={**page, "Access-Control-Request-Method": "POST"})
    assert create.status_code == 200 and create.headers["access-control-allow-methods"] == "POST", create.headers
    per_session = await hub.options("/api/v1/sessions/w-1~x", headers={**page, "Access-Control-Request-Method": "POST"})
    assert per_session.status_code == 400, per_session.headers  # no POST on a session's own path


def test_a_cors_origin_may_be_plain_http_and_name_a_port() -> None:
    """A client app developed on ``http://localhost:3000`` calls a dev hub."""
    origins = ["http://localhost:3000", "https://app.example.com:8443", "https://app.example.com"]
    assert HubSettings(cors_origins=origins).cors_origins == origins


async def test_an_ipv6_origin_is_kept_as_browsers_write_it(make_hub) -> None:
    """A page served from ``http://[::1]:3000`` sends that Origin; an address written out at length still matches."""
    settings = HubSettings(cors_origins=["http://[0:0:0:0:0:0:0:1]:3000", "https://[2001:DB8::A]"])
    assert settings.cors_origins == ["http://[::1]:3000", "https://[2001:db8::a]"]
    hub = await make_hub(cors_origins=settings.cors_origins)
    asked = await hub.post("/api/v1/sessions", json={}, headers={"Origin": "http://[::1]:3000"})
    assert asked.headers.get("access-control-allow-origin") == "http://[::1]:3000", asked.headers
    with pytest.raises(ValidationError, match="is not an origin"):
        HubSettings(cors_origins=["http://[::g]:3000"])


@pytest.mark.parametrize("location", [{"lat": 48.8, "lon": "2.3"}, {"lat": 48.8, "lon": True}])
async def test_a_longitude_is_a_json_number_too(hub: httpx.AsyncClient, location: dict[str, Any]) -> None:
    resp = await hub.post("/api/v1/sessions", json={"location": location})
    assert resp.status_code == 422 and resp.json()["message"].startswith("location.lon: "), resp.text


async def test_an_explanation_for_labels_in_an_empty_fleet_gives_the_answer_a_session_request_gets(
        hub: httpx.AsyncClient) -> None:
    """With no worker registered, a request with labels is refused ``no_matching_worker`` (without Retry-After):
    the explanation said ``no_capacity``, so an SRE reading it expected clients to retry."""
    asked = await hub.post("/api/v1/sessions", json={"labels": {"tier": "gold", "gpu": "h100"}})
    assert asked.status_code == 503 and asked.json()["error"] == "no_matching_worker", asked.text
    explain = await hub.get("/api/v1/route/explain", params={"label": ["tier=gold", "gpu=h100"]}, headers=ADMIN_AUTH)
    assert explain.json()["note"] == "no live worker has the labels gpu=h100, tier=gold (no_matching_worker)", (
        explain.text)
    unlabelled = await hub.get("/api/v1/route/explain", headers=ADMIN_AUTH)
    assert unlabelled.json()["note"] == "no worker is registered (no_capacity)"
    assert (await hub.post("/api/v1/sessions", json={})).json()["error"] == "no_capacity"


async def test_a_listed_origins_page_can_read_the_413_for_a_body_too_large(make_hub) -> None:
    """The CORS answer wraps the body limit, so the page sees ``body_too_large`` rather than a CORS failure that
    says nothing."""
    hub = await make_hub(cors_origins=["https://app.example.com"], max_body_bytes=256)
    resp = await hub.post("/api/v1/sessions", content=b'{"identity": "' + b"a" * 300 + b'"}',
                          headers={"Origin": "https://app.example.com", "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"] == "body_too_large", resp.text
    assert resp.headers["access-control-allow-origin"] == "https://app.example.com"


async def test_an_origin_given_in_capitals_still_matches_what_browsers_send(make_hub) -> None:
    hub = await make_hub(cors_origins=["https://App.Example.com"])
    asked = await hub.post("/api/v1/sessions", json={}, headers={"Origin": "https://app.example.com"})
    assert asked.headers.get("access-control-allow-origin") == "https://app.example.com", asked.headers


"""IMDSv2 against a local aiohttp server: the token flow, timeouts, spot notice, lifecycle state, off-EC2."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from shared.backoff import backoff_delays
from shared.redis_server import free_port
from worker import imds as imds_module
from worker.imds import Imds, ImdsUnavailable

META = {
    "instance-id": "i-0abc123", "instance-type": "g5.xlarge", "placement/region": "eu-west-1",
    "placement/availability-zone": "eu-west-1b", "local-ipv4": "10.0.0.7",
}


class FakeImds:
    def __init__(self) -> None:
        self.meta: dict[str, str] = dict(META)
        self.token = "tok-1"  # the token the service gives out and accepts; a new one revokes the old
        self.token_puts = 0
        self.delay_s = 0.0
        self.token_delay_s = 0.0
        self.failures_left = 0  # metadata reads answered 500 before the service recovers
        self.port = free_port()

    async def put_token(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.token_delay_s)
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400)  # as EC2 does: a token lives at most six hours
        self.token_puts += 1
        return web.Response(text=self.token)

    async def get_meta(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        if request.headers.get("X-aws-ec2-metadata-token") != self.token:
            return web.Response(status=401)  # IMDSv2-only instance: no token, no answer
        if self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=500)
        value = self.meta.get(request.match_info["path"])
        return web.Response(text=value) if value is not None else web.Response(status=404)


@pytest.fixture
async def fake_imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    app = web.Application()
    app.router.add_put("/latest/api/token", fake.put_token)
    app.router.add_get("/latest/meta-data/{path:.+}", fake.get_meta)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake.port).start()
    yield fake
    await runner.cleanup()


async def test_identity_uses_one_token_for_all_reads(fake_imds: FakeImds) -> None:
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}")
    ident = await imds.identity()
    await imds.aclose()
    assert ident is not None
    assert (ident.instance_id, ident.instance_type, ident.region, ident.zone, ident.local_ipv4, ident.public_ipv4) == (
        "i-0abc123", "g5.xlarge", "eu-west-1", "eu-west-1b", "10.0.0.7", None)
    assert fake_imds.token_puts == 1


async def test_spot_notice_and_lifecycle_state(fake_imds: FakeImds) -> None:
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}")
    try:
        assert await imds.spot_action() is None and await imds.target_lifecycle_state() is None
        fake_imds.meta["spot/instance-action"] = '{"action": "terminate", "time": "2026-11-23T11:00:00Z"}'
        fake_imds.meta["autoscaling/target-lifecycle-state"] = "Terminated"
        assert await imds.spot_action() == {"action": "terminate", "time": "2026-11-23T11:00:00Z"}
        assert await imds.target_lifecycle_state() == "Terminated"
    finally:
        await imds.aclose()


async def test_a_slow_endpoint_times_out_quickly(fake_imds: FakeImds) -> None:
    fake_imds.delay_s = 0.8
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    started = time.monotonic()
    assert await imds.identity() is None
    await imds.aclose()
    assert time.monotonic() - started < 1.0


async def test_off_ec2_fails_fast() -> None:
    imds = Imds(f"http://127.0.0.1:{free_port()}")  # nothing listens: connection refused
    started = time.monotonic()
    results: list[Any] = [await imds.identity(), await imds.spot_action(), await imds.target_lifecycle_state()]
    await imds.aclose()
    assert results == [None, None, None]
    assert time.monotonic() - started < 1.5


async def test_a_worker_that_must_be_on_ec2_waits_out_a_slow_or_failing_service(fake_imds: FakeImds) -> None:
    """One try would read a slow first answer, or a failing local-ipv4, as "not on EC2" (a made-up id, a
    loopback URL, no scale-in or spot watch). Required, each read is retried until it answers."""
    fake_imds.failures_left = 3
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    try:
        assert await imds.identity() is None, "one quick try gives up"
        fake_imds.failures_left = 3
        ident = await imds.identity(required=True)
    finally:
        await imds.aclose()
    assert ident is not None and ident.instance_id == "i-0abc123" and ident.local_ipv4 == "10.0.0.7"
    assert ident.public_ipv4 is None, "a 404 is an answer (no public address), not a failure"


async def test_a_worker_that_must_be_on_ec2_stops_when_the_service_never_answers(
        fake_imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imds_module, "REQUIRED_ATTEMPTS", 3)
    fake_imds.failures_left = 1000
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    try:
        with pytest.raises(ImdsUnavailable, match="answered 500"):
            await imds.identity(required=True)
        fake_imds.failures_left = 0
        del fake_imds.meta["local-ipv4"]
        with pytest.raises(ImdsUnavailable, match="local-ipv4"):
            await imds.identity(required=True)
    finally:
        await imds.aclose()


async def test_a_token_is_renewed_a_minute_before_it_expires(fake_imds: FakeImds,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after: a read with a token that expires on its way is refused, and that spot poll is lost."""
    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(imds_module, "time", clock)
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}")
    try:
        assert await imds.get("instance-id") == "i-0abc123"
        clock.now += imds_module.TOKEN_TTL_S - 61
        assert await imds.get("instance-id") == "i-0abc123"
        assert fake_imds.token_puts == 1
        clock.now += 30  # within the token's last minute
        assert await imds.get("instance-id") == "i-0abc123"
        assert fake_imds.token_puts == 2
    finally:
        await imds.aclose()


async def test_a_revoked_token_is_replaced_at_the_next_read(fake_imds: FakeImds) -> None:
    """A 401 (the token was revoked, or the clock jumped) costs one read, not the six hours the token had left: the
    spot notice is still seen."""
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}")
    try:
        assert await imds.spot_action() is None
        fake_imds.token = "tok-2"
        fake_imds.meta["spot/instance-action"] = '{"action": "terminate", "time": "2026-11-23T11:00:00Z"}'
        assert await imds.spot_action() is None, "the read with the revoked token is refused"
        assert await imds.spot_action() == {"action": "terminate", "time": "2026-11-23T11:00:00Z"}
    finally:
        await imds.aclose()


async def test_a_token_request_that_times_out_means_not_on_ec2(fake_imds: FakeImds) -> None:
    """One quick try: a metadata service that does not hand out a token in time is not an error at boot."""
    fake_imds.token_delay_s = 0.8
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    try:
        assert await imds.identity() is None and await imds.spot_action() is None
    finally:
        await imds.aclose()


async def test_a_worker_that_must_be_on_ec2_waits_longer_for_each_answer(
        fake_imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    """A metadata service slower than the quick per-call timeout at boot: required reads allow it 2 s each."""
    monkeypatch.setattr(imds_module, "REQUIRED_ATTEMPTS", 2)
    fake_imds.delay_s = 0.4
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    try:
        ident = await imds.identity(required=True)
    finally:
        await imds.aclose()
    assert ident is not None and ident.instance_id == "i-0abc123"


async def test_a_worker_that_must_be_on_ec2_backs_off_between_tries(
        fake_imds: FakeImds, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight tries in a row at a service still starting would fail as fast as one."""
    drawn: list[int] = []

    def recording_backoff(**kwargs: Any) -> Iterator[float]:
        for attempt, delay in enumerate(backoff_delays(**kwargs)):
            drawn.append(attempt)
            yield delay

    monkeypatch.setattr(imds_module, "backoff_delays", recording_backoff)
    fake_imds.failures_left = 3
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}", timeout_s=0.2)
    try:
        assert await imds.identity(required=True) is not None
    finally:
        await imds.aclose()
    assert drawn == [0, 1, 2], "the instance-id read waited before each of its three retries"


async def test_a_garbled_spot_notice_is_no_notice(fake_imds: FakeImds) -> None:
    """Raising would cut short the watcher's look at EC2 before it reads the ASG's lifecycle state, every time."""
    imds = Imds(f"http://127.0.0.1:{fake_imds.port}")
    try:
        for garbled in ('{"action": "termin', '["terminate"]'):
            fake_imds.meta["spot/instance-action"] = garbled
            assert await imds.spot_action() is None
    finally:
        await imds.aclose()

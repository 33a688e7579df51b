"""CapacityPublisher: metrics land in CloudWatch (moto), one publication per interval across hubs (real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
import redis.asyncio as aioredis
from botocore.stub import ANY, Stubber
from moto import mock_aws
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.cloudwatch import (
    MAX_METRICS_PER_CALL,
    CapacityPublisher,
    free_slot_ratio,
    make_cloudwatch_client,
    regional_clients,
)
from hub.tasks import run_every
from shared.keys import CLOUDWATCH_LOCK
from shared.models import FleetCapacity, RegionCapacity
from tests.conftest import async_redis

NAMESPACE = "GpuFleet"


def region(name: str, max_streams: int = 10, used: int = 4, free: int = 6, workers: int = 2) -> RegionCapacity:
    return RegionCapacity(region=name, workers=workers, ready_workers=workers, max_streams=max_streams,
                          used_streams=used, free_streams=free)


def fleet(*regions: RegionCapacity) -> FleetCapacity:
    total = RegionCapacity(region="all", workers=sum(r.workers for r in regions),
                           ready_workers=sum(r.ready_workers for r in regions),
                           max_streams=sum(r.max_streams for r in regions),
                           used_streams=sum(r.used_streams for r in regions),
                           free_streams=sum(r.free_streams for r in regions))
    return FleetCapacity(regions=list(regions), total=total)


class Spy:
    """Wraps a CloudWatch client and records each put_metric_data call: its size, and when it was made."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[int] = []
        self.made_at: list[float] = []

    def put_metric_data(self, **kwargs: Any) -> Any:
        self.calls.append(len(kwargs["MetricData"]))
        self.made_at.append(time.monotonic())
        return self.client.put_metric_data(**kwargs)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_redis(redis_url)
    yield client
    await client.aclose()


def publisher(redis_client: aioredis.Redis, capacity: FleetCapacity, cloudwatch: Any, interval_s: float = 60.0,
              **kwargs: Any) -> CapacityPublisher:
    async def current() -> FleetCapacity:
        return capacity

    return CapacityPublisher(redis_client, current, NAMESPACE, interval_s, cloudwatch, **kwargs)


def latest(cloudwatch: Any, metric: str, region_name: str) -> list[float]:
    now = datetime.now(UTC)
    answer = cloudwatch.get_metric_data(
        MetricDataQueries=[{"Id": "m", "MetricStat": {
            "Metric": {"Namespace": NAMESPACE, "MetricName": metric,
                       "Dimensions": [{"Name": "Region", "Value": region_name}]},
            "Period": 60, "Stat": "Average"}}],
        StartTime=now - timedelta(minutes=5), EndTime=now + timedelta(minutes=5))
    values: list[float] = answer["MetricDataResults"][0]["Values"]
    return values


async def test_metrics_land_per_region(aws: None, redis_client: aioredis.Redis) -> None:
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    capacity = fleet(region("us-east-1", max_streams=10, used=4, free=6), region("eu-west-1", 8, 8, 0))
    assert await publisher(redis_client, capacity, cloudwatch).publish_once() is True

    listed = cloudwatch.list_metrics(Namespace=NAMESPACE)["Metrics"]
    seen = {(m["MetricName"], m["Dimensions"][0]["Value"]) for m in listed}
    assert seen == {(metric, r) for metric in ("FreeStreams", "UsedStreams", "FreeSlotRatio")
                    for r in ("us-east-1", "eu-west-1")}
    assert all(m["Dimensions"][0]["Name"] == "Region" and len(m["Dimensions"]) == 1 for m in listed)
    assert latest(cloudwatch, "FreeStreams", "us-east-1") == [6.0]
    assert latest(cloudwatch, "UsedStreams", "us-east-1") == [4.0]
    assert latest(cloudwatch, "FreeSlotRatio", "us-east-1") == [0.6]
    assert latest(cloudwatch, "FreeSlotRatio", "eu-west-1") == [0.0]


async def test_a_worker_region_with_no_live_worker_still_gets_a_datapoint(aws: None,
                                                                          redis_client: aioredis.Redis) -> None:
    """A group scaled to zero has no worker to count: without a datapoint, target tracking never scales it out."""
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    capacity = fleet(region("us-east-1", max_streams=10, used=4, free=6))
    pub = publisher(redis_client, capacity, cloudwatch, worker_regions=["us-east-1", "ap-northeast-1"])
    assert await pub.publish_once() is True
    assert latest(cloudwatch, "FreeSlotRatio", "ap-northeast-1") == [0.0]
    assert latest(cloudwatch, "FreeStreams", "ap-northeast-1") == [0.0]
    assert latest(cloudwatch, "FreeSlotRatio", "us-east-1") == [0.6]


async def test_racing_hubs_publish_once_per_interval(aws: None, redis_client: aioredis.Redis,
                                                     redis_url: str) -> None:
    spy = Spy(boto3.client("cloudwatch", region_name="us-east-1"))
    other = async_redis(redis_url)  # a second hub has its own connection
    try:
        capacity = fleet(region("us-east-1"))
        # An interval far longer than a few calls to moto take on a loaded machine: "the same interval" below
        # stays the same interval, and the next one is waited for rather than slept into.
        interval_s = 3.0
        hubs = [publisher(redis_client, capacity, spy, interval_s=interval_s),
                publisher(other, capacity, spy, interval_s=interval_s)]
        first = await asyncio.gather(*(h.publish_once() for h in hubs))
        assert sorted(first) == [False, True]
        assert await hubs[0].publish_once() is False  # still the same interval
        assert await hubs[1].publish_once() is False
        assert len(spy.calls) == 1
        pttl = await redis_client.pttl(CLOUDWATCH_LOCK)
        assert 0 < pttl <= interval_s * 1000

        async with asyncio.timeout(interval_s + 10):  # the lock lapses by itself at the interval's end
            while await redis_client.exists(CLOUDWATCH_LOCK):
                await asyncio.sleep(0.05)
        # next interval: exactly one of them publishes again
        second = await asyncio.gather(*(h.publish_once() for h in hubs))
        assert sorted(second) == [False, True]
        assert len(spy.calls) == 2
    finally:
        await other.aclose()


async def test_many_regions_are_batched_under_the_api_limit(aws: None, redis_client: aioredis.Redis) -> None:
    spy = Spy(boto3.client("cloudwatch", region_name="us-east-1"))
    capacity = fleet(*(region(f"r{i:04d}") for i in range(400)))  # 1200 metrics
    assert await publisher(redis_client, capacity, spy).publish_once() is True
    assert spy.calls == [MAX_METRICS_PER_CALL, 200]


async def test_each_region_can_go_to_its_own_cloudwatch(aws: None, redis_client: aioredis.Redis) -> None:
    clients = {name: boto3.client("cloudwatch", region_name=name) for name in ("us-east-1", "eu-west-1")}
    capacity = fleet(region("us-east-1"), region("eu-west-1", 10, 1, 9), region("on-prem"))
    pub = publisher(redis_client, capacity, clients["us-east-1"], cloudwatch_for_region=clients.get)
    assert await pub.publish_once() is True
    assert latest(clients["eu-west-1"], "FreeStreams", "eu-west-1") == [9.0]
    assert latest(clients["eu-west-1"], "FreeStreams", "us-east-1") == []
    assert latest(clients["us-east-1"], "FreeStreams", "us-east-1") == [6.0]
    assert latest(clients["us-east-1"], "FreeStreams", "on-prem") == [6.0]  # unknown regions: the default client


class Broken:
    def put_metric_data(self, **kwargs: Any) -> Any:
        raise RuntimeError("CloudWatch is down")


async def test_errors_are_logged_never_raised(redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    assert await publisher(redis_client, fleet(region("us-east-1")), Broken()).publish_once() is False
    assert "publishing capacity metrics to CloudWatch failed" in caplog.text

    async def failing() -> FleetCapacity:
        raise ConnectionError("registry unavailable")

    await redis_client.delete(CLOUDWATCH_LOCK)
    pub = CapacityPublisher(redis_client, failing, NAMESPACE, 60.0, Broken())
    assert await pub.publish_once() is False


async def test_redis_down_is_not_fatal() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        assert await publisher(dead, fleet(region("us-east-1")), Broken()).publish_once() is False
    finally:
        await dead.aclose()


async def test_run_keeps_publishing_each_interval(aws: None, redis_client: aioredis.Redis) -> None:
    spy = Spy(boto3.client("cloudwatch", region_name="us-east-1"))
    pub = publisher(redis_client, fleet(region("us-east-1")), spy, interval_s=0.2)
    task = asyncio.create_task(run_every(pub.interval_s, pub.publish_once, "cloudwatch capacity"))  # as hub.main does
    try:
        # Counted, not timed: a loaded machine may take longer than an interval for one call to moto.
        async with asyncio.timeout(10):
            while len(spy.calls) < 3:
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    gaps = [later - earlier for earlier, later in zip(spy.made_at, spy.made_at[1:], strict=False)]
    assert min(gaps) >= pub.interval_s * 0.9, gaps  # once per interval, never faster


def test_free_slot_ratio_bounds() -> None:
    assert free_slot_ratio(region("x", max_streams=0, used=0, free=0)) == 0.0
    assert free_slot_ratio(region("x", max_streams=4, used=0, free=4)) == 1.0
    assert free_slot_ratio(region("x", max_streams=4, used=3, free=1)) == 0.25


async def test_each_publication_sends_the_metrics_target_tracking_reads(aws: None,
                                                                        redis_client: aioredis.Redis) -> None:
    """Names, dimension, values and units exactly: an alarm or a scaling policy on a unit ("Count") matches only
    the datapoints of that unit."""
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1")
    # 10 slots, 3 in use: 2 idle slots are on a draining worker, so 5 are free for new sessions
    capacity = fleet(region("us-east-1", max_streams=10, used=3, free=5))

    def datum(name: str, value: float, unit: str) -> dict[str, Any]:
        return {"MetricName": name, "Dimensions": [{"Name": "Region", "Value": "us-east-1"}],
                "Timestamp": ANY, "Value": value, "Unit": unit}

    with Stubber(cloudwatch) as stub:
        stub.add_response("put_metric_data", {}, {"Namespace": NAMESPACE, "MetricData": [
            datum("FreeStreams", 5.0, "Count"), datum("UsedStreams", 3.0, "Count"),
            datum("FreeSlotRatio", 0.5, "None")]})
        assert await publisher(redis_client, capacity, cloudwatch).publish_once() is True
        stub.assert_no_pending_responses()


async def test_the_lock_holds_for_the_whole_interval(aws: None, redis_client: aioredis.Redis) -> None:
    """Shorter, and a second hub publishes again within the interval: extra datapoints every interval."""
    spy = Spy(boto3.client("cloudwatch", region_name="us-east-1"))
    assert await publisher(redis_client, fleet(region("us-east-1")), spy, interval_s=60.0).publish_once() is True
    assert 59_000 < await redis_client.pttl(CLOUDWATCH_LOCK) <= 60_000


def test_each_aws_region_gets_a_client_of_that_region_and_other_names_none(aws: None) -> None:
    client_for = regional_clients()
    frankfurt = client_for("eu-central-1")
    assert frankfurt.meta.region_name == "eu-central-1"
    assert client_for("eu-central-1") is frankfurt  # one per region, cached
    assert client_for("ap-northeast-1").meta.region_name == "ap-northeast-1"
    assert client_for("on-prem") is None  # publish_once falls back to the default client


def test_a_publication_cannot_hang_past_its_interval(aws: None) -> None:
    """Every CloudWatch client bounds its calls: botocore's defaults (60 s to connect and 60 s to read, per attempt)
    let one stuck publication outlast the minute its lock covers, and another hub published that minute again."""
    for client in (make_cloudwatch_client("us-east-1"), regional_clients()("eu-central-1")):
        config = client.meta.config
        longest_s = config.retries["total_max_attempts"] * (config.connect_timeout + config.read_timeout)
        assert longest_s < 60, longest_s  # the default interval, FLEET_CLOUDWATCH_INTERVAL_S

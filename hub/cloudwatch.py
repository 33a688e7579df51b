"""Per-region capacity metrics for CloudWatch, published by at most one hub per interval.

Every hub runs a ``CapacityPublisher``; a short Redis lock (``SET NX PX interval``) on ``CLOUDWATCH_LOCK`` elects
the one that publishes in each interval, so CloudWatch receives one datapoint per region per interval whatever the
number of hubs. The worker Auto Scaling groups track ``FreeSlotRatio`` (dimension ``Region``) with target tracking.
Failures (Redis, capacity, CloudWatch) are logged and never escape: a missing datapoint is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from shared.keys import CLOUDWATCH_LOCK
from shared.models import FleetCapacity, RegionCapacity

log = logging.getLogger(__name__)

#: CloudWatch accepts at most 1000 metrics per PutMetricData call.
MAX_METRICS_PER_CALL = 1000

FREE_STREAMS = "FreeStreams"
USED_STREAMS = "UsedStreams"
FREE_SLOT_RATIO = "FreeSlotRatio"


def free_slot_ratio(cap: RegionCapacity) -> float:
    """Free stream slots of ready workers over all slots; 0 when the region has no capacity (scale out)."""
    if cap.max_streams <= 0:
        return 0.0
    return max(0.0, min(1.0, cap.free_streams / cap.max_streams))


def metric_data(capacity: FleetCapacity, timestamp: datetime) -> list[dict[str, Any]]:
    """The PutMetricData entries of one publication: three metrics per region, dimension ``Region``."""
    data: list[dict[str, Any]] = []
    for cap in capacity.regions:
        dims = [{"Name": "Region", "Value": cap.region}]
        data.append({"MetricName": FREE_STREAMS, "Dimensions": dims, "Timestamp": timestamp,
                     "Value": float(cap.free_streams), "Unit": "Count"})
        data.append({"MetricName": USED_STREAMS, "Dimensions": dims, "Timestamp": timestamp,
                     "Value": float(cap.used_streams), "Unit": "Count"})
        data.append({"MetricName": FREE_SLOT_RATIO, "Dimensions": dims, "Timestamp": timestamp,
                     "Value": free_slot_ratio(cap), "Unit": "None"})
    return data


def with_regions(capacity: FleetCapacity, regions: Iterable[str]) -> FleetCapacity:
    """``capacity`` with an empty entry for each of ``regions`` it lacks (no live worker there)."""
    missing = [r for r in dict.fromkeys(regions) if r not in {c.region for c in capacity.regions}]
    if not missing:
        return capacity
    empty = [RegionCapacity(region=r, workers=0, ready_workers=0, max_streams=0, used_streams=0, free_streams=0)
             for r in missing]
    return FleetCapacity(regions=sorted([*capacity.regions, *empty], key=lambda c: c.region), total=capacity.total)


class CapacityPublisher:
    """Publishes per-region capacity to CloudWatch, at most once per interval across all hubs."""

    def __init__(self, redis: Any, capacity: Callable[[], Awaitable[FleetCapacity]], namespace: str,
                 interval_s: float, cloudwatch: Any,
                 cloudwatch_for_region: Callable[[str], Any] | None = None,
                 worker_regions: Iterable[str] = ()) -> None:
        self.redis = redis  # redis.asyncio.Redis or RedisCluster
        # Regions whose worker group tracks these metrics: each gets its datapoints even with no live worker (a
        # ratio of 0), or a group scaled to zero would never scale out (target tracking waits for data).
        self.worker_regions = tuple(worker_regions)
        self.capacity = capacity
        self.namespace = namespace
        self.interval_s = interval_s
        self.cloudwatch = cloudwatch  # a boto3 CloudWatch client (thread-safe; called in a worker thread)
        # Target tracking reads metrics of its own region only: with this set, a region's metrics go to the
        # CloudWatch of that region (workers' FLEET_REGION is an AWS region); else all go to ``cloudwatch``.
        self.cloudwatch_for_region = cloudwatch_for_region

    async def _take_lock(self) -> bool:
        px = max(1, int(self.interval_s * 1000))
        return bool(await self.redis.set(CLOUDWATCH_LOCK, "1", nx=True, px=px))

    async def publish_once(self) -> bool:
        """Publish if this hub wins this interval's lock; True when metrics were sent. Never raises."""
        try:
            if not await self._take_lock():
                return False
            capacity = with_regions(await self.capacity(), self.worker_regions)
            now = datetime.now(UTC)
            per_client: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
            for region in capacity.regions:
                client = self.cloudwatch_for_region(region.region) if self.cloudwatch_for_region else None
                client = client or self.cloudwatch
                per_client.setdefault(id(client), (client, []))[1].extend(
                    metric_data(FleetCapacity(regions=[region], total=capacity.total), now))
            sent = 0
            for client, data in per_client.values():
                for start in range(0, len(data), MAX_METRICS_PER_CALL):
                    batch = data[start:start + MAX_METRICS_PER_CALL]
                    await asyncio.to_thread(client.put_metric_data, Namespace=self.namespace, MetricData=batch)
                    sent += len(batch)
            log.debug("published %d capacity metrics to CloudWatch namespace %s", sent, self.namespace)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("publishing capacity metrics to CloudWatch failed")
            return False


def _bounded() -> Any:
    """Bounded calls: botocore's defaults (60 s to connect, 60 s to read, per attempt) let one stuck publication
    outlast its interval, and a second hub then published the same minute."""
    from botocore.config import Config

    return Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"})


def make_cloudwatch_client(region: str | None) -> Any:
    """A boto3 CloudWatch client (credentials from the instance role in AWS)."""
    import boto3

    return boto3.client("cloudwatch", region_name=region, config=_bounded())


def regional_clients() -> Callable[[str], Any]:
    """``cloudwatch_for_region`` of real deployments: one cached client per AWS region; None for other names."""
    import boto3

    clients: dict[str, Any] = {}
    known = set(boto3.session.Session().get_available_regions("cloudwatch"))

    def client_for(region: str) -> Any:
        if region not in known:
            return None
        if region not in clients:
            clients[region] = boto3.client("cloudwatch", region_name=region, config=_bounded())
        return clients[region]

    return client_for


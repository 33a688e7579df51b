"""The fleet gauges of /metrics when a region's workers go silent, read as the documented alerts read them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hub.board import Entry
from hub.capacity import capacity_by_region
from hub.settings import HubSettings
from tests.conftest import ADMIN_TOKEN, WORKER_AUTH, HubClientFactory, heartbeat, refresh, registration

ROOT = Path(__file__).resolve().parent.parent
TTL_S = 1.0


async def _gauges(hub: httpx.AsyncClient) -> dict[str, dict[tuple[str, ...], float]]:
    """Each fleet gauge's samples by their label values, as the hub's mirror sees the board now."""
    await refresh(hub)
    text = (await hub.get("/metrics")).text
    return {family.name: {tuple(s.labels.values()): s.value for s in family.samples}
            for family in text_string_to_metric_families(text) if family.name.startswith("fleet_")}


async def _register(hub: httpx.AsyncClient, worker_id: str, region: str) -> str:
    resp = await hub.post("/api/v1/workers", json=registration(worker_id, "http://127.0.0.1:9", region=region),
                          headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    secret: str = resp.json()["worker_secret"]
    assert (await heartbeat(hub, worker_id, secret, [])).status_code == 200
    return secret


async def _a_region_gone_silent(hub: httpx.AsyncClient) -> float:
    """Frankfurt's only worker stops heartbeating; Virginia's two keep on, one of them drained by an SRE.
    Returns a bound on how long Frankfurt has been silent."""
    await _register(hub, "w-euc1", "eu-central-1")
    silent_since = asyncio.get_running_loop().time()
    virginia = {worker_id: await _register(hub, worker_id, "us-east-1") for worker_id in ("w-use1-a", "w-use1-b")}
    drained = await hub.post("/api/v1/workers/w-use1-b/drain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert drained.status_code == 200, drained.text
    while asyncio.get_running_loop().time() - silent_since < TTL_S * 1.6:
        for worker_id, secret in virginia.items():
            assert (await heartbeat(hub, worker_id, secret, [])).status_code == 200
        await asyncio.sleep(0.2)
    return asyncio.get_running_loop().time() - silent_since


def _lagging_threshold_s() -> float:
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    [rule] = [r for group in rules["groups"] for r in group["rules"] if r.get("alert") == "FleetHeartbeatsLagging"]
    expr: str = rule["expr"]
    assert expr.startswith("max by (region) (fleet_heartbeat_age_max_seconds) > "), expr
    return float(expr.rsplit(">", 1)[1])


async def test_a_region_whose_workers_went_silent_reports_how_long_it_has_been_silent(
        make_hub: HubClientFactory) -> None:
    """Regression: the gauge counted live workers only and defaulted to 0, so a region whose every worker had
    stopped heartbeating read 0 s, "healthy", and FleetHeartbeatsLagging cleared exactly then."""
    hub = await make_hub(worker_ttl_s=TTL_S, heartbeat_interval_s=0.3)
    silent_for = await _a_region_gone_silent(hub)
    gauges = await _gauges(hub)
    assert gauges["fleet_workers"][("eu-central-1", "stale")] == 1
    age = gauges["fleet_heartbeat_age_max_seconds"]
    # No live worker left: the age of the region's latest heartbeat, past the TTL that made its workers stale.
    assert TTL_S < age[("eu-central-1",)] <= silent_for + 0.5
    assert age[("us-east-1",)] < TTL_S  # a region with live workers: the oldest live heartbeat, as before
    # So a silent region fires the documented alert: a stale worker's heartbeat is older than the default TTL.
    assert HubSettings.model_fields["worker_ttl_s"].default > _lagging_threshold_s()


async def test_fleet_workers_exports_every_state_of_every_known_region_at_zero(make_hub: HubClientFactory) -> None:
    """docs/metrics.md: "Every known label value is exported from start-up at 0"; fleet_workers exported only the
    states that had workers, so `fleet_workers{state="ready"}` of a region gone stale vanished instead of reading 0."""
    hub = await make_hub(worker_ttl_s=TTL_S, heartbeat_interval_s=0.3)
    await _a_region_gone_silent(hub)
    assert (await _gauges(hub))["fleet_workers"] == {
        ("eu-central-1", "ready"): 0, ("eu-central-1", "draining"): 0, ("eu-central-1", "stale"): 1,
        ("us-east-1", "ready"): 1, ("us-east-1", "draining"): 1, ("us-east-1", "stale"): 0,
    }


NOW_MS = 5_000_000
TTL_MS = 9000


def _entry(worker_id: str, region: str, used: int, max_streams: int, state: str = "ready",
           heard_ms_ago: int = 100) -> Entry:
    return Entry(worker_id=worker_id, url="", region=region, zone=None, lat=0.0, lon=0.0, labels={},
                 max_streams=max_streams, static={}, used=used, state=state, heartbeat_ms=NOW_MS - heard_ms_ago)


def test_a_worker_holding_more_sessions_than_its_new_stream_limit_takes_no_free_slots_from_its_region() -> None:
    """A worker that registered again with fewer streams while its sessions run on: its region's free slots (the
    fleet_streams_free gauge, the API, CloudWatch's scaling signal) are those of its other workers, not fewer."""
    cap = capacity_by_region([_entry("w-shrunk", "us-east-1", used=3, max_streams=2),
                              _entry("w-other", "us-east-1", used=0, max_streams=4)], NOW_MS, TTL_MS)
    [region] = cap.regions
    assert (region.free_streams, region.used_streams, region.max_streams) == (4, 3, 6)
    assert cap.total.free_streams == 4


def test_a_worker_is_counted_exactly_while_the_router_would_place_on_it_and_regions_are_in_name_order() -> None:
    """At its TTL a worker is stale for routing (``RoutingBoard._eligible``), so the figures drop it too."""
    entries = [_entry("w-use1", "us-east-1", 1, 4), _entry("w-apne1", "ap-northeast-1", 0, 2),
               _entry("w-euw1", "eu-west-1", 0, 4), _entry("w-lapsed", "eu-west-1", 0, 8, heard_ms_ago=TTL_MS),
               _entry("w-draining", "us-east-1", 1, 4, state="draining")]
    cap = capacity_by_region(entries, NOW_MS, TTL_MS)
    assert [r.region for r in cap.regions] == ["ap-northeast-1", "eu-west-1", "us-east-1"]
    by_region = {r.region: r for r in cap.regions}
    assert (by_region["eu-west-1"].workers, by_region["eu-west-1"].max_streams) == (1, 4)
    assert (by_region["us-east-1"].workers, by_region["us-east-1"].ready_workers) == (2, 1)
    assert (by_region["us-east-1"].free_streams, by_region["us-east-1"].used_streams) == (3, 2)
    assert (cap.total.workers, cap.total.free_streams) == (4, 2 + 4 + 3)


async def test_a_regions_heartbeat_age_is_that_of_its_oldest_live_heartbeat(make_hub: HubClientFactory) -> None:
    """One worker lagging behind fresh ones is what FleetHeartbeatsLagging is for: the freshest must not hide it."""
    hub = await make_hub(worker_ttl_s=5.0)
    await _register(hub, "w-use1-old", "us-east-1")
    heard_at = asyncio.get_running_loop().time()
    await asyncio.sleep(0.6)
    await _register(hub, "w-use1-new", "us-east-1")
    age = (await _gauges(hub))["fleet_heartbeat_age_max_seconds"][("us-east-1",)]
    assert 0.5 < age <= asyncio.get_running_loop().time() - heard_at + 0.5


async def test_the_latency_gauge_is_the_highest_a_live_worker_reports(make_hub: HubClientFactory) -> None:
    hub = await make_hub(worker_ttl_s=TTL_S, heartbeat_interval_s=0.3)
    silent = await _register(hub, "w-use1-silent", "us-east-1")
    assert (await heartbeat(hub, "w-use1-silent", silent, [], latency_ms=900.0)).status_code == 200
    live = {worker_id: await _register(hub, worker_id, "us-east-1") for worker_id in ("w-use1-a", "w-use1-b")}
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < TTL_S * 1.3:  # the silent one goes stale
        for (worker_id, secret), latency in zip(live.items(), (40.0, 90.0), strict=True):
            assert (await heartbeat(hub, worker_id, secret, [], latency_ms=latency)).status_code == 200
        await asyncio.sleep(0.2)
    gauges = await _gauges(hub)
    assert gauges["fleet_workers"] == {("us-east-1", "ready"): 2, ("us-east-1", "draining"): 0,
                                       ("us-east-1", "stale"): 1}
    assert gauges["fleet_worker_latency_ms_max"] == {("us-east-1",): 90.0}

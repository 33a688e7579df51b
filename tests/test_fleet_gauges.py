"""The fleet gauges of /metrics when a region's workers go silent, read as the documented alerts read them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

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

"""The alert rules and the Grafana dashboard only use metrics a live hub really exports, and both files are valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hub.metrics import ALLOCATION_OUTCOMES, DISPATCH_FAILURE_REASONS
from shared.redis_server import EmbeddedRedis
from tests.conftest import ADMIN_AUTH, refresh, register
from tests.harness import HubProcess, running_hubs

DOCS = Path(__file__).resolve().parent.parent / "docs"
METRIC_NAME = re.compile(r"\bfleet_[a-z_]+\b")
DURATION = re.compile(r"^\d+[smhd]$")


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    rules = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"], group
        rules.extend(group["rules"])
    return rules


def grafana_exprs() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    exprs = []
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids and panel["type"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        ids.add(panel["id"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        exprs.extend(t["expr"] for t in panel["targets"])
    return exprs


def test_alert_rules_are_well_formed_prometheus_rule_groups() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and METRIC_NAME.search(rule["expr"]), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    # The three situations an SRE must hear about.
    assert {"FleetRegionNearlyFull", "FleetNoFreshHeartbeats", "FleetAllocationErrorsRising"} <= set(names)


async def test_every_metric_in_alerts_and_grafana_is_exported_by_a_live_hub(hub: httpx.AsyncClient,
                                                                           make_worker) -> None:
    await register(hub, "w-1", await make_worker())
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    text = (await hub.get("/metrics")).text
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}

    used = {name for expr in [r["expr"] for r in alert_rules()] + grafana_exprs() for name in METRIC_NAME.findall(expr)}
    assert used, "no fleet_ metric found in the docs"
    assert used <= exported, f"not exported by the hub: {sorted(used - exported)}"
    documented = set(METRIC_NAME.findall((DOCS / "metrics.md").read_text()))
    base_names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert base_names <= documented, f"undocumented in docs/metrics.md: {sorted(base_names - documented)}"
    assert 'fleet_streams_used{region="us-east-1"} 1.0' in text


async def test_metrics_count_capacity_as_the_fleet_api_does(hub: httpx.AsyncClient, make_worker) -> None:
    """Prometheus counted a draining worker's slots out of ``fleet_streams_max`` while the API, the dashboard and
    the CloudWatch ratio counted them in: two fullness figures for one region."""
    await register(hub, "w-1", await make_worker(max_streams=4))
    await register(hub, "w-2", await make_worker(max_streams=6))
    assert (await hub.post("/api/v1/workers/w-2/drain", headers=ADMIN_AUTH)).status_code == 200
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    (region,) = (await hub.get("/api/v1/fleet", headers=ADMIN_AUTH)).json()["regions"]
    text = (await hub.get("/metrics")).text
    assert (region["max_streams"], region["free_streams"], region["used_streams"]) == (10, 3, 1)
    for name, figure in (("fleet_streams_max", "max_streams"), ("fleet_streams_free", "free_streams"),
                         ("fleet_streams_used", "used_streams")):
        assert _sample(text, name, region=region["region"]) == region[figure], name


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exported")


def test_a_hub_of_several_processes_exports_what_all_of_them_did(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """Regression: with ``fleet hub --workers 2`` each process kept its own counters, so a scrape showed whichever
    process answered it (3 of 6 allocations, every time). The counters' shared files go with the hub."""
    if not redis_server.running:
        redis_server.start()
    hub = HubProcess(redis_server.url, processes=2)
    # Its temporary files in a folder of this test's own: other tests' hubs come and go in the shared one.
    hub.env["TMPDIR"] = str(tmp_path)
    try:
        hub.start()
        assert [p.name.startswith("fleet-hub-metrics-") for p in tmp_path.iterdir()] == [True]
        for _ in range(16):
            with httpx.Client(timeout=5) as client:  # a connection each: the kernel spreads them over the processes
                assert client.post(f"{hub.url}/api/v1/sessions", json={}).status_code == 503  # no worker
        for _ in range(6):
            with httpx.Client(timeout=5) as client:
                text = client.get(f"{hub.url}/metrics").text
            assert _sample(text, "fleet_allocations_total", outcome="no_capacity") == 16
            assert _sample(text, "fleet_allocation_seconds_count", outcome="no_capacity") == 16
            assert "# TYPE fleet_workers gauge" in text  # the fleet gauges, from the answering process's mirror
    finally:
        hub.stop()
    assert list(tmp_path.iterdir()) == [], "the counters' files outlived the hub"


def test_every_worker_metric_and_label_value_is_documented() -> None:
    """Regression: the worker's /metrics was documented nowhere."""
    from prometheus_client import generate_latest

    from worker.sessions import DISPATCH_OUTCOMES, HEARTBEAT_OUTCOMES, Metrics
    from worker.voice.metrics import STAGES

    doc = (DOCS / "metrics.md").read_text()
    text = generate_latest(Metrics().registry).decode()
    families = {family.name for family in text_string_to_metric_families(text)
                if not family.name.endswith("_created")}  # prometheus_client's creation timestamps
    assert {"worker_sessions_active", "worker_dispatches", "worker_heartbeats"} <= families
    for family in families:
        assert f"`{family}" in doc, f"{family} is not in docs/metrics.md"
    for value in DISPATCH_OUTCOMES + HEARTBEAT_OUTCOMES + STAGES:
        assert f"`{value}`" in doc, f"label value {value} is not in docs/metrics.md"
    assert 'worker_dispatches_total{outcome="stopped"} 0.0' in text  # exported from the start


def test_metrics_answer_only_their_plain_path(redis_server: EmbeddedRedis) -> None:
    """Regression: uvicorn decodes ``/%6detrics`` to ``/metrics`` before routing, while the ALB's rule that keeps
    /metrics inside compares the path as sent, so the public domain served the fleet's figures."""
    if not redis_server.running:
        redis_server.start()
    with running_hubs(1, redis_server.url) as [hub], httpx.Client(base_url=hub.url, timeout=5) as client:
        assert client.get("/metrics").status_code == 200
        for disguised in ("/%6detrics", "/metric%73", "/%6D%65%74%72%69%63%73"):
            resp = client.get(disguised)
            assert resp.status_code == 404 and "fleet_" not in resp.text, disguised


async def test_every_known_label_value_is_exported_at_zero_from_start_up(hub: httpx.AsyncClient) -> None:
    """docs/metrics.md: so that rate() and ratios work, and absent-series alerts stay quiet, before any event."""
    text = (await hub.get("/metrics")).text
    for outcome in ALLOCATION_OUTCOMES:
        assert _sample(text, "fleet_allocations_total", outcome=outcome) == 0, outcome
        assert _sample(text, "fleet_allocation_seconds_count", outcome=outcome) == 0, outcome
    for reason in DISPATCH_FAILURE_REASONS:
        assert _sample(text, "fleet_dispatch_failures_total", reason=reason) == 0, reason
    for result in ("ok", "unknown", "forbidden"):
        assert _sample(text, "fleet_heartbeats_total", result=result) == 0, result
    for result in ("ok", "conflict"):
        assert _sample(text, "fleet_registrations_total", result=result) == 0, result


async def test_registrations_heartbeats_and_allocations_are_counted_under_their_result(
        hub: httpx.AsyncClient, make_worker) -> None:
    await register(hub, "w-1", await make_worker())  # a registration and its first heartbeat
    await refresh(hub)
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 201
    text = (await hub.get("/metrics")).text
    assert _sample(text, "fleet_registrations_total", result="ok") == 1
    assert _sample(text, "fleet_heartbeats_total", result="ok") == 1
    assert _sample(text, "fleet_heartbeats_total", result="unknown") == 0
    assert _sample(text, "fleet_allocations_total", outcome="created") == 1
    assert _sample(text, "fleet_allocation_seconds_count", outcome="created") == 1
    assert 0 < _sample(text, "fleet_allocation_seconds_sum", outcome="created") < 10  # seconds, and it took some

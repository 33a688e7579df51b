"""The alert rules and the Grafana dashboard only use metrics a live hub really exports, and both files are valid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import refresh, register

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

"""The shipped Grafana dashboard and provisioning files, read statically.

The live check (every panel query returns data from a real Prometheus) is in
test_prometheus.py; this file keeps the structure honest without any server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from autoscaler.metrics import Metrics

from .conftest import DASHBOARD, REPO

DS = {"type": "prometheus", "uid": "${datasource}"}
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
# Metrics without an app label (the Machines API is shared by every app; the loop is global).
APP_LESS = ("autoscaler_api_", "autoscaler_control_", "autoscaler_build_", "autoscaler_config_")


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exported_series() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_every_panel_uses_the_datasource_variable() -> None:
    dashboard = load()
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_no_hard_coded_datasource_uid() -> None:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "uid" and node is not dashboard:
                    found.append(str(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    dashboard = load()
    walk(dashboard)
    assert set(found) == {"${datasource}"}


def test_variables() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    app = variables["app"]
    assert app["type"] == "query"
    assert app["datasource"] == DS
    assert app["query"].startswith("label_values(")
    assert app["includeAll"] is True
    assert app["allValue"] == ".*"


def test_queries_name_only_declared_metrics() -> None:
    declared = exported_series()
    for expr in exprs(load()):
        for name in re.findall(r"\bautoscaler_[a-z_]+", expr):
            assert name in declared, f"{name} in {expr!r}"


def test_queries_of_app_metrics_follow_the_app_variable() -> None:
    for expr in exprs(load()):
        names = re.findall(r"\bautoscaler_[a-z_]+", expr)
        if any(not n.startswith(APP_LESS) for n in names):
            selectors = re.findall(r"autoscaler_[a-z_]+\{([^}]*)\}", expr)
            assert len(selectors) == len(names), expr
            assert all('app=~"$app"' in s for s in selectors), expr


def test_the_issue_topics_are_all_there() -> None:
    text = " ".join(exprs(load()))
    for metric in [
        "autoscaler_requests_total",
        "autoscaler_request_duration_seconds_bucket",
        "autoscaler_inflight_requests",
        "autoscaler_queued_requests",
        "autoscaler_queue_rejections_total",
        "autoscaler_wake_duration_seconds_count",
        "autoscaler_wake_duration_seconds_bucket",
        "autoscaler_machines",
        "autoscaler_desired_machines",
        "autoscaler_panic_mode",
        "autoscaler_scaling_actions_total",
        "autoscaler_machine_seconds_total",
        "autoscaler_api_requests_total",
        "autoscaler_api_request_duration_seconds_bucket",
    ]:
        assert metric in text, metric
    assert 'code=~"5.."' in text  # errors
    assert 'code!~"2.."' in text  # API errors


def test_panel_ids_unique_and_laid_out() -> None:
    all_panels = list(panels(load()))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_provisioning_files() -> None:
    base = REPO / "grafana" / "provisioning"
    datasources = yaml.safe_load((base / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["isDefault"] is True
    providers = yaml.safe_load((base / "dashboards" / "autoscaler.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")

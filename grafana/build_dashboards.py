"""Build grafana/dashboards/*.json with Grafana's dashboards-as-code library.

    pip install -e '.[dev]'            # grafana-foundation-sdk is a development dependency
    python grafana/build_dashboards.py # rewrites grafana/dashboards/autoscaler-overview.json

The JSON files are generated: edit this file, run it, commit both. A test regenerates them
and compares (tests/observability/test_dashboard.py), and another runs every panel's query
against a real Prometheus (tests/observability/test_prometheus.py). The library's typed
builders write what Grafana's own schema says, so a misspelt option fails here, not in
Grafana. Nothing here imports the autoscaler: metric names are the public interface.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

OUT = Path(__file__).resolve().parent / "dashboards"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
APP = 'app=~"$app"'
RATE = "[$__rate_interval]"
API_FAILURES = 'code=~"error|401|403|429|5.."'
"""The Machines API answers that are failures, as prometheus/alerts.yml's
AutoscalerApiErrors counts them."""
STARTED = f'{APP},state="started"'
SUSPENDED = f'{APP},state="suspended"'
"""Machine-seconds apart by state: Fly bills a started machine for CPU and RAM and a
suspended one for storage only, so a panel that adds them up shows no price at all."""


@dataclass(frozen=True)
class Spec:
    """One panel: what it shows, how wide, and its queries as (expr, legend) pairs."""

    title: str
    description: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    width: int = 8
    kind: str = "timeseries"  # or "stat"
    stacked: bool = False
    steps: bool = False  # a 0/1 signal: drawn as steps, 0..1
    options: dict[str, object] = field(default_factory=dict)


REQUESTS = f"sum(rate(autoscaler_requests_total{{{APP}}}{RATE}))"
ALL_5XX = f'sum(rate(autoscaler_requests_total{{{APP},code=~"5.."}}{RATE}))'
PROXY_5XX = f"(sum(rate(autoscaler_proxy_errors_total{{{APP}}}{RATE})) or vector(0))"
"""The 5xx the proxy answered itself: the app's own are all 5xx less these (as
prometheus/alerts.yml's AutoscalerHigh5xxRatio counts them)."""


def by(labels: str, metric: str, selector: str = APP) -> str:
    """``sum by (labels) (rate(metric{selector}[$__rate_interval]))``."""
    inner = f"{metric}{{{selector}}}" if selector else metric
    return f"sum by ({labels}) (rate({inner}{RATE}))"


def quantile(q: float, labels: str, metric: str, selector: str = APP) -> str:
    inner = f"{metric}{{{selector}}}" if selector else metric
    return f"histogram_quantile({q:g}, sum by ({labels}) (rate({inner}{RATE})))"


ROWS: list[tuple[str, list[Spec]]] = [
    (
        "Traffic",
        [
            Spec(
                "Requests per second by status",
                "Requests answered by the proxy, by HTTP status.",
                [(by("code", "autoscaler_requests_total"), "{{code}}")],
                unit="reqps",
                stacked=True,
            ),
            Spec(
                "5xx ratio",
                "Share of answers that were 5xx, apart: the app's own (its machines' answers,"
                " relayed) and the proxy's own (no machine reachable or one that failed or did"
                " not answer, a full queue, a wake timeout or a failed wake's 504...: the"
                " Proxy errors panel has them by reason); 0 when there were none.",
                [
                    (f"clamp_min(({ALL_5XX} or vector(0)) - {PROXY_5XX}, 0) / {REQUESTS}", "app"),
                    (f"{PROXY_5XX} / {REQUESTS}", "proxy"),
                ],
                unit="percentunit",
            ),
            Spec(
                "Request latency",
                "Arrival to end of response headers, wakes included.",
                [
                    (quantile(q, "le", "autoscaler_request_duration_seconds_bucket"), name)
                    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
                ],
                unit="s",
            ),
            Spec(
                "In flight and queued",
                "Queued: held for a wake or for a machine under its hard limit.",
                [
                    (f"sum(autoscaler_inflight_requests{{{APP}}})", "in flight"),
                    (f"sum(autoscaler_queued_requests{{{APP}}})", "queued"),
                ],
                width=6,
            ),
            Spec(
                "Queue rejections",
                "Held requests turned away: queue_full (503), wake_timeout (504).",
                [(by("reason", "autoscaler_queue_rejections_total"), "{{reason}}")],
                unit="reqps",
                width=6,
            ),
            Spec(
                "Proxy errors",
                "5xx the proxy answered itself, by reason: queue_full, wake_timeout (the queue"
                " rejections), app_not_found (a wake's 502), unreachable (no machine took the"
                " connection), machine_error (one cut it, or did not answer HTTP),"
                " machine_timeout (no answer in upstream_timeout_s), drained (a drain ran out"
                " first), stopping, app_removed, unsupported (501, 505), internal (a bug).",
                [(by("reason", "autoscaler_proxy_errors_total"), "{{reason}}")],
                unit="reqps",
                width=6,
                stacked=True,
            ),
            Spec(
                "Requests by wake",
                "none: a machine was running; resume/start: the request waited for a wake"
                " (code 499: its client gave up during it); uncordon: for a drain taken back"
                " (the machine was up, its cordon lifted); failed: it waited for one that"
                " brought no machine up in time (504; 499 if its client left after that).",
                [(by("wake", "autoscaler_requests_total"), "{{wake}}")],
                unit="reqps",
                width=6,
                stacked=True,
            ),
        ],
    ),
    (
        "Wakes",
        [
            Spec(
                "Wakes per second",
                "Machines woken for held requests, by kind (resume from suspend, start from stop,"
                " uncordon: a drain taken back, its cordon lifted, no boot).",
                [(by("kind", "autoscaler_wake_duration_seconds_count"), "{{kind}}")],
                unit="ops",
                width=6,
            ),
            Spec(
                "Wakes by result",
                "Wakes for held requests by how they ended. ok: a machine was routable (one"
                " that already was, or a drain taken back, included); failed: the wake gave up"
                " (none came up within wake_timeout_s, none could be woken, an API error; the"
                " AutoscalerWakeFailed alert once held requests got no machine for it);"
                " cancelled: cut short by a stop, a step-down or a reload. A proxy holding"
                " requests asks again every second after a failure."
                " In a cluster each counts on the replica whose proxy held the requests (not"
                " on the leader that served a follower's), so the sum counts it once.",
                [(by("result", "autoscaler_wakes_total"), "{{result}}")],
                unit="ops",
                width=6,
                stacked=True,
            ),
            Spec(
                "Wake latency",
                "From a wake request until a machine was routable. Gaps: no wake in the window.",
                [
                    (
                        quantile(0.5, "kind, le", "autoscaler_wake_duration_seconds_bucket"),
                        "{{kind}} p50",
                    ),
                    (
                        quantile(0.99, "kind, le", "autoscaler_wake_duration_seconds_bucket"),
                        "{{kind}} p99",
                    ),
                ],
                unit="s",
                width=6,
            ),
            Spec(
                "Pre-warms",
                "Machines started ahead of demand, by result.",
                [(by("result", "autoscaler_prewarms_total"), "{{result}}")],
                unit="ops",
                width=6,
            ),
        ],
    ),
    (
        "Machines",
        [
            Spec(
                "Machines by state",
                "As last read from the Machines API.",
                [
                    (
                        f'sum by (state) (autoscaler_machines{{{APP},state!="cordoned"}})',
                        "{{state}}",
                    )
                ],
                stacked=True,
            ),
            Spec(
                "Desired against actual",
                "Desired: started machines the policy wants. Cordoned: draining before a"
                " scale-down.",
                [
                    (f"sum(autoscaler_desired_machines{{{APP}}})", "desired"),
                    (f'sum(autoscaler_machines{{{APP},state="started"}})', "started"),
                    (f'sum(autoscaler_machines{{{APP},state="cordoned"}})', "cordoned"),
                ],
            ),
            Spec(
                "Panic mode",
                "1 while an app's policy is in panic mode (demand far above capacity).",
                [(f"max by (app) (autoscaler_panic_mode{{{APP}}})", "{{app}}")],
                steps=True,
            ),
            Spec(
                "Scaling actions",
                "Start, resume, cordon, uncordon, suspend, stop; by result.",
                [
                    (
                        by("action, result", "autoscaler_scaling_actions_total"),
                        "{{action}} {{result}}",
                    )
                ],
                unit="ops",
            ),
            Spec(
                "Machine restarts",
                "Machines restarted after their process died or stopped answering, by result.",
                [(by("result", "autoscaler_machine_restarts_total"), "{{result}}")],
                unit="ops",
            ),
            Spec(
                "Machine ejections",
                "Machines the proxy stopped sending to, by reason.",
                [(by("reason", "autoscaler_machine_ejections_total"), "{{reason}}")],
                unit="ops",
            ),
            Spec(
                "Checks run again",
                "Fly checks critical in a machine's first round that we ran ourselves, by"
                " result; passes mean a grace_period shorter than the app's start-up (alert:"
                " AutoscalerCheckGraceShort).",
                [(by("result", "autoscaler_check_rechecks_total"), "{{result}}")],
                unit="ops",
            ),
        ],
    ),
    (
        "Control loop",
        [
            Spec(
                "Control loop: seconds since last tick",
                "Grows without bound when the control loop is stuck (alert:"
                " AutoscalerControlLoopStalled).",
                [
                    (
                        "time() - max(autoscaler_control_last_tick_timestamp_seconds)",
                        "since last tick",
                    )
                ],
                unit="s",
            ),
            Spec(
                "Control loop healthy",
                "1 while the control loop reaches the Machines API and keeps its schedule.",
                [("min(autoscaler_control_healthy)", "healthy")],
                width=4,
                kind="stat",
                options={"textMode": common.BigValueTextMode.VALUE},
            ),
            Spec(
                "Config reloads in range",
                "SIGHUP reloads: success, or error (the running configuration stays).",
                [
                    (
                        "sum by (result) (increase(autoscaler_config_reloads_total[$__range]))",
                        "{{result}}",
                    )
                ],
                width=4,
                kind="stat",
            ),
            Spec(
                "Version",
                "Autoscaler processes by version.",
                [("count by (version) (autoscaler_build_info)", "{{version}}")],
                width=4,
                kind="stat",
                options={"textMode": common.BigValueTextMode.NAME},
            ),
            Spec(
                "Cluster",
                "Replicas seen, and how many of them lead (1 in a healthy cluster).",
                [
                    ("max(autoscaler_cluster_replicas)", "replicas"),
                    ("sum(autoscaler_cluster_leader)", "leaders"),
                ],
                width=4,
                kind="stat",
            ),
        ],
    ),
    (
        "Cost",
        [
            Spec(
                "Started machines (billed CPU and RAM)",
                "Average started machines, moment by moment (machine-seconds per second):"
                " what Fly bills CPU and RAM for. Suspended ones are not in it: see the"
                " storage panel beside.",
                [(by("state", "autoscaler_machine_seconds_total", STARTED), "started")],
            ),
            Spec(
                "Suspended machines (billed storage only)",
                "Average suspended machines, moment by moment (machine-seconds per second):"
                " Fly bills no CPU or RAM for them, only storage by the GB-month (the root"
                " file system and the suspend's snapshot): another price, not to be added"
                " to the started ones.",
                [(by("state", "autoscaler_machine_seconds_total", SUSPENDED), "suspended")],
            ),
            Spec(
                "Machine-hours in range",
                "Over the dashboard's time range: started (billed CPU and RAM) and suspended"
                " (billed storage only), each on its own, never summed.",
                [
                    (
                        "sum by (state) (increase(autoscaler_machine_seconds_total"
                        f"{{{selector}}}[$__range])) / 3600",
                        legend,
                    )
                    for selector, legend in (
                        (STARTED, "started (CPU, RAM)"),
                        (SUSPENDED, "suspended (storage)"),
                    )
                ],
                unit="h",
                kind="stat",
            ),
        ],
    ),
    (
        "Machines API",
        [
            Spec(
                "API calls by operation",
                "Every Machines API call, retries included.",
                [(by("operation", "autoscaler_api_requests_total", ""), "{{operation}}")],
                unit="reqps",
                stacked=True,
            ),
            Spec(
                "API errors",
                "Failures as the AutoscalerApiErrors alert counts them: transport errors"
                " (code=error), 401/403 (the token), 429 (rate limits), 5xx (Fly). Not the"
                " 404, 409 and 412 answers of the course of things (a machine gone, a lease"
                " held, a state changed meanwhile). 0 per operation when there were none.",
                [
                    (
                        by("operation, code", "autoscaler_api_requests_total", API_FAILURES)
                        + " or "
                        + by("operation", "autoscaler_api_requests_total", "")
                        + " * 0",
                        "{{operation}} {{code}}",
                    )
                ],
                unit="reqps",
            ),
            Spec(
                "API latency p99",
                "Per operation. Waits (/wait) are long by design.",
                [
                    (
                        quantile(
                            0.99,
                            "operation, le",
                            "autoscaler_api_request_duration_seconds_bucket",
                            "",
                        ),
                        "{{operation}}",
                    )
                ],
                unit="s",
            ),
        ],
    ),
    (
        "Cluster",
        [
            Spec(
                "Deciders",
                "Processes that decide: 1 in a healthy cluster (or a single process); 0 while"
                " no replica holds the lease (nothing scales or wakes).",
                [("sum(autoscaler_cluster_leader)", "deciders")],
                width=4,
                kind="stat",
            ),
            Spec(
                "Replicas",
                "Replicas whose load report is live in Redis, as each replica counts them.",
                [("max(autoscaler_cluster_replicas)", "replicas")],
                width=4,
                kind="stat",
            ),
            Spec(
                "Requests per second by replica",
                "How the front balancer spreads traffic over the replicas (one series, with"
                " an empty replica label, for a single process).",
                [(by("replica", "autoscaler_requests_total"), "{{replica}}")],
                unit="reqps",
                stacked=True,
            ),
            Spec(
                "In flight by replica",
                "Requests each replica has at its machines now; the leader decides on the sum.",
                [
                    (
                        f"sum by (replica) (autoscaler_inflight_requests{{{APP}}})",
                        "{{replica}}",
                    )
                ],
                width=8,
            ),
        ],
    ),
]


def _targets(spec: Spec) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery()
        .ref_id(chr(ord("A") + i))
        .datasource(DS)
        .expr(expr)
        .legend_format(legend)
        .range()
        for i, (expr, legend) in enumerate(spec.targets)
    ]


def _timeseries(spec: Spec, panel_id: int) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DS)
        .height(8)
        .span(spec.width)
        .unit(spec.unit)
        .min(0)
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(40 if spec.stacked else 10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            cb.StackingConfig()
            .mode(common.StackingMode.NORMAL if spec.stacked else common.StackingMode.NONE)
            .group("A")
        )
        .legend(
            cb.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            cb.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if spec.steps:
        panel = panel.max(1).line_interpolation(common.LineInterpolation.STEP_AFTER)
    for target in _targets(spec):
        panel = panel.with_target(target)
    return panel


def _stat(spec: Spec, panel_id: int) -> stat.Panel:
    text_mode = spec.options.get("textMode", common.BigValueTextMode.VALUE_AND_NAME)
    assert isinstance(text_mode, common.BigValueTextMode)
    panel = (
        stat.Panel()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DS)
        .height(8)
        .span(spec.width)
        .unit(spec.unit)
        .min(0)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.NONE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(text_mode)
        .orientation(common.VizOrientation.HORIZONTAL)
    )
    for target in _targets(spec):
        panel = panel.with_target(target)
    return panel


def overview() -> db.Dashboard:
    dashboard = (
        db.Dashboard("Autoscaler overview")
        .uid("autoscaler-overview")
        .description(
            "Traffic, wakes, machines, cost and Machines API calls of the Fly.io autoscaler."
        )
        .tags(["autoscaler", "fly.io"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("")
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            db.QueryVariable("app")
            .label("App")
            .datasource(DS)
            # Every app, static or scaled, from start-up: the held-requests gauge is
            # declared at 0 for each and goes with an app a reload removes.
            .query("label_values(autoscaler_queued_requests, app)")
            .include_all(True)
            .all_value(".*")
            .multi(True)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
        )
    )
    panel_id = 0
    for title, specs in ROWS:
        panel_id += 1
        dashboard = dashboard.with_row(db.Row(title).id(panel_id))
        for spec in specs:
            panel_id += 1
            build = _stat if spec.kind == "stat" else _timeseries
            dashboard = dashboard.with_panel(build(spec, panel_id))
    return dashboard


DASHBOARDS = {"autoscaler-overview.json": overview}


def render(name: str) -> str:
    """The JSON text of one dashboard, as committed."""
    model = DASHBOARDS[name]().build()
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    for name in DASHBOARDS:
        (out / name).write_text(render(name), encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

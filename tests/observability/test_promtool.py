"""promtool on the shipped Prometheus files: syntax, and unit tests of every alert."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from autoscaler.metrics import PROXY_ERROR_REASONS, Metrics, ProxyErrorReason

from .conftest import ALERT_TESTS, ALERTS, DASHBOARD, PROMETHEUS_CONFIG, require_binary

REQUIRED_ALERTS = {
    "AutoscalerHigh5xxRatio",
    "AutoscalerProxyErrors",
    "AutoscalerWakeSlow",
    "AutoscalerWakeFailed",
    "AutoscalerQueueRejections",
    "AutoscalerApiErrors",
    "AutoscalerMachinesStuckMoving",
    "AutoscalerControlLoopStalled",
    "AutoscalerCheckGraceShort",
    "AutoscalerNoDecisions",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def promql_test(tmp_path: Path, series: dict[str, str], expr_tests: list[dict[str, Any]]) -> None:
    """Run ``promtool test rules`` on expressions over series scraped every minute
    (promtool's value notation), with the shipped rules loaded; fail with its output."""
    cases = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "promql_expr_test": expr_tests,
            }
        ],
    }
    path = tmp_path / "promql_test.yml"
    path.write_text(yaml.safe_dump(cases))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_required_alert_is_shipped_and_unit_tested() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    shipped = {rule["alert"] for group in groups for rule in group["rules"]}
    assert shipped >= REQUIRED_ALERTS
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == shipped


def test_queue_rejections_stand_down_on_the_wake_failed_condition_itself() -> None:
    """AutoscalerQueueRejections stands down while AutoscalerWakeFailed's condition holds
    over the rejections' own window, written again after its ``unless on (app)`` (a rule
    cannot name another's expression): an edit of one that the other does not follow
    would page twice again, or hide rejections no alert explains. Only the window differs
    (15 minutes there, 5 here: a full queue after the episode is news)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    expr = {rule["alert"]: " ".join(rule["expr"].split()) for g in groups for rule in g["rules"]}
    rejected, _, stand_down = expr["AutoscalerQueueRejections"].partition(" unless on (app) ")
    assert "[5m]" in rejected
    assert "[15m]" in expr["AutoscalerWakeFailed"]
    assert stand_down == f"( {expr['AutoscalerWakeFailed'].replace('[15m]', '[5m]')} )"


def test_every_proxy_error_reason_is_paged_for_or_left_to_another_alert_on_purpose() -> None:
    """AutoscalerProxyErrors names the reasons it pages for (the same list in each
    selector); the others are another alert's or no fault. A reason the proxy gains must be
    put on one side or the other, not fall through unseen."""
    others = {
        "queue_full": "AutoscalerQueueRejections",
        "wake_timeout": "AutoscalerQueueRejections",
        "app_not_found": "AutoscalerWakeFailed",
        "stopping": "",  # a stop, Retry-After: what it is for
        "app_removed": "",  # a reload removed the app
        "unsupported": "",  # 501, 505: the client's request
    }
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {rule["alert"]: rule for g in groups for rule in g["rules"]}
    selectors = set(
        re.findall(
            r"autoscaler_proxy_errors_total\{([^}]*)\}", rules["AutoscalerProxyErrors"]["expr"]
        )
    )
    (selector,) = selectors  # the same list in each
    match = re.fullmatch(r'reason=~"([a-z_|]+)"', selector)
    assert match is not None, selector
    paged = set(match.group(1).split("|"))
    assert not paged & others.keys()
    assert paged | others.keys() == set(PROXY_ERROR_REASONS)
    for alert in filter(None, others.values()):
        assert alert in rules


def test_the_5xx_panel_tells_the_apps_own_from_the_proxys_failed_wakes(tmp_path: Path) -> None:
    """The dashboard's 5xx ratio, evaluated by promtool on an app whose machines answer 5%
    of its requests 500 while 10% wait for wakes that fail (the proxy's 504s): the app's
    line shows its own 5%, the proxy's the 10% (one line of 15% blamed the app)."""
    [panel] = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == "5xx ratio"]
    exprs = {
        t["legendFormat"]: t["expr"].replace("$app", "dark").replace("$__rate_interval", "5m")
        for t in panel["targets"]
    }
    series = {
        'autoscaler_requests_total{app="dark",code="200",wake="none"}': "0+85x10",
        'autoscaler_requests_total{app="dark",code="500",wake="none"}': "0+5x10",
        'autoscaler_requests_total{app="dark",code="504",wake="failed"}': "0+10x10",
        'autoscaler_proxy_errors_total{app="dark",reason="wake_timeout"}': "0+10x10",
        'autoscaler_proxy_errors_total{app="dark",reason="queue_full"}': "0x10",
    }
    promql_test(
        tmp_path,
        series,
        [
            {
                "expr": f"round({exprs[legend]}, 0.0001)",  # (promtool compares exactly)
                "eval_time": "8m",
                "exp_samples": [{"value": ratio}],
            }
            for legend, ratio in (("app", 0.05), ("proxy", 0.1))
        ],
    )


def scrape(metrics: Metrics) -> dict[str, float]:
    """The requests and proxy-error series /metrics shows now, as promtool names series."""
    return {
        sample.name
        + "{"
        + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        + "}": sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name in ("autoscaler_requests_total", "autoscaler_proxy_errors_total")
    }


def test_an_apps_own_5xx_read_0_when_its_first_request_is_the_proxys_5xx(tmp_path: Path) -> None:
    """AutoscalerHigh5xxRatio's own 5xx of an app (its requests' 5xx less its proxy errors,
    both arms' forms) on what /metrics exported, scraped every minute, when the app's first
    request got a 5xx of the proxy's own: 0. A requests series born at its first count has
    no increase while its proxy error's, at 0 from the start, has one: that read -1, and
    up to one of the app's own 5xx went unseen while it stayed in the window. The 500 of a
    bug too: it counts under the app, wake none, in the series its machines' 500s count in
    (the first of them, a 500 of the proxy's, read -1). App "" (before routing, stored
    with no app label) reads 0 too: its bug's 500 and proxy error are at 0 from the start."""
    first: dict[str, tuple[int, str, ProxyErrorReason]] = {
        "web": (502, "none", "machine_error"),
        "cold": (504, "start", "machine_timeout"),  # its machine started for it, silent
        "busy": (503, "none", "queue_full"),
        "bug": (500, "none", "internal"),  # a bug in the proxy's handler (_answer_bug)
    }
    metrics = Metrics()
    for app in first:
        metrics.declare_app(app)
    scrapes = [scrape(metrics)]
    for app, (code, wake, reason) in first.items():
        metrics.proxy.answered(app, code, wake, 0.1, reason)
    scrapes += [scrape(metrics)] * 4
    names = sorted(set().union(*scrapes))
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    [alert] = [
        r["expr"] for g in groups for r in g["rules"] if r["alert"] == "AutoscalerHigh5xxRatio"
    ]
    own = set(
        re.findall(
            r"sum by \(app\) \((?:rate|increase)\("
            r'autoscaler_requests_total\{code=~"5.."\}\[5m\]\)\) - '
            r"sum by \(app\) \((?:rate|increase)\(autoscaler_proxy_errors_total\[5m\]\)\)",
            " ".join(alert.split()),
        )
    )
    assert len(own) == 2, own  # the rate and the increase
    series = {
        name: " ".join(f"{at[name]:g}" if name in at else "_" for at in scrapes) for name in names
    }
    promql_test(
        tmp_path,
        series,
        [
            {
                "expr": f"round({expr}, 0.0001)",  # (promtool compares exactly)
                "eval_time": "4m",
                "exp_samples": [
                    {"labels": "{}", "value": 0},
                    *({"labels": f'{{app="{app}"}}', "value": 0} for app in first),
                ],
            }
            for expr in sorted(own)
        ],
    )


def test_the_first_bugs_before_routing_meet_the_proxy_errors_count_arm(tmp_path: Path) -> None:
    """AutoscalerProxyErrors on what /metrics exported, scraped every minute, when the
    proxy's first answers were five 500s of bugs met before routing (app "", which
    Prometheus stores with no app label): its expression holds (their ratio, 1). Their
    proxy error series (internal) was born at its first count, with no increase: the
    count arm read 0 here (the first one short, had they come apart), and it never fired."""
    metrics = Metrics()
    scrapes = [scrape(metrics)]
    for _ in range(5):
        metrics.proxy.answered("", 500, "none", error="internal")  # as error_page counts
    scrapes += [scrape(metrics)] * 4
    names = sorted(set().union(*scrapes))
    series = {
        name: " ".join(f"{at[name]:g}" if name in at else "_" for at in scrapes) for name in names
    }
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    [alert] = [
        r["expr"] for g in groups for r in g["rules"] if r["alert"] == "AutoscalerProxyErrors"
    ]
    promql_test(
        tmp_path,
        series,
        [
            {
                "expr": f"round({alert}, 0.0001)",  # (promtool compares exactly)
                "eval_time": "4m",
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
        ],
    )

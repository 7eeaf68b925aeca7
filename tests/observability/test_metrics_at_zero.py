"""Series whose label values are known in advance exist at 0 before anything happens, so a
dashboard shows 0 (not "No data") for rejections and failures in a healthy run."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from autoscaler.config import load_settings
from autoscaler.control.view import FleetView
from autoscaler.metrics import (
    ACTION_RESULTS,
    PROXY_ERROR_CODES,
    PROXY_ERROR_REASONS,
    QUEUE_REJECTION_REASONS,
    SCALING_ACTIONS,
    WAKE_FAILED,
    WAKE_FAILED_CODES,
    WAKE_RESULTS,
    WOKEN_KINDS,
    Metrics,
)
from autoscaler.proxy.server import ProxyServer
from autoscaler.service import Service

CONFIG = """
apps:
  - {name: web, hosts: [web.test]}
  - {name: fixed, hosts: [fixed.test], backends: ["127.0.0.1:9"]}
"""
WEB_STATIC = '{name: web, hosts: [web.test], backends: ["127.0.0.1:9"]}'


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def proxy_errors(metrics: Metrics, app: str) -> dict[str, float]:
    """The app's autoscaler_proxy_errors_total series, by reason."""
    found = {}
    for reason in PROXY_ERROR_REASONS:
        count = value(metrics, "autoscaler_proxy_errors_total", app=app, reason=reason)
        if count is not None:
            found[reason] = count
    return found


def requests(metrics: Metrics, app: str) -> dict[tuple[int, str], float]:
    """The app's autoscaler_requests_total series, by (code, wake)."""
    return {
        (int(sample.labels["code"]), sample.labels["wake"]): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "autoscaler_requests_total" and sample.labels["app"] == app
    }


# The codes the proxy answers an app's request with itself (autoscaler/proxy/server.py),
# whose requests series exist at 0: without a wake for every app (and a bug's 500, never
# after a wake), after one of each kind for an app that wakes (and failed:
# WAKE_FAILED_CODES).
PROXY_CODES = (502, 503, 504)
UNWOKEN = {**{(code, "none"): 0.0 for code in PROXY_CODES}, (500, "none"): 0.0}
WOKEN = {
    **UNWOKEN,
    **{(code, kind): 0.0 for code in PROXY_CODES for kind in WOKEN_KINDS},
    **{(code, WAKE_FAILED): 0.0 for code in WAKE_FAILED_CODES},
}


def test_known_series_are_exported_at_zero_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "autoscaler.yaml"
    path.write_text(CONFIG)
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    Service(settings, path, metrics=metrics)  # built, not started: nothing has happened
    for result in ("success", "error"):
        assert value(metrics, "autoscaler_config_reloads_total", result=result) == 0
    for app in ("web", "fixed"):
        assert value(metrics, "autoscaler_queued_requests", app=app) == 0
        for reason in QUEUE_REJECTION_REASONS:
            assert value(metrics, "autoscaler_queue_rejections_total", app=app, reason=reason) == 0
        assert proxy_errors(metrics, app) == dict.fromkeys(PROXY_ERROR_REASONS, 0)
    # The requests series of the proxy's own 5xx too: its first one is an increase of
    # both, not a -1 of the app's own 5xx (AutoscalerHigh5xxRatio: requests' less these).
    assert requests(metrics, "web") == WOKEN
    assert requests(metrics, "fixed") == UNWOKEN  # never woken: wake "none" only
    # Before routing (app ""), a bug's 500 only: AutoscalerProxyErrors pages for it, and
    # the first of a series born at 1 is no increase. (501, 505: the client's, not paged.)
    assert proxy_errors(metrics, "") == {"internal": 0}
    assert requests(metrics, "") == {(500, "none"): 0}
    for action in SCALING_ACTIONS:
        for result in ACTION_RESULTS:
            labels = {"app": "web", "action": action, "result": result}
            assert value(metrics, "autoscaler_scaling_actions_total", **labels) == 0
    for kind in WOKEN_KINDS:
        assert value(metrics, "autoscaler_wake_duration_seconds_count", app="web", kind=kind) == 0
    for result in WAKE_RESULTS:
        assert value(metrics, "autoscaler_wakes_total", app="web", result=result) == 0
    for state in ("started", "suspended"):
        assert value(metrics, "autoscaler_machine_seconds_total", app="web", state=state) == 0
    for result in ("ok", "failed", "exhausted"):
        assert value(metrics, "autoscaler_machine_restarts_total", app="web", result=result) == 0
    assert value(metrics, "autoscaler_lease_conflicts_total", app="web") == 0
    for result in ("passed", "failed"):
        assert value(metrics, "autoscaler_check_rechecks_total", app="web", result=result) == 0
    # A static app is never scaled or woken: no such series for it.
    labels = {"app": "fixed", "action": "start", "result": "ok"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) is None
    assert value(metrics, "autoscaler_wakes_total", app="fixed", result="failed") is None


def test_the_proxy_error_codes_at_zero_are_those_the_proxy_answers_under_an_app() -> None:
    """Every 5xx the proxy raises as a Failure (counted under the request's app) has its
    requests series at 0, as has its 500 of a bug (``BUG_ANSWER``, wake none); the 501 and
    505 of a request it does not do count with app "" and need none. A code added there
    must be declared too."""
    proxy = Path(__file__).parents[2] / "autoscaler/proxy"
    source = "".join(path.read_text() for path in sorted(proxy.glob("*.py")))
    raised = {int(code) for code in re.findall(r"Failure\(\s*(5\d\d)\b", source)}
    assert raised == set(PROXY_ERROR_CODES)


async def test_an_app_added_by_a_reload_gets_its_series_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "autoscaler.yaml"
    path.write_text(CONFIG)
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    service = Service(settings, path, metrics=metrics)
    path.write_text(CONFIG + "  - {name: late, hosts: [late.test]}\n")
    assert await service.reload()
    labels = {"app": "late", "reason": "wake_timeout"}
    assert value(metrics, "autoscaler_queue_rejections_total", **labels) == 0
    labels = {"app": "late", "action": "resume", "result": "error"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) == 0
    assert value(metrics, "autoscaler_config_reloads_total", result="success") == 1


async def test_requests_at_zero_of_an_app_a_reload_removes_go_unless_they_counted(
    tmp_path: Path,
) -> None:
    """AutoscalerWakeFailed reads the increase of an app's requests answered for a failed
    wake, 504 or 502, and AutoscalerHigh5xxRatio that of its proxy errors' codes: exported
    at 0 (above), the first one is an increase. An app a reload removes from the proxy
    takes its zeros with it; a count stays, as every total does."""
    path = tmp_path / "autoscaler.yaml"
    path.write_text(CONFIG + "  - {name: gone, hosts: [gone.test]}\n")
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    Service(settings, path, metrics=metrics)  # declares the apps
    proxy = ProxyServer(settings, FleetView(), metrics)  # built, not started
    metrics.proxy.answered("web", 504, WAKE_FAILED, 30.0, "wake_timeout")
    metrics.proxy.answered("web", 502, "none", 0.1, "machine_error")
    assert requests(metrics, "gone") == WOKEN
    assert proxy_errors(metrics, "gone") == dict.fromkeys(PROXY_ERROR_REASONS, 0)
    proxy.update_settings(settings.model_copy(update={"apps": settings.apps[:2]}))
    assert requests(metrics, "gone") == {}
    assert proxy_errors(metrics, "gone") == {}
    assert requests(metrics, "web") == {**WOKEN, (504, WAKE_FAILED): 1, (502, "none"): 1}
    proxy.update_settings(settings.model_copy(update={"apps": settings.apps[2:]}))
    assert requests(metrics, "web") == {(504, WAKE_FAILED): 1, (502, "none"): 1}
    assert proxy_errors(metrics, "web") == {"wake_timeout": 1, "machine_error": 1}


async def test_an_app_a_reload_makes_static_loses_its_wake_series_that_never_counted(
    tmp_path: Path,
) -> None:
    """A static app is never woken nor scaled: its zeros of wakes, actions and the like
    go (a dashboard showed wakes of an app that can have none). What counted stays, as
    every total does; the proxy's series stay, the app still serves."""
    path = tmp_path / "autoscaler.yaml"
    path.write_text(CONFIG)
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    service = Service(settings, path, metrics=metrics)
    metrics.wakes.labels(app="web", result="ok").inc()
    path.write_text(CONFIG.replace("{name: web, hosts: [web.test]}", WEB_STATIC))
    assert await service.reload()
    assert value(metrics, "autoscaler_wakes_total", app="web", result="ok") == 1
    for result in set(WAKE_RESULTS) - {"ok"}:
        assert value(metrics, "autoscaler_wakes_total", app="web", result=result) is None
    for kind in WOKEN_KINDS:
        labels = {"app": "web", "kind": kind}
        assert value(metrics, "autoscaler_wake_duration_seconds_count", **labels) is None
    labels = {"app": "web", "action": "start", "result": "ok"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) is None
    assert value(metrics, "autoscaler_lease_conflicts_total", app="web") is None
    assert requests(metrics, "web") == UNWOKEN  # served without a wake, as any static app
    assert proxy_errors(metrics, "web") == dict.fromkeys(PROXY_ERROR_REASONS, 0)
    assert value(metrics, "autoscaler_queued_requests", app="web") == 0
    # Scaled again: its series are back at 0, the count kept.
    path.write_text(CONFIG)
    assert await service.reload()
    assert value(metrics, "autoscaler_wakes_total", app="web", result="failed") == 0
    assert value(metrics, "autoscaler_wakes_total", app="web", result="ok") == 1
    assert requests(metrics, "web") == WOKEN


def app_series(metrics: Metrics, app: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every series /metrics exports for the app (histograms by their count), with its
    value: (sample name, its other labels) -> value."""
    return {
        (
            sample.name,
            frozenset((k, v) for k, v in sample.labels.items() if k != "app"),
        ): sample.value
        for family in metrics.exported.collect()
        for sample in family.samples
        if sample.labels.get("app") == app
        and not sample.name.endswith(("_created", "_bucket", "_sum"))
    }


async def test_an_app_a_reload_removes_takes_its_zeros_and_keeps_its_counts(
    tmp_path: Path,
) -> None:
    """Its rejections, ejections, actions, wakes... at 0 went with it: zeros of an app
    that no longer exists stayed on /metrics and dashboards for good. What counted stays,
    as every total does; the app added again has its series at 0 again."""
    gone = CONFIG + "  - {name: gone, hosts: [gone.test]}\n"
    path = tmp_path / "autoscaler.yaml"
    path.write_text(gone)
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    service = Service(settings, path, metrics=metrics)  # declares the apps
    service.proxy = ProxyServer(settings, service.view, metrics)  # built, not started
    metrics.scaling_actions.labels(app="gone", action="resume", result="ok").inc()
    metrics.wake_duration.labels(app="gone", kind="resume").observe(0.2)
    metrics.machine_ejections.labels(app="gone", reason="connect").inc()
    path.write_text(CONFIG)
    assert await service.reload()
    assert app_series(metrics, "gone") == {
        (
            "autoscaler_scaling_actions_total",
            frozenset({("action", "resume"), ("result", "ok")}),
        ): 1,
        ("autoscaler_wake_duration_seconds_count", frozenset({("kind", "resume")})): 1,
        ("autoscaler_machine_ejections_total", frozenset({("reason", "connect")})): 1,
    }
    # The apps that stay keep their zeros.
    labels = {"app": "web", "reason": "queue_full"}
    assert value(metrics, "autoscaler_queue_rejections_total", **labels) == 0
    assert value(metrics, "autoscaler_wakes_total", app="web", result="failed") == 0
    # Added again: its zeros are back, its counts kept.
    path.write_text(gone)
    assert await service.reload()
    labels = {"app": "gone", "reason": "queue_full"}
    assert value(metrics, "autoscaler_queue_rejections_total", **labels) == 0
    assert value(metrics, "autoscaler_wakes_total", app="gone", result="failed") == 0
    labels = {"app": "gone", "action": "resume", "result": "ok"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) == 1
    assert requests(metrics, "gone") == WOKEN

"""Series whose label values are known in advance exist at 0 before anything happens, so a
dashboard shows 0 (not "No data") for rejections and failures in a healthy run."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from autoscaler.config import load_settings
from autoscaler.control.view import FleetView
from autoscaler.metrics import (
    ACTION_RESULTS,
    PROXY_ERROR_REASONS,
    QUEUE_REJECTION_REASONS,
    SCALING_ACTIONS,
    WAKE_FAILED,
    WAKE_FAILED_CODES,
    WAKE_KINDS,
    WAKE_RESULTS,
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


def failed_wake_requests(metrics: Metrics, app: str) -> dict[int, float]:
    """The app's autoscaler_requests_total{wake="failed"} series, by code."""
    found = {}
    for code in (*WAKE_FAILED_CODES, 499, 503):
        labels = {"app": app, "code": str(code), "wake": WAKE_FAILED}
        count = value(metrics, "autoscaler_requests_total", **labels)
        if count is not None:
            found[code] = count
    return found


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
    for action in SCALING_ACTIONS:
        for result in ACTION_RESULTS:
            labels = {"app": "web", "action": action, "result": result}
            assert value(metrics, "autoscaler_scaling_actions_total", **labels) == 0
    for kind in WAKE_KINDS:
        assert value(metrics, "autoscaler_wake_duration_seconds_count", app="web", kind=kind) == 0
    for result in WAKE_RESULTS:
        assert value(metrics, "autoscaler_wakes_total", app="web", result=result) == 0
    for state in ("started", "suspended"):
        assert value(metrics, "autoscaler_machine_seconds_total", app="web", state=state) == 0
    for result in ("ok", "failed", "exhausted"):
        assert value(metrics, "autoscaler_machine_restarts_total", app="web", result=result) == 0
    assert value(metrics, "autoscaler_lease_conflicts_total", app="web") == 0
    assert failed_wake_requests(metrics, "web") == {504: 0, 502: 0}
    for result in ("passed", "failed"):
        assert value(metrics, "autoscaler_check_rechecks_total", app="web", result=result) == 0
    # A static app is never scaled or woken: no such series for it.
    labels = {"app": "fixed", "action": "start", "result": "ok"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) is None
    assert value(metrics, "autoscaler_wakes_total", app="fixed", result="failed") is None
    assert failed_wake_requests(metrics, "fixed") == {}


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


async def test_failed_wake_requests_of_an_app_a_reload_removes_go_unless_they_counted(
    tmp_path: Path,
) -> None:
    """AutoscalerWakeFailed reads the increase of an app's requests answered for a failed
    wake, 504 or 502: exported at 0 (above), its first one is an increase. An app a reload
    removes from the proxy takes its zeros with it; a count stays, as every total does."""
    path = tmp_path / "autoscaler.yaml"
    path.write_text(CONFIG + "  - {name: gone, hosts: [gone.test]}\n")
    settings, _ = load_settings(path, env={})
    metrics = Metrics(CollectorRegistry())
    Service(settings, path, metrics=metrics)  # declares the apps
    proxy = ProxyServer(settings, FleetView(), metrics)  # built, not started
    metrics.proxy.answered("web", 504, WAKE_FAILED, 30.0, "wake_timeout")
    assert failed_wake_requests(metrics, "web") == {504: 1, 502: 0}
    assert failed_wake_requests(metrics, "gone") == {504: 0, 502: 0}
    assert proxy_errors(metrics, "gone") == dict.fromkeys(PROXY_ERROR_REASONS, 0)
    proxy.update_settings(settings.model_copy(update={"apps": settings.apps[:2]}))
    assert failed_wake_requests(metrics, "gone") == {}
    assert proxy_errors(metrics, "gone") == {}
    assert failed_wake_requests(metrics, "web") == {504: 1, 502: 0}
    proxy.update_settings(settings.model_copy(update={"apps": settings.apps[2:]}))
    assert failed_wake_requests(metrics, "web") == {504: 1}
    assert proxy_errors(metrics, "web") == {"wake_timeout": 1}


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
    for kind in WAKE_KINDS:
        labels = {"app": "web", "kind": kind}
        assert value(metrics, "autoscaler_wake_duration_seconds_count", **labels) is None
    labels = {"app": "web", "action": "start", "result": "ok"}
    assert value(metrics, "autoscaler_scaling_actions_total", **labels) is None
    assert value(metrics, "autoscaler_lease_conflicts_total", app="web") is None
    assert failed_wake_requests(metrics, "web") == {}
    assert proxy_errors(metrics, "web") == dict.fromkeys(PROXY_ERROR_REASONS, 0)
    assert value(metrics, "autoscaler_queued_requests", app="web") == 0
    # Scaled again: its series are back at 0, the count kept.
    path.write_text(CONFIG)
    assert await service.reload()
    assert value(metrics, "autoscaler_wakes_total", app="web", result="failed") == 0
    assert value(metrics, "autoscaler_wakes_total", app="web", result="ok") == 1
    assert failed_wake_requests(metrics, "web") == {504: 0, 502: 0}

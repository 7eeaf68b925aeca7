"""The live view's pieces: sparklines, figures from /metrics, rates, and the drawn panel."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from autoscaler import tui
from autoscaler.metrics import Metrics


def test_sparkline_scales_to_the_maximum() -> None:
    assert tui.sparkline([]) == ""
    assert tui.sparkline([0, 0]) == "▁▁"
    assert tui.sparkline([0, 1, 4, 8]) == "▁▂▅█"  # 4/8 of 7 steps rounds to 4
    assert tui.sparkline([0.001, 100]) == "▂█"  # anything above nothing shows
    assert tui.sparkline(list(range(100)), width=3) == "███"


def busy_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.declare_app("web")
    for code in (200, 200, 200, 404, 502):
        metrics.proxy.answered("web", code, "none", 0.1)
    metrics.proxy.answered("other", 200, "start", 0.3)
    metrics.queued.labels(app="web").set(3)
    metrics.wake_duration.labels(app="web", kind="start").observe(2.0)
    metrics.wake_duration.labels(app="web", kind="start").observe(1.0)
    metrics.proxy.in_flight = lambda: [("web", 7)]
    return metrics


def test_traffic_is_read_alike_from_a_registry_and_from_the_text_format() -> None:
    metrics = busy_metrics()
    direct = tui.traffic_by_app(metrics.registry.collect())
    text = generate_latest(metrics.registry).decode()
    parsed = tui.traffic_by_app(text_string_to_metric_families(text))
    assert direct == parsed
    web = direct["web"]
    assert web.requests == 5
    assert web.answers == {"2xx": 3, "4xx": 1, "5xx": 1}
    assert web.latency_count == 5
    assert web.queued == 3
    assert web.in_flight == 7
    assert web.wakes == {"start": 2, "resume": 0, "uncordon": 0}
    assert tui.wakes_text(web) == "start 2 (mean 1.50 s), resume 0, uncordon 0"
    assert tui.answers_text(web) == "2xx 3  3xx 0  4xx 1  5xx 1"


def test_history_gives_rates_and_mean_latencies_between_samples() -> None:
    history = tui.History()
    history.add(10.0, {"web": tui.Traffic(requests=0, latency_sum=0, latency_count=0)})
    history.add(12.0, {"web": tui.Traffic(requests=20, latency_sum=2.0, latency_count=20)})
    history.add(13.0, {"web": tui.Traffic(requests=20, latency_sum=2.0, latency_count=20)})
    assert history.rates("web") == [10.0, 0.0]
    assert history.latencies_ms("web") == [100.0, 0.0]
    assert history.rates("nobody") == []
    for i in range(100):
        history.add(14.0 + i, {"web": tui.Traffic()})
    assert len(history.rates("web")) == tui.HISTORY


def test_the_view_draws_each_machine_with_its_state_and_the_reason() -> None:
    doc = {
        "version": "1.2.3",
        "ready": True,
        "apps": [
            {
                "app": "web",
                "desired": 1,
                "started": 1,
                "panic": False,
                "last_reason": "demand 3.0 needs 1 machine",
                "last_decision_age_s": 0.5,
                "machines": [
                    {"id": "m1", "state": "started", "cordoned": False, "in_flight": 2,
                     "last_used_age_s": 0.1},
                    {"id": "m2", "state": "suspending", "cordoned": True, "in_flight": 0,
                     "last_used_age_s": None},
                ],
            }
        ],
    }  # fmt: skip
    history = tui.History()
    history.add(1.0, tui.traffic_by_app(busy_metrics().registry.collect()))
    console = Console(record=True, width=100, force_terminal=True)
    console.print(tui.view(doc, history, header=["HEAD"], footer=["FOOT"]))
    styled = console.export_text(styles=True, clear=False)
    text = console.export_text()
    assert text.splitlines()[0] == "HEAD"
    assert "autoscaler 1.2.3: ready" in text
    assert "web  desired 1, started 1, panic no, decided 0.5s ago" in text
    assert "held 3   in flight 7   answers  2xx 3  3xx 0  4xx 1  5xx 1" in text
    assert "why      demand 3.0 needs 1 machine" in text
    assert "wakes    start 2 (mean 1.50 s), resume 0, uncordon 0" in text
    rows = [line.strip("│ ").split() for line in text.splitlines() if "m1" in line or "m2" in line]
    assert rows == [
        ["m1", "started", "no", "2", "0.1s", "ago"],
        ["m2", "suspending", "yes", "0", "never"],
    ]
    assert text.rstrip().endswith("FOOT")
    assert "\x1b[1;32mstarted" in styled  # green
    assert "\x1b[1;33msuspending" in styled  # a moving state: yellow
    assert tui.view(None, history).renderables[0].plain.startswith("waiting for the first")


def test_an_app_name_is_drawn_as_it_is_not_read_as_markup() -> None:
    """The panel's title was rich markup: "[red]web" lost its brackets and "web[/x]" ended
    the live view with a MarkupError."""
    doc = {"apps": [{"app": "[red]web", "desired": 1}, {"app": "web[/x]", "desired": "[/]"}]}
    console = Console(record=True, width=100)
    console.print(tui.view(doc, tui.History()))
    text = console.export_text()
    assert "[red]web  desired 1," in text
    assert "web[/x]  desired [/]," in text


def test_the_view_draws_the_static_apps() -> None:
    """A static app (``/status``'s ``static_apps``) had no panel: it looked missing."""
    doc = {
        "apps": [],
        "static_apps": [
            {
                "app": "fixed",
                "static": True,
                "in_flight": 1,
                "queued": 0,
                "last_request_age_s": 0.5,
                "machines": [
                    {"id": "10.0.0.1:80", "state": "started", "in_flight": 1,
                     "last_used_age_s": 0.5},
                ],
            }
        ],
    }  # fmt: skip
    console = Console(record=True, width=100)
    console.print(tui.view(doc, tui.History()))
    text = console.export_text()
    assert "fixed  static, 1 backend(s)" in text
    assert "routed to its backends, not scaled" in text
    assert "wakes" not in text  # nothing wakes a static app
    row = next(line for line in text.splitlines() if "10.0.0.1:80" in line)
    assert row.strip("│ ").split() == ["10.0.0.1:80", "started", "1", "0.5s", "ago"]


def test_the_view_says_when_the_decisions_are_stale() -> None:
    """`autoscaler status --watch` during an API outage said "ready" and no more."""
    doc = {
        "version": "1.2.3",
        "ready": True,
        "control_healthy": False,
        "control_problems": ["Machines API unreachable: list_machines: HTTP 500"],
        "apps": [],
    }
    console = Console(record=True, width=100)
    console.print(tui.view(doc, tui.History()))
    assert console.export_text().splitlines()[:2] == [
        "autoscaler 1.2.3: ready",
        "control NOT HEALTHY (decisions are stale): Machines API unreachable: list_machines: "
        "HTTP 500",
    ]

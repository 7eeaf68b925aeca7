"""The proxy's per-request metrics: the same exposition prometheus_client's own objects
would give for the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from autoscaler.metrics import (
    PROXY_ERROR_CODES,
    PROXY_ERROR_REASONS,
    REQUEST_BUCKETS,
    ProxyErrorReason,
    RequestMetrics,
)

ANSWERS: list[tuple[str, int, str, float, ProxyErrorReason | None]] = [
    ("web", 200, "none", 0.0004, None),
    ("web", 200, "none", 0.001, None),  # on a bucket's bound: counted in that bucket
    ("web", 200, "resume", 0.3, None),
    ("web", 502, "none", 61.0, "machine_error"),  # past the last bound: only +Inf
    ("web", 500, "none", 0.2, None),  # the app's own
    ("api", 404, "start", 2.5, None),
    ("", 404, "none", 0.0, None),
]


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_exposition_matches_prometheus_clients_own_metrics() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = RequestMetrics(ours_registry)
    spec_requests, spec_duration, spec_inflight, spec_errors = RequestMetrics.SPECS
    counter = Counter(
        spec_requests.name, spec_requests.help, spec_requests.labels, registry=theirs_registry
    )
    histogram = Histogram(
        spec_duration.name,
        spec_duration.help,
        spec_duration.labels,
        buckets=REQUEST_BUCKETS,
        registry=theirs_registry,
    )
    gauge = Gauge(
        spec_inflight.name, spec_inflight.help, spec_inflight.labels, registry=theirs_registry
    )
    errors = Counter(
        spec_errors.name, spec_errors.help, spec_errors.labels, registry=theirs_registry
    )
    # A bug's 500 before routing, from the start (no app "" series but these two).
    counter.labels(app="", code="500", wake="none")
    errors.labels(app="", reason="internal")
    ours.declare_errors("api")
    for code in (*PROXY_ERROR_CODES, 500):  # and a bug's 500 (BUG_ANSWER)
        counter.labels(app="api", code=str(code), wake="none")
    for reason in PROXY_ERROR_REASONS:
        errors.labels(app="api", reason=reason)
    for app, code, wake, seconds, error in ANSWERS:
        ours.answered(app, code, wake, seconds, error)
        counter.labels(app=app, code=str(code), wake=wake).inc()
        histogram.labels(app=app).observe(seconds)
        if error is not None:
            errors.labels(app=app, reason=error).inc()
    ours.answered("", 400, "none")  # refused before routing: counted, not timed
    counter.labels(app="", code="400", wake="none").inc()
    ours.in_flight = lambda: [("web", 2), ("api", 0)]
    gauge.labels(app="web").set(2)
    gauge.labels(app="api").set(0)

    assert exposition(ours_registry) == exposition(theirs_registry)
    assert (
        ours_registry.get_sample_value(
            "autoscaler_request_duration_seconds_bucket", {"app": "web", "le": "0.001"}
        )
        == 2
    )


def test_an_empty_collector_still_describes_its_metrics() -> None:
    registry = CollectorRegistry()
    RequestMetrics(registry)
    text = generate_latest(registry).decode()
    for spec in RequestMetrics.SPECS:
        assert f"# HELP {spec.name} {spec.help}" in text


def test_every_ejection_reason_is_exported_at_zero() -> None:
    """The reasons declared at zero are exactly those the proxy's health can give."""
    from autoscaler.metrics import EJECTION_REASONS
    from autoscaler.proxy import health

    given = {health.CONNECT, health.RESET, health.TIMEOUT, health.BAD_RESPONSE}
    assert set(EJECTION_REASONS) == given | {health.SERVER_ERROR, health.CHECKS}

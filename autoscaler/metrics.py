"""Every Prometheus metric of the autoscaler, built on an injected registry.

Names and labels are a public interface (dashboards, alert rules and README's metrics table
rely on them). Label values stay bounded: apps, states, actions and status codes, never
machine ids, paths or client addresses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Wake latencies run from a resume (~100 ms) to a slow cold boot (~30 s).
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metric objects, registered on ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "autoscaler_requests",
            "Requests answered by the proxy, by status code and how the machine was woken.",
            ["app", "code", "wake"],
            registry=r,
        )
        self.request_duration = Histogram(
            "autoscaler_request_duration_seconds",
            "Time from a request's arrival to the end of its response headers.",
            ["app"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "autoscaler_inflight_requests",
            "Requests being served by a machine right now.",
            ["app"],
            registry=r,
        )
        self.queued = Gauge(
            "autoscaler_queued_requests",
            "Requests held by the proxy: waiting for a wake or for a machine under its limit.",
            ["app"],
            registry=r,
        )
        self.queue_rejections = Counter(
            "autoscaler_queue_rejections",
            "Held requests turned away (reason: queue_full, wake_timeout).",
            ["app", "reason"],
            registry=r,
        )
        self.wake_duration = Histogram(
            "autoscaler_wake_duration_seconds",
            "Time from a wake request until a machine was routable (kind: resume, start).",
            ["app", "kind"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.machines = Gauge(
            "autoscaler_machines",
            "Machines by state as last read from the API; state=cordoned counts cordoned ones.",
            ["app", "state"],
            registry=r,
        )
        self.desired_machines = Gauge(
            "autoscaler_desired_machines",
            "Started machines the policy wants.",
            ["app"],
            registry=r,
        )
        self.panic_mode = Gauge(
            "autoscaler_panic_mode",
            "1 while the app's policy is in panic mode.",
            ["app"],
            registry=r,
        )
        self.scaling_actions = Counter(
            "autoscaler_scaling_actions",
            "Actions taken on machines (start, resume, cordon, uncordon, suspend, stop).",
            ["app", "action", "result"],
            registry=r,
        )
        self.machine_seconds = Counter(
            "autoscaler_machine_seconds",
            "Machine-seconds spent started or suspended: what the fleet costs.",
            ["app", "state"],
            registry=r,
        )
        self.api_requests = Counter(
            "autoscaler_api_requests",
            "Machines API calls by operation and HTTP status (or 'error' for transport).",
            ["operation", "code"],
            registry=r,
        )
        self.api_request_duration = Histogram(
            "autoscaler_api_request_duration_seconds",
            "Machines API call latency by operation.",
            ["operation"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "autoscaler_config_reloads",
            "Configuration reloads (result: success, error).",
            ["result"],
            registry=r,
        )
        self.control_last_tick = Gauge(
            "autoscaler_control_last_tick_timestamp_seconds",
            "Unix time of the control loop's last tick (0 before the first; NaN without one).",
            registry=r,
        )
        self.build_info = Gauge(
            "autoscaler_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=r,
        )
        if version:
            self.build_info.labels(version=version).set(1)

    def observe_api(self, operation: str, status: int | None, duration_s: float) -> None:
        """The Fly client's observer callback: (operation, status or None, duration)."""
        code = str(status) if status is not None else "error"
        self.api_requests.labels(operation=operation, code=code).inc()
        self.api_request_duration.labels(operation=operation).observe(duration_s)

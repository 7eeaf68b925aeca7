"""Every Prometheus metric of the autoscaler, built on an injected registry.

Names and labels are a public interface (dashboards, alert rules and README's metrics table
rely on them). Label values stay bounded: apps, states, actions and status codes, never
machine ids, paths or client addresses.

In cluster mode every series that ``/metrics`` exports carries one more label, ``replica``
(this replica's id), except those in :data:`CLUSTER_WIDE`; a single process exports none
(Prometheus reads a missing label as the empty one, so ``sum by (app)`` and the like read
both the same). The label is added when scraped (:class:`ReplicaLabel` over the registry),
so the metric objects, their call sites and ``Metrics.registry`` are the same in both modes.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Wake latencies run from a resume (~100 ms) to a slow cold boot (~30 s).
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# A variable-length tuple: the compiled build keeps a fixed-length one unboxed, and would box
# its fifteen floats for every bisect.
REQUEST_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Label values known in advance: their series are exported at 0 from the start, so that a
# dashboard's rate of rejections or failures shows 0 in a healthy run, not "No data".
RELOAD_RESULTS = ("success", "error")
QUEUE_REJECTION_REASONS = ("queue_full", "wake_timeout")
SCALING_ACTIONS = ("start", "resume", "cordon", "uncordon", "suspend", "stop")
ACTION_RESULTS = ("ok", "error")
WAKE_KINDS = ("resume", "start")
WAKE_RESULTS = ("ok", "failed", "cancelled")
BILLED_STATES = ("started", "suspended")
RESTART_RESULTS = ("ok", "failed", "exhausted")
PREWARM_RESULTS = ("hit", "miss")
RECHECK_RESULTS = ("passed", "failed")
# autoscaler_requests_total's wake label of a request held for a wake that brought no
# machine up (autoscaler/proxy/gate.py), and the codes such a request is answered with:
# 504, its wake_timeout_s passed; 502, the Machines API has no such app. Those series are
# exported at 0 for every app that wakes: AutoscalerWakeFailed reads their increase, and a
# series born at its first count has none (the first failed wake after a start, or after
# 15 quiet minutes, would raise nothing). Not 499 nor 503: a request that left (or was
# shed) is labelled failed only in the second between a failed wake and the proxy's next
# try (then it is that try's kind); those of an episode that wait it out get 504 or 502.
WAKE_FAILED = "failed"
WAKE_FAILED_CODES = (504, 502)
# autoscaler_requests_total's wake label of a request that needed no wake.
NO_WAKE = "none"
# The wake label of a request whose wake lifted a cordon (a drain taken back): a machine
# already up, routed again, no boot; what the wake returns and its log line's how say.
WAKE_UNCORDON = "uncordon"
# What a wake that made a machine routable for held requests says it did: the kinds of
# autoscaler_wake_duration_seconds, and the wake labels of a woken request.
WOKEN_KINDS = (*WAKE_KINDS, WAKE_UNCORDON)
# Why the proxy answered a request with a 5xx of its own (autoscaler_proxy_errors_total):
# every such answer has one, so that the app's own 5xx are autoscaler_requests_total's
# minus these. The answers of held requests turned away (queue_full, wake_timeout) count
# here too, and also in autoscaler_queue_rejections_total.
ProxyErrorReason = Literal[
    "queue_full",  # 503: the app's queue of held requests was full (max_queue)
    "wake_timeout",  # 504: held past wake_timeout_s, for a wake or for a free machine
    "app_not_found",  # 502: the Machines API has no such app (its wake failed)
    "unreachable",  # 502: no machine of the app took the connection, after a retry
    "machine_error",  # 502: the machine cut the connection, or answered what is not HTTP
    "machine_timeout",  # 504: the machine sent no answer within upstream_timeout_s
    "drained",  # 502: the machine's drain ran out before it answered
    "stopping",  # 503: the proxy stops
    "app_removed",  # 503: a reload removed the app
    "unsupported",  # 501, 505: the request needs what the proxy does not do
    "internal",  # 500: a bug in the proxy
]
PROXY_ERROR_REASONS: tuple[ProxyErrorReason, ...] = get_args(ProxyErrorReason)
# The codes of the proxy's own answers under an app, whose autoscaler_requests_total
# series are exported at 0 for every app, wake "none", and for an app that wakes with the
# wake kinds too (the failed ones are WAKE_FAILED_CODES'): AutoscalerHigh5xxRatio reads the
# app's own 5xx as the requests' increase minus the proxy errors', and a requests series
# born at its first count has none (the app's first proxy 502 read -1 of its own while it
# stayed in the window, and up to one of its own went unseen). The 501 and 505 of a
# request the proxy does not do count with app "" (PRE_ROUTING), which has no machines and
# so no own 5xx to hide: a -1 there fires nothing, and misses nothing.
PROXY_ERROR_CODES = (502, 503, 504)
# The 500 of a bug in the proxy's handler, counted under the request's app with wake
# "none" always (_answer_bug), in the series the app's machines' 500s count in: exported at
# 0 for every app too (one series each), or a bug's 500 before the app's first read -1.
BUG_ANSWER = (500, NO_WAKE)
# The app label of requests answered before routing (autoscaler/proxy/server.py's
# error_page, and _answer_bug before the request had an app): 400, 414, 431..., the 501
# and 505 of a request the proxy does not do, and a bug's 500. Its bug's proxy error
# (internal) and requests series (BUG_ANSWER) exist at 0 from the start (RequestMetrics):
# AutoscalerProxyErrors pages for a bug there too, and a series born at its first count
# has no increase (the count arm missed the first, and it read -1 of the app's own 5xx).
PRE_ROUTING = ""
# (code, wake) of the requests series exported at 0: for every app, and for one that wakes.
PROXY_ERROR_ANSWERS = (*((code, NO_WAKE) for code in PROXY_ERROR_CODES), BUG_ANSWER)
WOKEN_ANSWERS = (
    *((code, kind) for kind in WOKEN_KINDS for code in PROXY_ERROR_CODES),
    *((code, WAKE_FAILED) for code in WAKE_FAILED_CODES),
)
# Why the proxy took a machine out of rotation (autoscaler/proxy/health.py names them).
EJECTION_REASONS = ("connect", "reset", "timeout", "bad_response", "5xx", "checks")
# Families whose value is the same on every replica: no ``replica`` label in cluster mode.
CLUSTER_WIDE = frozenset({"autoscaler_build_info", "autoscaler_cluster_replicas"})


class Metrics:
    """The metric objects, registered on ``registry`` (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._labelled = ReplicaLabel(r)
        self.exported = CollectorRegistry(auto_describe=False)
        """What ``/metrics`` serves: the registry's metrics, with the ``replica`` label in
        cluster mode."""
        self.exported.register(self._labelled)
        self.proxy = RequestMetrics(r)
        self.queued = Gauge(
            "autoscaler_queued_requests",
            "Requests held by the proxy: waiting for a wake or for a machine under its limit.",
            ["app"],
            registry=r,
        )
        self.queue_rejections = Counter(
            "autoscaler_queue_rejections",
            "Held requests turned away (reason: queue_full, wake_timeout); their 503s and"
            " 504s count in autoscaler_proxy_errors_total too, under the same reasons.",
            ["app", "reason"],
            registry=r,
        )
        self.machine_ejections = Counter(
            "autoscaler_machine_ejections",
            "Machines taken out of rotation by the proxy (reason: connect, reset, timeout,"
            " bad_response, 5xx, checks).",
            ["app", "reason"],
            registry=r,
        )
        self.wake_duration = Histogram(
            "autoscaler_wake_duration_seconds",
            "Time from a wake request until a machine was routable (kind: resume, start; a resume"
            " that fell back to a cold boot is a start; uncordon, a drain taken back, its"
            " cordon lifted, no boot). In cluster mode observed by the"
            " replica that made the wake: the leader, for a follower's wake it served.",
            ["app", "kind"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.wakes = Counter(
            "autoscaler_wakes",
            "Wakes for held requests, by how they ended (result: ok, a machine was routable,"
            " one that already was or a drain taken back included; failed, the wake gave up:"
            " no machine came up within wake_timeout_s, none could be woken, or an API error;"
            " cancelled, cut short by a stop, a step-down or a reload that removed the app,"
            " or a follower's whose held requests all left before it woke a machine)."
            " autoscaler_wake_duration_seconds times the ok ones that resumed or started one or"
            " took a drain back."
            " In cluster mode a wake counts on the replica whose proxy held the requests only"
            " (a follower's: not on the leader that woke the machine for it, which times it),"
            " so a sum over replicas counts each once; two replicas' requests held for one"
            " machine are two wakes.",
            ["app", "result"],
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
        self.lease_conflicts = Counter(
            "autoscaler_lease_conflicts",
            "Actions skipped because another holder (a fly deploy, another tool) had the "
            "machine's lease.",
            ["app"],
            registry=r,
        )
        self.prewarms = Counter(
            "autoscaler_prewarms",
            "Pre-warms of the adaptive keep-alive, judged: a request came (hit) or none (miss).",
            ["app", "result"],
            registry=r,
        )
        self.machine_seconds = Counter(
            "autoscaler_machine_seconds",
            "Machine-seconds by state: started ones are what Fly bills CPU and RAM for; "
            "suspended ones cost storage only (Fly bills no CPU or RAM while suspended; "
            "stopped machines, also storage only, are not counted). Counted from when each "
            "machine changed state: exactly for our own actions, halfway between two lists "
            "for a change only a list shows (someone else's start, a crash).",
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
        self.control_max_tick_age = Gauge(
            "autoscaler_control_max_tick_age_seconds",
            "How long the control loop may go without a tick before it counts as stalled "
            "(/readyz?control=1; the stalled-loop alert): a sleeping app is polled every "
            "control.idle_poll_s, its first poll up to twice that.",
            registry=r,
        )
        self.machine_restarts = Counter(
            "autoscaler_machine_restarts",
            "Starts of failed machines, and restarts of machines that hang (result: ok, "
            "failed; exhausted: its restart budget is spent and it is left alone).",
            ["app", "result"],
            registry=r,
        )
        self.check_rechecks = Counter(
            "autoscaler_check_rechecks",
            "Started machines whose Fly checks were critical in their first round, run again "
            "by us (result: passed, they count as passing until Fly runs them again; failed, "
            "not by the end of that round). Passes say a check's grace_period is shorter "
            "than the app's start-up.",
            ["app", "result"],
            registry=r,
        )
        self.control_healthy = Gauge(
            "autoscaler_control_healthy",
            "1 while the control loop ticks and the Machines API answers (and takes the "
            "token); 0 when its decisions are stale (the data path keeps routing either way).",
            registry=r,
        )
        self.cluster_leader = Gauge(
            "autoscaler_cluster_leader",
            "1 while this process decides (the cluster's leader, or a single process); 0 on "
            "a follower.",
            registry=r,
        )
        self.cluster_replicas = Gauge(
            "autoscaler_cluster_replicas",
            "Replicas whose load report is live in Redis, this one included (1 when single).",
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
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result=result)

    def set_replica(self, replica: str | None) -> None:
        """Cluster mode: label the exported series with this replica's id (None: not)."""
        self._labelled.replica = replica

    def forget_decisions(self) -> None:
        """A replica that stops deciding drops the gauges only the decider keeps up to date
        (machines by state, desired machines, panic mode), so that summing over replicas
        counts the leader's alone."""
        for gauge in (self.machines, self.desired_machines, self.panic_mode):
            gauge.clear()

    def forget_app_decisions(self, app: str, states: Iterable[str]) -> None:
        """An app no longer scaled (removed by a reload, or made static): its decider
        gauges go, or their last values would count as the app's for good (machines by
        state, desired, panic: dashboards sum them, an alert fires on moving states)."""
        for state in states:
            with contextlib.suppress(KeyError):
                self.machines.remove(app, state)
        for gauge in (self.desired_machines, self.panic_mode):
            with contextlib.suppress(KeyError):
                gauge.remove(app)

    def forget_app(self, app: str) -> None:
        """An app removed by a reload: its held-requests gauge goes, and every series
        ``declare_app`` exported at 0 that never counted (rejections, ejections, actions,
        wakes... and the proxy's errors and requests): zeros of an app that no longer
        exists stayed on /metrics and dashboards for good. Its counts stay (a total is a
        total); the app added again declares them anew."""
        with contextlib.suppress(KeyError):
            self.queued.remove(app)
        self._forget_uncounted(self._app_series(app))
        self.proxy.forget_errors(app)
        self._forget_scaled(app)

    def declare_app(self, app: str, *, scaled: bool = True) -> None:
        """Export the app's series whose label values are known in advance, at 0.

        Called for every app at start-up and on every reload; idempotent (a child that
        exists keeps its value). A static app (fixed backends) is never scaled or woken,
        so it gets only the proxy's series; an app a reload makes static loses the others
        that never counted (its wakes, actions...: zeros of what can no longer happen).
        """
        self.queued.labels(app=app)
        for counter, labels in self._app_series(app):
            counter.labels(*labels)
        self.proxy.declare_errors(app)
        if not scaled:
            self._forget_scaled(app)
            return
        for metric, labels in self._scaled_series(app):
            metric.labels(*labels)
        self.proxy.declare_wakes(app)

    def _app_series(self, app: str) -> Iterator[tuple[Counter, tuple[str, ...]]]:
        """The counters ``declare_app`` exports at 0 for every app, static or scaled."""
        for reason in QUEUE_REJECTION_REASONS:
            yield self.queue_rejections, (app, reason)
        for reason in EJECTION_REASONS:
            yield self.machine_ejections, (app, reason)

    def _scaled_series(self, app: str) -> Iterator[tuple[Counter | Histogram, tuple[str, ...]]]:
        """The series ``declare_app`` exports at 0 for an app that is scaled, not static."""
        for action in SCALING_ACTIONS:
            for result in ACTION_RESULTS:
                yield self.scaling_actions, (app, action, result)
        for kind in WOKEN_KINDS:
            yield self.wake_duration, (app, kind)
        for result in WAKE_RESULTS:
            yield self.wakes, (app, result)
        for state in BILLED_STATES:
            yield self.machine_seconds, (app, state)
        for result in RESTART_RESULTS:
            yield self.machine_restarts, (app, result)
        yield self.lease_conflicts, (app,)
        for result in PREWARM_RESULTS:
            yield self.prewarms, (app, result)
        for result in RECHECK_RESULTS:
            yield self.check_rechecks, (app, result)

    def _forget_scaled(self, app: str) -> None:
        """Drop the app's scaled-only series that never counted (a reload made it static,
        or removed it)."""
        self._forget_uncounted(self._scaled_series(app))
        self.proxy.forget_wakes(app)

    @staticmethod
    def _forget_uncounted(series: Iterable[tuple[Counter | Histogram, tuple[str, ...]]]) -> None:
        """Remove those of ``series`` that never counted; keep those that did."""
        counted: dict[Counter | Histogram, set[tuple[str, ...]]] = {}
        for metric, labels in series:
            if metric not in counted:
                counted[metric] = _counted(metric)
            if labels not in counted[metric]:
                with contextlib.suppress(KeyError):
                    metric.remove(*labels)

    def observe_api(self, operation: str, status: int | None, duration_s: float) -> None:
        """The Fly client's observer callback: (operation, status or None, duration)."""
        code = str(status) if status is not None else "error"
        self.api_requests.labels(operation=operation, code=code).inc()
        self.api_request_duration.labels(operation=operation).observe(duration_s)


def _counted(metric: Counter | Histogram) -> set[tuple[str, ...]]:
    """The label values of the metric's series that counted something (a counter above 0,
    a histogram with an observation)."""
    return {
        tuple(sample.labels.values())
        for family in metric.collect()
        for sample in family.samples
        if sample.value and sample.name.endswith(("_total", "_count"))
    }


class ReplicaLabel(Collector):
    """A registry's metrics, read when scraped, with ``replica`` added to every sample of
    every family not in :data:`CLUSTER_WIDE` while :attr:`replica` is set."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source
        self.replica: str | None = None

    def collect(self) -> Iterator[Metric]:
        replica = self.replica
        for family in self.source.collect():
            if replica is not None and family.name not in CLUSTER_WIDE:
                family.samples = [
                    s._replace(labels={**s.labels, "replica": replica}) for s in family.samples
                ]
            yield family


# The "le" labels, written as prometheus_client writes them.
_REQUEST_LE = (*map(floatToGoString, REQUEST_BUCKETS), "+Inf")


@dataclass(slots=True)
class _Durations:
    buckets: list[int]  # per bucket, not cumulative (the last one is +Inf)
    sum: float = 0.0


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """What README's metrics table says of a metric."""

    name: str  # as exported (counters with _total)
    kind: str
    labels: tuple[str, ...]
    help: str


class RequestMetrics(Collector):
    """The proxy's per-request metrics, kept in plain numbers and read out when scraped.

    prometheus_client's metric objects take a lock per update, and a request made five
    (in flight up and down, the counter, the histogram's bucket and sum): about 5% of the
    proxy's CPU. Here a request costs two dict updates, and requests in flight are not
    counted again: they are read from the proxy's fleet view when scraped. The proxy
    updates these from the event loop's thread only; ``collect`` reads copies, so a
    scrape from any thread sees consistent numbers.
    """

    SPECS: ClassVar[tuple[MetricSpec, ...]] = (
        MetricSpec(
            "autoscaler_requests_total",
            "counter",
            ("app", "code", "wake"),
            "Requests answered by the proxy, by status code and how the machine was woken.",
        ),
        MetricSpec(
            "autoscaler_request_duration_seconds",
            "histogram",
            ("app",),
            "Time from a request's arrival to the end of its response headers.",
        ),
        MetricSpec(
            "autoscaler_inflight_requests",
            "gauge",
            ("app",),
            "Requests being served by a machine right now.",
        ),
        MetricSpec(
            "autoscaler_proxy_errors_total",
            "counter",
            ("app", "reason"),
            "5xx answers the proxy wrote itself, not the app's (also in"
            " autoscaler_requests_total, so the app's own 5xx are those minus these), by"
            " cause (reason: queue_full, wake_timeout: held requests turned away, counted in"
            " autoscaler_queue_rejections_total too; app_not_found: the Machines API has no"
            " such app; unreachable: no machine took the connection; machine_error: the"
            " machine cut it or did not answer HTTP; machine_timeout: no answer within"
            " upstream_timeout_s; drained: its machine's drain ran out first; stopping;"
            " app_removed: by a reload; unsupported: 501, 505; internal: a bug, 500).",
        ),
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._counts: dict[tuple[str, int, str], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._durations: dict[str, _Durations] = {}
        self._errors[(PRE_ROUTING, "internal")] = 0  # never forgotten: always the proxy's
        self._declare_counts(PRE_ROUTING, (BUG_ANSWER,))
        # (app, requests in flight) pairs, read when scraped: the proxy points this at its
        # fleet view, which counts them already.
        self.in_flight: Callable[[], Iterable[tuple[str, int]]] = tuple
        if registry is not None:
            registry.register(self)

    def answered(
        self,
        app: str,
        code: int,
        wake: str,
        seconds: float | None = None,
        error: ProxyErrorReason | None = None,
    ) -> None:
        """One request answered (``seconds`` until its response head, when it got one
        from the proxy's side: every request but those refused before routing; ``error``,
        why, when the proxy wrote a 5xx itself). The one place both are counted: a proxy
        error is always one of the requests, with the same app."""
        key = (app, code, wake)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        if error is not None:
            errors = self._errors
            cause = (app, error)
            errors[cause] = errors.get(cause, 0) + 1
        if seconds is None:
            return
        durations = self._durations.get(app)
        if durations is None:
            durations = self._durations[app] = _Durations([0] * (len(REQUEST_BUCKETS) + 1))
        durations.buckets[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        durations.sum += seconds

    def declare_wakes(self, app: str) -> None:
        """Export at 0 the app's requests answered with a proxy error's code after a wake
        (``WOKEN_ANSWERS``: each wake kind, and failed, ``WAKE_FAILED_CODES`` says why); a
        series that counted already keeps its count."""
        self._declare_counts(app, WOKEN_ANSWERS)

    def forget_wakes(self, app: str) -> None:
        """Drop what ``declare_wakes`` exported, if it never counted: a removed app's
        zeros would stay on /metrics for good."""
        self._forget_counts(app, WOKEN_ANSWERS)

    def declare_errors(self, app: str) -> None:
        """Export the app's proxy errors at 0, every reason, and its requests answered with
        their codes without a wake (``PROXY_ERROR_ANSWERS``): a dashboard shows 0, the
        app's own 5xx (requests' minus these) exist for an app with none, and its first
        proxy error is an increase of both."""
        for reason in PROXY_ERROR_REASONS:
            self._errors.setdefault((app, reason), 0)
        self._declare_counts(app, PROXY_ERROR_ANSWERS)

    def forget_errors(self, app: str) -> None:
        """Drop what ``declare_errors`` exported, if it never counted."""
        for reason in PROXY_ERROR_REASONS:
            key = (app, reason)
            if self._errors.get(key) == 0:
                del self._errors[key]
        self._forget_counts(app, PROXY_ERROR_ANSWERS)

    def _declare_counts(self, app: str, answers: Iterable[tuple[int, str]]) -> None:
        for code, wake in answers:
            self._counts.setdefault((app, code, wake), 0)

    def _forget_counts(self, app: str, answers: Iterable[tuple[int, str]]) -> None:
        for code, wake in answers:
            key = (app, code, wake)
            if self._counts.get(key) == 0:
                del self._counts[key]

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration, inflight, errors = self._families()
        for (app, code, wake), count in list(self._counts.items()):
            requests.add_metric([app, str(code), wake], count)
        for app, durations in list(self._durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(_REQUEST_LE, list(durations.buckets), strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([app], buckets, durations.sum)
        for app, count in list(self.in_flight()):
            inflight.add_metric([app], count)
        for (app, reason), count in list(self._errors.items()):
            errors.add_metric([app, reason], count)
        yield requests
        yield duration
        yield inflight
        yield errors

    def _families(
        self,
    ) -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        requests, duration, inflight, errors = self.SPECS
        return (
            CounterMetricFamily(requests.name, requests.help, labels=requests.labels),
            HistogramMetricFamily(duration.name, duration.help, labels=duration.labels),
            GaugeMetricFamily(inflight.name, inflight.help, labels=inflight.labels),
            CounterMetricFamily(errors.name, errors.help, labels=errors.labels),
        )

"""The live terminal view: one panel per app, a row per machine, traffic as sparklines.

``autoscaler demo`` and ``autoscaler status --watch`` draw the same view. Its input is plain
data, the admin server's ``/status`` document and the samples of ``/metrics`` (the demo
reads both in-process, ``status`` fetches them), so this module imports nothing of the
domain: it turns numbers into rich renderables and plain lines.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40  # sparkline points (one a second)
WAKE_KINDS = ("start", "resume", "uncordon")
ANSWER_CLASSES = ("2xx", "3xx", "4xx", "5xx")
STATE_STYLES = {
    "started": "bold green",
    "suspended": "cyan",
    "stopped": "dim",
    "failed": "bold red",
    "destroyed": "dim",
}
MOVING_STYLE = "bold yellow"  # starting, suspending, stopping...


class MetricSample(Protocol):
    """One sample of a metric family, as prometheus_client's ``Sample`` has it."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def value(self) -> float: ...


class MetricFamily(Protocol):
    @property
    def samples(self) -> Sequence[MetricSample]: ...


def sparkline(values: Sequence[float], width: int = HISTORY) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    shown = list(values)[-width:]
    top = max(shown, default=0.0)
    if top <= 0:
        return SPARK[0] * len(shown)
    last = len(SPARK) - 1
    # Nothing is the lowest block; anything more is at least the second.
    return "".join(
        SPARK[min(last, max(1, round(v / top * last)))] if v > 0 else SPARK[0] for v in shown
    )


@dataclass(slots=True)
class Traffic:
    """One app's cumulative figures at one moment, from the metric samples."""

    requests: float = 0.0
    answers: dict[str, float] = field(default_factory=dict)
    latency_sum: float = 0.0
    latency_count: float = 0.0
    queued: float = 0.0
    in_flight: float = 0.0
    wakes: dict[str, float] = field(default_factory=dict)
    wake_seconds: dict[str, float] = field(default_factory=dict)


def traffic_by_app(families: Iterable[MetricFamily]) -> dict[str, Traffic]:
    """Per app, what the view needs of ``/metrics`` (families from a registry's
    ``collect()`` or from parsing the text format: both carry the same samples)."""
    apps: dict[str, Traffic] = {}
    for family in families:
        for s in family.samples:
            app = s.labels.get("app")
            if app is None:
                continue
            t = apps.setdefault(app, Traffic())
            if s.name == "autoscaler_requests_total":
                t.requests += s.value
                code = s.labels.get("code", "")
                key = f"{code[:1]}xx" if code[:1].isdigit() else code
                t.answers[key] = t.answers.get(key, 0.0) + s.value
            elif s.name == "autoscaler_request_duration_seconds_sum":
                t.latency_sum += s.value
            elif s.name == "autoscaler_request_duration_seconds_count":
                t.latency_count += s.value
            elif s.name == "autoscaler_queued_requests":
                t.queued += s.value
            elif s.name == "autoscaler_inflight_requests":
                t.in_flight += s.value
            elif s.name == "autoscaler_wake_duration_seconds_count":
                kind = s.labels.get("kind", "")
                t.wakes[kind] = t.wakes.get(kind, 0.0) + s.value
            elif s.name == "autoscaler_wake_duration_seconds_sum":
                kind = s.labels.get("kind", "")
                t.wake_seconds[kind] = t.wake_seconds.get(kind, 0.0) + s.value
    return apps


@dataclass(slots=True)
class History:
    """Per app, the figures of the last ``HISTORY`` samples, for rates and sparklines."""

    points: dict[str, deque[tuple[float, Traffic]]] = field(default_factory=dict)

    def add(self, now: float, traffic: Mapping[str, Traffic]) -> None:
        for app, figures in traffic.items():
            self.points.setdefault(app, deque(maxlen=HISTORY + 1)).append((now, figures))

    def latest(self, app: str) -> Traffic:
        points = self.points.get(app)
        return points[-1][1] if points else Traffic()

    def rates(self, app: str) -> list[float]:
        """Requests per second between successive samples."""
        pairs = self._pairs(app)
        return [max(0.0, (b.requests - a.requests) / (tb - ta)) for ta, a, tb, b in pairs]

    def latencies_ms(self, app: str) -> list[float]:
        """Mean latency (to the response head) between successive samples; 0 without any."""
        out = []
        for _, a, _, b in self._pairs(app):
            count = b.latency_count - a.latency_count
            out.append((b.latency_sum - a.latency_sum) / count * 1000 if count > 0 else 0.0)
        return out

    def _pairs(self, app: str) -> list[tuple[float, Traffic, float, Traffic]]:
        points = list(self.points.get(app, ()))
        return [(ta, a, tb, b) for (ta, a), (tb, b) in itertools.pairwise(points) if tb > ta]


def machine_note(m: Mapping[str, Any]) -> str:
    """What ``/status`` says of a machine's failed starts, its hanging or its host, in a
    few words."""
    if m.get("hung"):
        return _hung_note(m)
    if m.get("host_unreachable"):
        return "host unreachable: actions wait for it"
    sick_for = m.get("checks_critical_for_s")
    if sick_for is not None:
        return f"Fly checks critical for {float(sick_for):.0f}s"
    if rechecked := m.get("checks_passed_on_recheck"):
        return f"Fly: {', '.join(rechecked)} critical; our run since: passing"
    if unrouted := m.get("checks_critical_unrouted"):
        return f"Fly: {', '.join(unrouted)} critical (a monitoring check: still routed)"
    failures = int(m.get("failures") or 0)
    if m.get("left_alone"):
        return f"left alone after {failures} failed starts"
    retry = m.get("next_retry_in_s")
    if retry is None:
        return ""
    tried = f"{failures} failed start(s), " if failures else ""
    # The policy starts a failed machine again only when the app needs one (rule 2).
    if float(retry) > 0:
        return f"{tried}no restart for {float(retry):.0f}s"
    return f"{tried}restarted when needed"


def _hung_note(m: Mapping[str, Any]) -> str:
    hung = f"hung ({int(m.get('failing') or 0)} ejections in a row)"
    if m.get("host_unreachable"):
        return f"{hung}, restarted once its host is reachable"
    if m.get("left_alone"):
        return f"{hung}, restarts are off"
    restarts = int(m.get("hung_restarts") or 0)
    tried = f", {restarts} restart(s) in a row" if restarts else ""
    retry = m.get("next_retry_in_s")
    if retry is not None and float(retry) > 0:
        return f"{hung}{tried}, no restart for {float(retry):.0f}s"
    return f"{hung}{tried}, restarted at the next tick"


def ago(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    if age_s < 60:
        return f"{age_s:.1f}s ago"
    minutes, seconds = divmod(int(age_s), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s ago"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m ago"


def wakes_text(traffic: Traffic) -> str:
    """``start 3 (mean 0.91 s), resume 1 (mean 0.07 s), uncordon 0``: wakes timed by the
    controller (uncordon: a drain taken back)."""
    parts = []
    for kind in WAKE_KINDS:
        count = traffic.wakes.get(kind, 0.0)
        if count:
            mean = traffic.wake_seconds.get(kind, 0.0) / count
            parts.append(f"{kind} {count:.0f} (mean {mean:.2f} s)")
        else:
            parts.append(f"{kind} 0")
    return ", ".join(parts)


def answers_text(traffic: Traffic) -> str:
    extra = sorted(set(traffic.answers) - set(ANSWER_CLASSES))
    return "  ".join(
        f"{key} {traffic.answers.get(key, 0.0):.0f}" for key in (*ANSWER_CLASSES, *extra)
    )


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, MOVING_STYLE))


def app_panel(app: Mapping[str, Any], history: History) -> Panel:
    """One app: traffic sparklines, held requests, wakes, the policy's reason, machines.
    A static app (``/status``'s ``static_apps``) has no wakes nor reason: its backends."""
    name = str(app.get("app", "?"))
    static = bool(app.get("static"))
    traffic = history.latest(name)
    rates, latencies = history.rates(name), history.latencies_ms(name)
    lines: list[RenderableType] = []
    line = Text("req/s    ")
    line.append(sparkline(rates), style="green")
    line.append(f"  {rates[-1] if rates else 0.0:.0f}/s")
    lines.append(line)
    line = Text("latency  ")
    line.append(sparkline(latencies), style="magenta")
    line.append(f"  {latencies[-1] if latencies else 0.0:.0f} ms mean")
    lines.append(line)
    held = Text(f"held {traffic.queued:.0f}", style="bold yellow" if traffic.queued else "")
    lines.append(
        Text.assemble(
            held, f"   in flight {traffic.in_flight:.0f}   answers  {answers_text(traffic)}"
        )
    )
    machines = app.get("machines") or []
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    if static:
        lines.append(Text.assemble(("static   ", "bold"), "routed to its backends, not scaled"))
        for column in ("BACKEND", "STATE", "IN FLIGHT", "LAST USED"):
            table.add_column(column)
        for m in machines:
            table.add_row(
                str(m.get("id")),
                _state(str(m.get("state"))),
                str(m.get("in_flight", 0)),
                ago(m.get("last_used_age_s")),
            )
    else:
        lines.append(Text(f"wakes    {wakes_text(traffic)}"))
        reason = app.get("last_reason") or "(no decision yet)"
        lines.append(Text.assemble(("why      ", "bold"), str(reason)))
        if app.get("last_error"):
            lines.append(Text(f"last error: {app['last_error']}", style="red"))
        for column in ("MACHINE", "STATE", "CORDONED", "IN FLIGHT", "LAST USED", "NOTE"):
            table.add_column(column)
        for m in machines:
            table.add_row(
                str(m.get("id")),
                _state(str(m.get("state"))),
                "yes" if m.get("cordoned") else "no",
                str(m.get("in_flight", 0)),
                ago(m.get("last_used_age_s")),
                machine_note(m),
            )
    lines.append(table)
    # Text, not markup: a name with brackets ("web[/x]") was read as tags (or failed to be).
    if static:
        title = Text.assemble((name, "bold"), f"  static, {len(machines)} backend(s)")
    else:
        title = Text.assemble(
            (name, "bold"),
            f"  desired {app.get('desired', '?')}, started {app.get('started', '?')}"
            f", panic {'yes' if app.get('panic') else 'no'}"
            f", decided {ago(app.get('last_decision_age_s'))}",
        )
    return Panel(Group(*lines), title=title, title_align="left")


def control_lines(doc: Mapping[str, Any]) -> list[str]:
    """Why the decisions are stale (``/readyz?control=1``'s problems): "ready" is the data
    path's word, and said nothing while the Machines API was out of reach."""
    if doc.get("control_healthy", True):
        return []
    problems = doc.get("control_problems") or ["see /readyz?control=1"]
    return [f"control NOT HEALTHY (decisions are stale): {p}" for p in problems]


def view(
    doc: Mapping[str, Any] | None,
    history: History,
    header: Sequence[RenderableType] = (),
    footer: Sequence[RenderableType] = (),
) -> Group:
    """The whole screen: ``header`` lines, one panel per app of ``doc``, ``footer``."""
    parts: list[RenderableType] = list(header)
    if doc is None:
        parts.append(Text("waiting for the first status...", style="dim"))
    else:
        ready = "ready" if doc.get("ready") else "NOT READY"
        parts.append(Text(f"autoscaler {doc.get('version', '?')}: {ready}", style="bold"))
        parts.extend(Text(line, style="red") for line in control_lines(doc))
        apps = doc.get("apps") or []
        if not apps:
            parts.append(Text("no scaled apps"))
        parts.extend(app_panel(app, history) for app in apps)
        parts.extend(app_panel(app, history) for app in doc.get("static_apps") or [])
    parts.extend(footer)
    return Group(*parts)

"""The simulator's figures as a table, JSON or CSV.

One row per (app, strategy) and per strategy in total, strategies side by side under each
app. Waits are over every request served (most wait 0, so p50 is usually 0 and p99 shows
the wakes); machine-seconds count each machine from the start or resume call until it is
stopped, suspended or failed ("started"), and while it rests suspended ("suspended").
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from autoscaler.sim.model import Stats
from autoscaler.sim.run import Report, summary

COLUMNS = (
    ("requests", "requests", "{:d}"),
    ("woken", "woken", "{:d}"),
    ("woken_pct", "woken %", "{:.2f}"),
    ("wait_p50_s", "wait p50 s", "{:.3f}"),
    ("wait_p99_s", "wait p99 s", "{:.3f}"),
    ("wait_max_s", "wait max s", "{:.3f}"),
    ("machine_s_started", "started m·s", "{:.0f}"),
    ("machine_s_suspended", "suspended m·s", "{:.0f}"),
    ("peak_machines", "peak", "{:d}"),
    ("api_actions", "API actions", "{:d}"),
    ("errors", "errors", "{:d}"),
    ("cold_resumes", "cold resumes", "{:d}"),
    ("failed_actions", "failed calls", "{:d}"),
    ("failed_boots", "failed boots", "{:d}"),
)


def _rows(report: Report, per_app: bool) -> list[tuple[str, str, dict[str, Any]]]:
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if per_app:
        for app in report.apps:
            for name in report.strategies:
                rows.append((app, name, summary(report.stats[name][app])))
    for name in report.strategies:
        rows.append(("TOTAL", name, summary(report.total(name))))
    return rows


def as_table(report: Report, per_app: bool = True) -> str:
    head = ["app", "strategy", *(label for _, label, _ in COLUMNS)]
    rows = _rows(report, per_app)
    body: list[list[str]] = []
    last_app = None
    for app, name, fig in rows:
        first = app != last_app
        last_app = app
        body.append(
            [app if first else "", name, *(fmt.format(fig[key]) for key, _, fmt in COLUMNS)]
        )
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    last_app = None
    for cells, (app, _, _) in zip(body, rows, strict=True):
        if last_app is not None and app != last_app:
            out.append("")
        last_app = app
        out.append(line(cells))
    hours = report.horizon / 3600
    t = report.timings
    out.append("")
    out.append(
        f"replayed {hours:.2f} h{since(report.origin)}; "
        f"tick {t.tick_s:g}s, API latency {t.api_latency_s:g}s, "
        f"resume {t.resume_s:g}s, cold start {t.start_s:g}s, suspend {t.suspend_s:g}s, "
        f"stop {t.stop_s:g}s"
    )
    out.append(
        "woken: arrived with no machine routable and waited for one; waits: over all "
        "requests served; m·s: machine-seconds"
    )
    return "\n".join(out) + "\n"


def since(origin: float) -> str:
    """Where a replay began, for its footer: nothing for a trace of seconds from its start,
    the first request's Unix time for a trace of Unix times (``Trace.origin``)."""
    if not origin:
        return ""
    at = datetime.fromtimestamp(origin, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    unix = f"{origin:.6f}".rstrip("0").rstrip(".")
    return f" from the first request (Unix time {unix}, {at})"


def as_json(report: Report, per_app: bool = True) -> str:
    doc: dict[str, Any] = {
        "horizon_s": report.horizon,
        "origin_unix_s": report.origin or None,
        "timings": {k: getattr(report.timings, k) for k in report.timings.__dataclass_fields__},
        "strategies": report.strategies,
        "total": {name: summary(report.total(name)) for name in report.strategies},
    }
    if per_app:
        doc["apps"] = {
            app: {name: summary(report.stats[name][app]) for name in report.strategies}
            for app in report.apps
        }
    return json.dumps(doc, indent=2) + "\n"


def as_csv(report: Report, per_app: bool = True) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["app", "strategy", *(key for key, _, _ in COLUMNS)])
    for app, name, fig in _rows(report, per_app):
        out.writerow([app, name, *(fig[key] for key, _, _ in COLUMNS)])
    return buf.getvalue()


def render(report: Report, fmt: str, per_app: bool = True) -> str:
    if fmt == "json":
        return as_json(report, per_app)
    if fmt == "csv":
        return as_csv(report, per_app)
    return as_table(report, per_app)


__all__ = ["Stats", "as_csv", "as_json", "as_table", "render"]

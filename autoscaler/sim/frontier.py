"""`autoscaler simulate --frontier`: each strategy's cost against its waits, swept.

Every strategy has one main knob that trades machine-seconds for requests that wait for a
wake (a longer keep-alive costs more and wakes less). The frontier replays the trace once
per knob value and strategy, and reports, per strategy, the points it reaches and its
machine-seconds at the number of waits that ``fly-autostop`` makes (with its check every
180 s and every 300 s: Fly says only "every few minutes"), interpolated along the
strategy's lower envelope (the points no other point of it beats on both counts).

``--plot FILE`` draws the curves (and, for a trace of one app, the machines up over time
under each strategy at its default knob) with matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from autoscaler.config import AppConfig
from autoscaler.sim.model import Stats, Timings
from autoscaler.sim.report import since
from autoscaler.sim.run import fork_map, simulate
from autoscaler.sim.trace import Trace

_ADAPTIVE_COSTS = (
    10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 450.0, 600.0, 900.0, 1200.0,
    1800.0, 3600.0,
)  # fmt: skip
SWEEPS: dict[str, tuple[str, tuple[float, ...], float]] = {
    # strategy: (knob, values swept, default value)
    "autoscaler": ("idle_to_zero_s", (15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0), 300.0),
    "adaptive": (
        "wake_cost_s",
        # Denser than the timers' sweeps: a plan changes shape (keep through think times,
        # keep through the gaps between visits) between two values, and the envelope
        # between two far-apart points is a chord above the curve.
        _ADAPTIVE_COSTS,
        300.0,
    ),
    "knative": ("grace_s", (0.0, 30.0, 120.0, 300.0, 600.0), 30.0),
    "fly-autostop": ("interval_s", (60.0, 120.0, 180.0, 300.0, 600.0), 300.0),
    "fixed-keepalive": ("keepalive_s", (60.0, 120.0, 300.0, 600.0, 1200.0), 600.0),
}
BASELINE = "fly-autostop"
BASELINE_INTERVALS = (180.0, 300.0)


@dataclass(frozen=True, slots=True)
class Point:
    strategy: str
    knob: str
    value: float
    woken: int
    machine_s: float
    requests: int

    @property
    def label(self) -> str:
        return f"{self.knob}={self.value:g}"


def _run_spec(strategy: str, value: float) -> tuple[str, dict[str, Any]]:
    """The strategy name and the knob overrides of one point."""
    knob = SWEEPS[strategy][0]
    if strategy in ("autoscaler", "adaptive"):
        return strategy, {knob: value}
    return f"{strategy}-{value:g}s", {}


_Job: TypeAlias = tuple[Trace, Callable[[str], AppConfig], Timings, float | None, bool]
"""(trace, config_for, timings, horizon, skip_idle): what every point shares."""


def _run(job: _Job, task: tuple[str, float]) -> tuple[Point, dict[str, Stats]]:
    """One point: the trace replayed under one strategy at one knob value."""
    trace, config_for, timings, horizon, skip_idle = job
    strategy, value = task
    name, overrides = _run_spec(strategy, value)
    report = simulate(
        trace,
        config_for,
        timings,
        [name],
        horizon=horizon,
        skip_idle=skip_idle,
        overrides=overrides,
    )
    label = report.strategies[0]
    total = report.total(label)
    point = Point(
        strategy, SWEEPS[strategy][0], value, total.wake_waits, total.up_s, total.requests
    )
    return point, report.stats[label]


@dataclass(slots=True)
class Frontier:
    points: list[Point]
    per_app: dict[tuple[str, float], dict[str, Stats]]
    """(strategy, value) -> app -> Stats, for the plot of one app."""
    horizon: float
    origin: float = 0.0
    """The trace's :attr:`~autoscaler.sim.trace.Trace.origin` (a trace of Unix times)."""

    def curve(self, strategy: str) -> list[Point]:
        return sorted((p for p in self.points if p.strategy == strategy), key=lambda p: p.woken)

    def envelope(self, strategy: str) -> list[Point]:
        """The points of ``strategy`` that none of its others beats on both counts, by
        waits ascending (so machine-seconds descending)."""
        out: list[Point] = []
        for p in sorted(self.curve(strategy), key=lambda p: (p.woken, p.machine_s)):
            if not out or p.machine_s < out[-1].machine_s:
                out.append(p)
        return out

    def at_waits(self, strategy: str, woken: float) -> float | None:
        """Machine-seconds of ``strategy`` at ``woken`` waits, interpolated along its
        envelope; None when no point of it wakes that few."""
        env = self.envelope(strategy)
        if not env or woken < env[0].woken:
            return None
        for a, b in itertools.pairwise(env):
            if a.woken <= woken <= b.woken:
                if b.woken == a.woken:
                    return min(a.machine_s, b.machine_s)
                share = (woken - a.woken) / (b.woken - a.woken)
                return a.machine_s + share * (b.machine_s - a.machine_s)
        return env[-1].machine_s  # more waits than its cheapest point: that point's cost

    def baselines(self) -> list[Point]:
        return [p for p in self.points if p.strategy == BASELINE and p.value in BASELINE_INTERVALS]


def sweep(
    trace: Trace,
    config_for: Callable[[str], AppConfig],
    timings: Timings,
    strategies: Sequence[str],
    *,
    horizon: float | None = None,
    skip_idle: bool = True,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Frontier:
    """Replay ``trace`` at every swept knob value of each strategy, for ``horizon``
    seconds (the trace's end by default); ``skip_idle`` as in ``simulate``."""
    tasks: list[tuple[str, float]] = []
    for name in strategies:
        if name not in SWEEPS:
            raise ValueError(
                f"--frontier: no knob to sweep for {name!r} (expected some of {', '.join(SWEEPS)})"
            )
        tasks.extend((name, v) for v in SWEEPS[name][1])
    if BASELINE not in strategies:
        tasks.extend((BASELINE, v) for v in BASELINE_INTERVALS)
    job: _Job = (trace, config_for, timings, horizon, skip_idle)
    if jobs > 1:
        results = fork_map(_run, job, tasks, jobs)
    else:
        results = []
        for task in tasks:
            if progress is not None:
                progress(f"{task[0]} {SWEEPS[task[0]][0]}={task[1]:g}")
            results.append(_run(job, task))
    frontier = Frontier([], {}, trace.end if horizon is None else horizon, trace.origin)
    for point, stats in results:
        frontier.points.append(point)
        frontier.per_app[(point.strategy, point.value)] = stats
    return frontier


def comparisons(frontier: Frontier) -> list[dict[str, Any]]:
    """Per baseline point: each strategy's machine-seconds at its waits, and the ratio."""
    out: list[dict[str, Any]] = []
    names = list(dict.fromkeys(p.strategy for p in frontier.points))
    for base in frontier.baselines():
        row: dict[str, Any] = {
            "baseline": f"{BASELINE}-{base.value:g}s",
            "woken": base.woken,
            "machine_s": round(base.machine_s, 1),
            "strategies": {},
        }
        for name in names:
            got = frontier.at_waits(name, base.woken)
            row["strategies"][name] = {
                "machine_s": None if got is None else round(got, 1),
                "ratio": None
                if got is None or base.machine_s <= 0
                else round(got / base.machine_s, 3),
            }
        out.append(row)
    return out


def render(frontier: Frontier, fmt: str) -> str:
    if fmt == "json":
        doc = {
            "horizon_s": frontier.horizon,
            "origin_unix_s": frontier.origin or None,
            "points": [
                {
                    "strategy": p.strategy,
                    "knob": p.knob,
                    "value": p.value,
                    "woken": p.woken,
                    "machine_s_started": round(p.machine_s, 1),
                    "requests": p.requests,
                }
                for p in frontier.points
            ],
            "at_baseline_waits": comparisons(frontier),
        }
        return json.dumps(doc, indent=2) + "\n"
    lines = ["strategy          knob                    woken   started m·s", "-" * 61]
    names = list(dict.fromkeys(p.strategy for p in frontier.points))
    for name in names:
        for p in frontier.curve(name):
            lines.append(f"{name:<17} {p.label:<22} {p.woken:>6} {p.machine_s:>13.0f}")
        lines.append("")
    for row in comparisons(frontier):
        lines.append(
            f"at {row['baseline']}'s waits ({row['woken']} woken, {row['machine_s']:.0f} m·s):"
        )
        for name, got in row["strategies"].items():
            if got["machine_s"] is None:
                lines.append(f"  {name:<17} no setting wakes that few")
            else:
                lines.append(f"  {name:<17} {got['machine_s']:>13.0f} m·s  {got['ratio']:.3f}x")
    hours = frontier.horizon / 3600
    lines.append("")
    lines.append(
        f"replayed {hours:.2f} h{since(frontier.origin)} per point; "
        "woken: requests that waited for a wake; "
        "machine-seconds interpolated along each strategy's lower envelope"
    )
    return "\n".join(lines) + "\n"


def plot(frontier: Frontier, path: str) -> None:
    """Draw the frontier (and, for one app, its machines over time) to PNG or SVG."""
    if not (path.endswith(".png") or path.endswith(".svg")):
        raise ValueError(f"--plot: expected a .png or .svg file name, got {path!r}")
    try:
        import matplotlib  # optional: only --plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'autoscaler[plot]'") from None
    names = list(dict.fromkeys(p.strategy for p in frontier.points))
    apps = {app for stats in frontier.per_app.values() for app in stats}
    app = next(iter(apps)) if len(apps) == 1 else None
    rows = [
        name for name in names if app is not None and app in frontier.per_app.get(
            (name, SWEEPS[name][2]), {}
        )
    ]  # fmt: skip
    # The frontier on top; for one app, a row per strategy of its machines over time.
    fig, axes = plt.subplots(
        1 + len(rows),
        1,
        figsize=(8, 5 + 1.1 * len(rows)),
        gridspec_kw={"height_ratios": [4.0] + [1.0] * len(rows)},
        squeeze=False,
        layout="constrained",
    )
    ax = axes[0][0]
    for name in names:
        # Every point as a marker; the line joins those that no other setting beats on
        # both counts (the envelope the figures are read along).
        env = frontier.envelope(name)
        (line,) = ax.plot(
            [p.woken for p in env],
            [p.machine_s / 3600 for p in env],
            label=f"{name} ({SWEEPS[name][0]})",
        )
        curve = frontier.curve(name)
        ax.scatter(
            [p.woken for p in curve],
            [p.machine_s / 3600 for p in curve],
            color=line.get_color(),
            s=16,
        )
    for base in frontier.baselines():
        ax.annotate(f"{base.value:g}s", (base.woken, base.machine_s / 3600))
    ax.set_xlabel("requests that waited for a wake")
    ax.set_ylabel("machine-hours started")
    ax.set_title("cost against waits, each strategy's knob swept (line: its envelope)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    for i, name in enumerate(rows, start=1):
        row = axes[i][0]
        if i > 1:
            row.sharex(axes[1][0])
        xs, ys, level = [0.0], [0], 0
        for t, delta in sorted(frontier.per_app[(name, SWEEPS[name][2])][str(app)].changes):
            level += delta
            xs.append(t / 3600)
            ys.append(level)
        xs.append(frontier.horizon / 3600)
        ys.append(level)
        color = f"C{names.index(name)}"
        row.fill_between(xs, ys, step="post", color=color, alpha=0.6, linewidth=0)
        row.set_ylim(0, max(1, max(ys)) * 1.15)
        row.yaxis.get_major_locator().set_params(integer=True)
        row.set_ylabel(f"{name}\n({SWEEPS[name][2]:g})", rotation=0, ha="right", va="center")
        row.grid(True, axis="x", alpha=0.3)
        if i < len(rows):
            row.tick_params(labelbottom=False)
        else:
            row.set_xlabel("hours")
        if i == 1:
            row.set_title(f"{app}: machines up, each strategy at its default knob")
    fig.savefig(path)
    plt.close(fig)

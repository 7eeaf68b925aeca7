"""Run every strategy over every app of a trace and gather the figures.

Apps share nothing (each has its own pool of machines and its own policy state), so each
(app, strategy) pair is one independent :class:`~autoscaler.sim.engine.AppSim`; the
totals add them up, and the total's peak sweeps their machine changes together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autoscaler.config import AppConfig
from autoscaler.sim.baselines import AlwaysOn, FixedKeepalive, FlyAutostop
from autoscaler.sim.engine import AppSim, Strategy
from autoscaler.sim.model import Stats, Timings, quantile
from autoscaler.sim.ours import PolicyStrategy
from autoscaler.sim.trace import Trace

OURS = "autoscaler"
BASELINES = ("fly-autostop", "fixed-keepalive", "always-on")
STRATEGIES = (OURS, *BASELINES)


def make_strategy(name: str, timings: Timings, *, skip_idle: bool = True) -> Strategy:
    if name == OURS:
        return PolicyStrategy(skip_idle=skip_idle)
    if name == "fly-autostop":
        return FlyAutostop(timings.autostop_interval_s)
    if name.startswith("fixed-keepalive"):
        return FixedKeepalive(timings.keepalive_s)
    if name == "always-on":
        return AlwaysOn()
    raise ValueError(f"unknown strategy {name!r} (expected one of {', '.join(STRATEGIES)})")


@dataclass(slots=True)
class Report:
    """Per strategy (in the order run): per app stats, and the horizon replayed."""

    horizon: float
    timings: Timings
    strategies: list[str] = field(default_factory=list)
    apps: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Stats]] = field(default_factory=dict)
    """strategy -> app -> Stats."""

    def total(self, strategy: str) -> Stats:
        per_app = list(self.stats[strategy].values())
        out = Stats("TOTAL", strategy)
        for s in per_app:
            out.requests += s.requests
            out.served += s.served
            out.wake_waits += s.wake_waits
            out.errors += s.errors
            out.waits.extend(s.waits)
            out.up_s += s.up_s
            out.suspended_s += s.suspended_s
            out.api_actions += s.api_actions
            out.refused += s.refused
            out.decisions += s.decisions
        out.peak_machines = _peak(s.changes for s in per_app)
        return out


def _peak(changes: Iterable[list[tuple[float, int]]]) -> int:
    events = sorted(c for per_app in changes for c in per_app)
    level = peak = 0
    for _, delta in events:  # at equal times -1 sorts first: a swap is not a peak
        level += delta
        peak = max(peak, level)
    return peak


def simulate(
    trace: Trace,
    config_for: Callable[[str], AppConfig],
    timings: Timings,
    strategies: Iterable[str] = STRATEGIES,
    *,
    horizon: float | None = None,
    skip_idle: bool = True,
    progress: Callable[[str, str], None] | None = None,
) -> Report:
    """Replay ``trace`` under each strategy; ``horizon`` defaults to the trace's end."""
    end = trace.end if horizon is None else horizon
    report = Report(end, timings, apps=list(trace.apps))
    for name in strategies:
        per_app: dict[str, Stats] = {}
        label = name
        for app, requests in trace.apps.items():
            strategy = make_strategy(name, timings, skip_idle=skip_idle)
            label = strategy.name
            if progress is not None:
                progress(label, app)
            sim = AppSim(app, requests, config_for(app), timings, strategy, end)
            per_app[app] = sim.run()
        report.strategies.append(label)
        report.stats[label] = per_app
    return report


def summary(stats: Stats) -> dict[str, Any]:
    """The figures of one row, as plain numbers (JSON and CSV)."""
    pct = 100.0 * stats.wake_waits / stats.requests if stats.requests else 0.0
    return {
        "requests": stats.requests,
        "woken": stats.wake_waits,
        "woken_pct": round(pct, 3),
        "wait_p50_s": round(stats.wait_quantile(0.50), 4),
        "wait_p99_s": round(stats.wait_quantile(0.99), 4),
        "wait_max_s": round(stats.max_wait, 4),
        "machine_s_started": round(stats.up_s, 1),
        "machine_s_suspended": round(stats.suspended_s, 1),
        "peak_machines": stats.peak_machines,
        "api_actions": stats.api_actions,
        "errors": stats.errors,
    }


def config_resolver(
    configured: Mapping[str, AppConfig], overrides: Mapping[str, Any]
) -> Callable[[str], AppConfig]:
    """Each app's policy: its entry in the config (or the defaults), then ``overrides``.

    Raises ValueError naming the knob when an override does not validate.
    """
    cache: dict[str, AppConfig] = {}

    def resolve(app: str) -> AppConfig:
        got = cache.get(app)
        if got is None:
            base = configured.get(app)
            data = base.model_dump() if base is not None else {}
            data.update(overrides)
            data["name"] = app
            got = cache[app] = AppConfig.model_validate(data)
        return got

    return resolve


__all__ = ["STRATEGIES", "Report", "config_resolver", "quantile", "simulate", "summary"]

"""Helpers: replay a hand-made list of requests for one app under one strategy."""

from __future__ import annotations

from typing import Any

from autoscaler.config import AppConfig
from autoscaler.sim.engine import AppSim, Strategy
from autoscaler.sim.model import Stats, Timings
from autoscaler.sim.run import make_strategy
from autoscaler.sim.trace import Request


def replay(
    requests: list[Request],
    strategy: str | Strategy = "autoscaler",
    *,
    horizon: float | None = None,
    timings: Timings | None = None,
    **knobs: Any,
) -> Stats:
    timings = timings or Timings()
    chosen = make_strategy(strategy, timings) if isinstance(strategy, str) else strategy
    end = horizon if horizon is not None else max((t + d for t, d in requests), default=0.0)
    config = AppConfig(name="app", **knobs)
    return AppSim("app", requests, config, timings, chosen, end).run()

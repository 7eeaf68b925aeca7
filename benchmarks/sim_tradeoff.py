"""The trade-off table of docs/policy.md: machine-seconds against wakes, per knob setting.

    .venv/bin/python benchmarks/sim_tradeoff.py > /tmp/tradeoff.md

Replays each bundled trace (autoscaler/data/traces) under a few settings of our policy and
under the baselines, with the simulator's default timings, and prints a Markdown table.
Each row is what `autoscaler simulate --trace TRACE --set KNOB=VALUE ... --totals-only`
prints for the same trace and knobs.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from autoscaler.sim.model import Timings
from autoscaler.sim.run import BASELINES, OURS, config_resolver, simulate, summary
from autoscaler.sim.trace import read_trace

TRACES = ("steady-2h", "diurnal-24h", "bursty-24h", "sparse-24h")
SETTINGS: list[dict[str, Any]] = [
    {"idle_to_zero_s": 60},
    {},  # the defaults: idle_to_zero_s 300, suspend
    {"idle_to_zero_s": 900},
    {"scale_down_action": "stop"},
    {"stop_suspended_after_s": 3600},
    {"min_machines": 1},
]


def _label(knobs: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in knobs.items()) or "defaults"


def build_parser() -> argparse.ArgumentParser:
    """No options, but --help (which ran the whole table before) and a check of the docs'
    commands (tests/test_doc_commands.py)."""
    return argparse.ArgumentParser(description=__doc__.split("\n\n")[0])


def main() -> None:
    build_parser().parse_args()
    timings = Timings()
    head = (
        "| trace | strategy | knobs | woken % | wait p99 s | wait max s | started m·s "
        "| suspended m·s | API actions |"
    )
    print(head)
    print("|" + "---|" * 3 + "---:|" * 6)
    for name in TRACES:
        path = Path(str(resources.files("autoscaler") / "data" / "traces" / f"{name}.csv.gz"))
        trace = read_trace(path)
        rows: list[tuple[str, str, dict[str, Any]]] = []
        for knobs in SETTINGS:
            report = simulate(trace, config_resolver({}, knobs), timings, [OURS])
            rows.append((OURS, _label(knobs), summary(report.total(OURS))))
        report = simulate(trace, config_resolver({}, {}), timings, BASELINES)
        rows += [(s, "", summary(report.total(s))) for s in report.strategies]
        for strategy, knobs_text, fig in rows:
            print(
                f"| {name} | {strategy} | {knobs_text} | {fig['woken_pct']:.1f} "
                f"| {fig['wait_p99_s']:.2f} | {fig['wait_max_s']:.2f} "
                f"| {fig['machine_s_started']:.0f} | {fig['machine_s_suspended']:.0f} "
                f"| {fig['api_actions']} |"
            )


if __name__ == "__main__":
    main()

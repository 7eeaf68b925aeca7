"""What planning on a timer's last gaps gains over the histogram alone, one timer app at a time.

    .venv/bin/python benchmarks/sim_regular.py [--periods 60,180,1800,4380,10800] \\
        [--costs 300,1500] [--late-s 5] [--hours 24]

For each period: a day of one app called by a timer every ``period`` seconds from a random
phase, each run up to ``--late-s`` late, replayed under ``adaptive`` twice in this run:
with the regular plans (``keepalive.regular_plan``) and without them (the histogram
alone, as before they existed). Prints the machine-seconds per run and the runs that
waited for a wake, for each ``wake_cost_s``.
"""

from __future__ import annotations

import argparse
import random
from unittest import mock

from autoscaler.scaling import keepalive
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver, simulate
from autoscaler.sim.trace import Trace


def timer_trace(period_s: float, late_s: float, hours: float, seed: int) -> Trace:
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    end = hours * 3600.0
    trace = Trace()
    t = rng.uniform(0.0, period_s)
    runs = trace.apps.setdefault("timer", [])
    while t < end:
        runs.append((t + rng.uniform(0.0, late_s), 0.2))
        t += period_s
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", default="60,180,1800,4380,10800")
    parser.add_argument("--costs", default="300,1500")
    parser.add_argument("--late-s", type=float, default=5.0)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    costs = [float(c) for c in args.costs.split(",")]
    print("| period | runs | wake_cost_s | histogram alone: m·s per run, waited "
          "| with regular plans: m·s per run, waited |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    resolve = config_resolver({}, {})
    for period in (float(p) for p in args.periods.split(",")):
        trace = timer_trace(period, args.late_s, args.hours, args.seed)
        runs = trace.requests
        for cost in costs:
            cells = []
            for least in (10**9, keepalive.REGULAR_MIN):  # never regular; as shipped
                with mock.patch.object(keepalive, "REGULAR_MIN", least):
                    report = simulate(
                        trace, resolve, Timings(), ["adaptive"], overrides={"wake_cost_s": cost}
                    )
                stats = report.stats[report.strategies[0]]["timer"]
                cells.append(f"{stats.up_s / runs:.1f}, {stats.wake_waits}")
            print(f"| {period:g} s | {runs} | {cost:g} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

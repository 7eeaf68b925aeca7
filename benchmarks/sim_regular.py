"""What planning on a timer's last gaps gains over the histogram alone, one timer app at a time.

    .venv/bin/python benchmarks/sim_regular.py [--periods 60,180,1800,4380,10800] \\
        [--costs 300,1500] [--late-s 5] [--hours 24] [--resume-cold-rate 1 --start-s 5]

For each period: a day of one app called by a timer every ``period`` seconds from a random
phase, each run up to ``--late-s`` late, replayed under ``adaptive`` three times in this
run: without the regular plans (``keepalive.regular_plan``: the histogram alone, as before
they existed); with them but each pre-warm begun PREWARM_LEAD_S before its window (as
before the lead was learned); and as shipped (the lead learned from the app's last
pre-warms). Prints the machine-seconds per run and the runs that waited for a wake, for
each ``wake_cost_s``. ``--resume-cold-rate`` and ``--start-s``: resumes that fall back to
a cold boot, and how long one takes.
"""

from __future__ import annotations

import argparse
import random
from contextlib import nullcontext
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


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", default="60,180,1800,4380,10800")
    parser.add_argument("--costs", default="300,1500")
    parser.add_argument("--late-s", type=float, default=5.0)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resume-cold-rate", type=float, default=0.0)
    parser.add_argument("--start-s", type=float, default=Timings().start_s)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    costs = [float(c) for c in args.costs.split(",")]
    timings = Timings(resume_cold_rate=args.resume_cold_rate, start_s=args.start_s)
    print("| period | runs | wake_cost_s | histogram alone: m·s per run, waited "
          "| regular plans, 2 s lead | regular plans, learned lead |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    variants: tuple[dict[str, float], ...] = (
        {"REGULAR_MIN": 10**9},  # never regular
        {"MAX_PREWARM_LEAD_S": keepalive.PREWARM_LEAD_S},  # the lead fixed at 2 s
        {},  # as shipped
    )
    resolve = config_resolver({}, {})
    for period in (float(p) for p in args.periods.split(",")):
        trace = timer_trace(period, args.late_s, args.hours, args.seed)
        runs = trace.requests
        for cost in costs:
            cells = []
            for patched in variants:
                patch = mock.patch.multiple(keepalive, **patched) if patched else nullcontext()
                with patch:
                    report = simulate(
                        trace, resolve, timings, ["adaptive"], overrides={"wake_cost_s": cost}
                    )
                stats = report.stats[report.strategies[0]]["timer"]
                cells.append(f"{stats.up_s / runs:.1f}, {stats.wake_waits}")
            print(f"| {period:g} s | {runs} | {cost:g} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

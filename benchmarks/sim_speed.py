"""How fast `autoscaler simulate` replays one day of the mixed-100-apps trace.

    .venv/bin/python benchmarks/sim_speed.py [--hours 24] [--seed 1] [--jobs 1]

Generates the trace in memory (not timed), then replays it under each strategy and prints
the CPU time of this process (one core: the simulator is single-threaded) and the wall
time, per strategy and in total, and which build runs the policy (pure Python, or compiled
with mypyc: ``AUTOSCALER_COMPILE=1``, setup.py). The target (issue 23) is under 10 s for a
day of our policy (issue 7's was 60 s for the whole run). ``--jobs N`` replays the apps
in N worker processes (``autoscaler simulate --jobs``): the CPU time is then the
workers' and this process's together.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from autoscaler.scaling import policy
from autoscaler.sim.generate import generate
from autoscaler.sim.model import Timings
from autoscaler.sim.run import STRATEGIES, config_resolver, simulate
from autoscaler.sim.trace import Trace


def _cpu() -> float:
    """CPU seconds of this process and of its workers that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    trace = Trace()
    for t, app, duration in generate("mixed-100-apps", seed=args.seed, hours=args.hours):
        trace.apps.setdefault(app, []).append((t, duration))
    print(
        f"mixed-100-apps, seed {args.seed}, {args.hours:g} h: {len(trace.apps)} apps with "
        f"requests, {trace.requests} requests; Python {platform.python_version()}, "
        f"policy {'compiled (mypyc)' if not policy.__file__.endswith('.py') else 'pure Python'}"
    )
    resolve = config_resolver({}, {})
    cpu_total = wall_total = 0.0
    for name in args.strategies.split(","):
        cpu, wall = _cpu(), time.perf_counter()
        report = simulate(trace, resolve, Timings(), [name], jobs=args.jobs)
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
        cpu_total += cpu
        wall_total += wall
        label = report.strategies[0]
        total = report.total(label)
        print(
            f"  {label:<20} cpu {cpu:6.1f} s   wall {wall:6.1f} s   "
            f"policy decisions {total.decisions:>8}   woken {total.wake_waits:>6}"
        )
    print(f"  {'all':<20} cpu {cpu_total:6.1f} s   wall {wall_total:6.1f} s")


if __name__ == "__main__":
    main()

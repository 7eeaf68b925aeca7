"""Issue 23's goals, measured with the frontier on freshly generated traces.

    .venv/bin/python benchmarks/sim_goals.py [--shapes azure-like,memoryless] \\
        [--seeds 31,32] [--hours 24] [--jobs 2]

For each shape and seed: generate the trace (in memory), sweep every strategy's knob
(`autoscaler simulate --frontier`), and print the machine-seconds of each strategy at
fly-autostop's number of waiting requests (its check every 180 s and every 300 s) as a
share of fly-autostop's, and the largest ratio of adaptive to the fixed timer
(`autoscaler`) at the fixed timer's own points (waits within adaptive's range).
"""

from __future__ import annotations

import argparse

from autoscaler.sim.frontier import SWEEPS, Frontier, comparisons, sweep
from autoscaler.sim.generate import generate
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver
from autoscaler.sim.trace import Trace


def worst_against_fixed(frontier: Frontier) -> float | None:
    """max over the fixed timer's points of adaptive's machine-seconds at the same waits
    divided by the fixed timer's (None if adaptive reaches none of those waits)."""
    ratios = []
    env = frontier.envelope("adaptive")
    for p in frontier.curve("autoscaler"):
        if not env or not env[0].woken <= p.woken <= env[-1].woken:
            continue  # waits that no setting of adaptive makes
        got = frontier.at_waits("adaptive", p.woken)
        if got is not None and p.machine_s > 0:
            ratios.append(got / p.machine_s)
    return max(ratios) if ratios else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="azure-like,memoryless")
    parser.add_argument("--seeds", default="31,32")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    resolve = config_resolver({}, {})
    print("| shape | seed | requests | fly check | woken | " + " | ".join(SWEEPS) + " | "
          "adaptive / fixed, worst |")  # fmt: skip
    print("|---|---:|---:|---:|---:|" + "---:|" * len(SWEEPS) + "---:|")
    for shape in args.shapes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            trace = Trace()
            for t, app, duration in generate(shape, seed=seed, hours=args.hours):
                trace.apps.setdefault(app, []).append((t, duration))
            found = sweep(trace, resolve, Timings(), list(SWEEPS), jobs=args.jobs)
            worst = worst_against_fixed(found)
            for row in comparisons(found):
                cells = []
                for name in SWEEPS:
                    ratio = row["strategies"][name]["ratio"]
                    cells.append("-" if ratio is None else f"{ratio:.2f}")
                print(
                    f"| {shape} | {seed} | {trace.requests} | {row['baseline'][13:]} | "
                    f"{row['woken']} | "
                    + " | ".join(cells)
                    + " | "
                    + ("-" if worst is None else f"{worst:.2f}")
                    + " |"
                )


if __name__ == "__main__":
    main()

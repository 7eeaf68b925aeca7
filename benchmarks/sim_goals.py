"""Issue 23's goals, measured with the frontier on freshly generated traces.

    .venv/bin/python benchmarks/sim_goals.py [--shapes azure-like,memoryless] \\
        [--seeds 31,32] [--hours 24] [--jobs 2] [--points] [--adaptive-costs 1500,2400]

For each shape and seed: generate the trace (in memory), sweep every strategy's knob
(`autoscaler simulate --frontier`), and print the machine-seconds of each strategy at
fly-autostop's number of waiting requests (its check every 180 s and every 300 s) as a
share of fly-autostop's, and the largest ratio of adaptive to the fixed timer
(`autoscaler`) at the fixed timer's own points (waits within adaptive's range).
``--points`` also prints, under the table, the points of adaptive and of the fixed timer
(knob value, waiting requests, machine-seconds) and adaptive's machine-seconds at each of
the fixed timer's waits; ``--adaptive-costs`` adds ``wake_cost_s`` values to the sweep.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import autoscaler.sim.frontier as frontier_module
from autoscaler.sim.frontier import SWEEPS, Frontier, Point, comparisons, sweep
from autoscaler.sim.generate import generate
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver
from autoscaler.sim.trace import Trace


def against_fixed(frontier: Frontier) -> Iterator[tuple[Point, float]]:
    """Each point of the fixed timer with adaptive's machine-seconds at the same waits
    (the fixed timer's points at waits that no setting of adaptive makes left out)."""
    env = frontier.envelope("adaptive")
    for p in frontier.curve("autoscaler"):
        if not env or not env[0].woken <= p.woken <= env[-1].woken:
            continue
        got = frontier.at_waits("adaptive", p.woken)
        if got is not None and p.machine_s > 0:
            yield p, got


def worst_against_fixed(frontier: Frontier) -> float | None:
    """max over the fixed timer's points of adaptive's machine-seconds at the same waits
    divided by the fixed timer's (None if adaptive reaches none of those waits)."""
    return max((got / p.machine_s for p, got in against_fixed(frontier)), default=None)


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="azure-like,memoryless")
    parser.add_argument("--seeds", default="31,32")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--points", action="store_true", help="print the curves' points too")
    parser.add_argument("--adaptive-costs", default="", help="wake_cost_s values to add")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.adaptive_costs:
        knob, values, default = SWEEPS["adaptive"]
        added = {float(v) for v in args.adaptive_costs.split(",")}
        frontier_module.SWEEPS["adaptive"] = (knob, tuple(sorted({*values, *added})), default)
    notes: list[str] = []
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
            if args.points:
                notes += points(found, f"{shape} seed {seed}")
    print("\n".join(notes))


def points(frontier: Frontier, title: str) -> list[str]:
    """Adaptive's and the fixed timer's points, and adaptive at the fixed timer's waits."""
    lines = [f"\n{title}:"]
    for name in ("autoscaler", "adaptive"):
        knob = SWEEPS[name][0]
        for p in frontier.curve(name):
            lines.append(f"  {name} {knob}={p.value:g}: {p.woken} waits, {p.machine_s:.0f} s")
    for p, got in against_fixed(frontier):
        lines.append(
            f"  at the fixed timer's {p.value:g} s ({p.woken} waits): adaptive "
            f"{got:.0f} s, {got / p.machine_s:.3f}x"
        )
    return lines


if __name__ == "__main__":
    main()

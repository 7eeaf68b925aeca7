"""Would timing a timer's pre-warm window on its schedule, rather than on its gaps, pay?
(An idea measured, not shipped: docs/policy.md.)

    .venv/bin/python benchmarks/timer_windows.py [--period 60] [--late-s 5] [--draws 3000]

A timer set on the clock runs up to J seconds late each time, so its gaps vary by 2J while
its starts stay within J of a line (``clock``). A timer set from the end of its last run
drifts instead: each gap is the period plus up to J (``drift``). For each kind and each
number of runs seen, the script draws ``--draws`` histories and compares two windows for
the next run: the shipped one (``keepalive.regular_plan`` on the last gaps) and one from a
least-squares line through the starts (the residuals' range, widened by half of itself
below and all of itself above, 1 s at least, as the shipped rule widens the gaps' range),
taken only where it is no wider than the gaps' window. Runs are instantaneous here, so both
windows count from the last run's start. Prints, per window, the share of next runs that
fall outside it (each one waits) and the mean time the machine is up, pre-warmed, before
the run comes (the lead and the resume not counted).
"""

from __future__ import annotations

import argparse
import itertools
import random

from autoscaler.scaling import keepalive

MARGIN_S = keepalive.REGULAR_MARGIN_S


def schedule_window(starts: list[float]) -> tuple[float, float]:
    """(opens, closes) of the next run, from the line through ``starts``."""
    n = len(starts)
    mid = (n - 1) / 2
    mean = sum(starts) / n
    period = sum((i - mid) * (t - mean) for i, t in enumerate(starts)) / sum(
        (i - mid) ** 2 for i in range(n)
    )
    residuals = [t - mean - period * (i - mid) for i, t in enumerate(starts)]
    lo, hi = min(residuals), max(residuals)
    spread = max(MARGIN_S, hi - lo)
    expected = mean + period * (n - mid)
    return expected + lo - spread / 2, expected + hi + spread


def history(rng: random.Random, kind: str, runs: int, period: float, late: float) -> list[float]:
    if kind == "clock":
        return [period * i + rng.uniform(0.0, late) for i in range(runs)]
    t, out = 0.0, []
    for _ in range(runs):
        out.append(t)
        t += period + rng.uniform(0.0, late)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--period", type=float, default=60.0)
    parser.add_argument("--late-s", type=float, default=5.0)
    parser.add_argument("--draws", type=int, default=3000)
    parser.add_argument("--runs", default="5,9,13,17,25", help="runs seen, comma-separated")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    rng = random.Random(args.seed)  # noqa: S311 - reproducible test data, not secrets
    print(
        "| timer | runs seen | gaps' window: missed, up before the run (s) "
        "| schedule's window taken | missed, up before the run (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in ("clock", "drift"):
        for runs in (int(r) for r in args.runs.split(",")):
            missed = {"gaps": 0, "schedule": 0}
            up = {"gaps": 0.0, "schedule": 0.0}
            taken = planned = 0
            for _ in range(args.draws):
                starts = history(rng, kind, runs + 1, args.period, args.late_s)
                seen, nxt = starts[:-1], starts[-1]
                gaps = [b - a for a, b in itertools.pairwise(seen)]
                plan = keepalive.regular_plan(gaps[-keepalive.RECENT :], 1e9)
                if plan is None or plan.prewarm_at_s is None:
                    continue
                planned += 1
                windows = {
                    "gaps": (seen[-1] + plan.prewarm_at_s, seen[-1] + plan.keep_until_s),
                    "schedule": schedule_window(seen),
                }
                (opens, closes), (s_opens, s_closes) = windows.values()
                if s_closes - s_opens <= closes - opens:
                    taken += 1
                else:
                    windows["schedule"] = windows["gaps"]
                for name, (lo, hi) in windows.items():
                    if lo <= nxt < hi:
                        up[name] += nxt - lo
                    else:
                        missed[name] += 1
            if not planned:
                print(f"| {kind} | {runs} | no regular plan | | |")
                continue
            cells = {
                name: f"{missed[name] / planned:.1%}, {up[name] / (planned - missed[name]):.1f}"
                for name in missed
            }
            print(
                f"| {kind} | {runs} | {cells['gaps']} | {taken / planned:.0%} "
                f"| {cells['schedule']} |"
            )


if __name__ == "__main__":
    main()

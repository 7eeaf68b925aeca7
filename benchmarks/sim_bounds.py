"""What no policy can beat on a generated trace: the bounds quoted next to issue 23's goals.

    .venv/bin/python benchmarks/sim_bounds.py --shape memoryless --seed 41
    .venv/bin/python benchmarks/sim_bounds.py --shape azure-like --seed 41
    .venv/bin/python benchmarks/sim_bounds.py --shape sessions --seed 61 --hours 168

Replays the trace under ``fly-autostop`` (its check every 180 s and every 300 s) and
prints, at fly-autostop's number of waiting requests:

- the **memoryless bound**: with Poisson arrivals, the best keep-alive for an app is all or
  nothing (keep the machine through every idle gap, or put it to sleep at once), and
  keeping app i through its gaps costs its idle seconds G_i to save its n_i waits. The
  cheapest way to make at most W waits is to let the apps with the longest mean gap
  G_i / n_i sleep first (a fractional knapsack: one app may be split). Each sleep costs
  ``--cycle-s`` machine-seconds (a suspend and a resume), gaps under 2 s are never slept
  through, and requests are served by one machine per app, so the bound is below what
  any policy reaches: on a trace of Poisson apps, no policy that cannot see the future
  does better.
- the **best keep per app, in hindsight**: each app kept for the one length (from 0 to
  all day) that, knowing the whole trace in advance, best trades its machine-seconds for
  its waits, the lengths chosen together for the least machine-seconds at W waits (per
  app the lower convex hull of its (waits, cost) points, then the hulls' segments taken
  steepest first, one of them in part). Apps whose gaps are as regular as a timer's
  (their standard deviation under a tenth of their mean) are pre-warmed for free: each
  gap costs ``--cycle-s`` and no wait. No policy that keeps each app's machine for a
  fixed time after its last request, or pre-warms only timers, does better; one that
  follows the day's cycle within an app can, and the same bound with a keep chosen per
  app and per hour of the trace says by how much (on ``azure-like``, docs/policy.md).
- the **busy floor**: the share of fly-autostop's machine-seconds spent on apps that keep
  a machine up at least 90% of the day and average a request every 20 s or more often.
  Putting such an app to sleep for a second costs about as many waits as its rate (with
  memoryless gaps), so at fly-autostop's few thousand waits a day no policy can save more
  than a few thousand machine-seconds on them: their share is a floor under any ratio.

For ``--shape sessions`` it prints instead what following the day's cycle of visits is
worth against a fixed timer, by counting each idle gap's cost directly (no replay): a
gap kept through costs its length, one slept through costs the keep, ``--cycle-s`` and a
wait. The rule: keep ``--think-s`` (past the think times), and through the whole gap when
visits (gaps over ``--think-s``) come on average more often than every X seconds, X
swept. The **two-sided** rule counts the visits in the hour before and the hour after
the gap (it sees the future: no policy can have it); the **causal** one counts those in
the ``--window-s`` before. On a trace of several days, two more count the visits in the
hour around the same time of day on the **other days** (the days after too: a rate per
hour of the day known in advance) and on the **past days** only (what a policy that
learns a daily profile can do; the first day keeps 120 s). Each is printed at the fixed
timer's waits (``keep T``).

``--excess 300,1500`` prints instead, for each ``wake_cost_s`` c given, how much adaptive
spends above the best all-or-nothing keep of each app, in the plan's own cost units
(machine-seconds plus c per wait; the best keep of an app with idle seconds G and n gaps
costs min(G, n (c + cycle))), in total and by the app's number of gaps and mean gap: where
a change to the adaptive keep-alive gains or loses, app by app (docs/policy.md).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import statistics
from collections.abc import Callable

from autoscaler.scaling.keepalive import MIN_GAP_S
from autoscaler.sim.frontier import Frontier, Point
from autoscaler.sim.generate import generate
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver, simulate
from autoscaler.sim.trace import Trace

DAY_S = 86400.0
KEEPS = (0.0, *(MIN_GAP_S * 1.25**i for i in range(48)), math.inf)
"""The keeps the hindsight bound chooses from: 2 s to 10 hours, 25% apart, and all day."""
REGULAR_CV = 0.1


def memoryless_bound(trace: Trace, waits: int, cycle_s: float) -> float:
    """Machine-seconds of the best per-app all-or-nothing keep-alive at ``waits`` waits."""
    busy = 0.0
    items: list[tuple[float, int]] = []
    for requests in trace.apps.values():
        app_busy, long = busy_and_idle(requests)
        busy += app_busy
        items.append((sum(long), len(long)))
    # The first request of each app wakes a machine whatever the policy.
    cost, made = busy, len(trace.apps)
    for idle, n in sorted(items, key=lambda x: -(x[0] / x[1]) if x[1] else 0.0):
        if made + n <= waits:
            cost += n * cycle_s
            made += n
        elif made < waits:
            share = (waits - made) / n
            cost += share * n * cycle_s + (1 - share) * idle
            made = waits
        else:
            cost += idle
    return cost


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower convex hull of (waits, cost) points, by waits ascending, cost falling."""
    hull: list[tuple[int, float]] = []
    for w, c in sorted(set(points)):
        if hull and c >= hull[-1][1]:
            continue  # more waits for no less cost
        while len(hull) >= 2:
            (w1, c1), (w2, c2) = hull[-2], hull[-1]
            if (c2 - c1) * (w - w1) < (c - c1) * (w2 - w1):
                break
            hull.pop()  # (w2, c2) lies on or above the chord
        hull.append((w, c))
    return hull


def _regular(gaps: list[float]) -> bool:
    """Gaps as regular as a timer's: the hindsight bound pre-warms their app for free."""
    return len(gaps) >= 3 and statistics.pstdev(gaps) < REGULAR_CV * statistics.mean(gaps)


def _keep_points(gaps: list[float], cycle_s: float) -> list[tuple[int, float]]:
    """(waits, machine-seconds) of these gaps under each of KEEPS."""
    return [
        (sum(1 for g in gaps if g > k), sum(g if g <= k else k + cycle_s for g in gaps))
        for k in KEEPS
    ]


def hindsight_bound(trace: Trace, waits: int, cycle_s: float, block_s: float = math.inf) -> float:
    """Machine-seconds of the best keep per app, known in advance, at ``waits`` waits
    (timers pre-warmed for free; the module's docstring); with ``block_s``, a keep per
    app and per block of that many seconds (the gaps that begin in it)."""
    cost, made = 0.0, 0
    segments: list[tuple[float, int]] = []  # (machine-seconds saved per wait, waits)
    for requests in trace.apps.values():
        busy, gaps = busy_and_idle(requests)
        cost, made = cost + busy, made + 1  # the first request wakes it
        if _regular(gaps):
            cost += cycle_s * len(gaps)
            continue
        blocks: dict[float, list[float]] = {}
        for start, gap in idle_gaps(requests)[1]:
            if gap >= MIN_GAP_S:
                blocks.setdefault(start // block_s, []).append(gap)
        for part in blocks.values():
            hull = _lower_hull(_keep_points(part, cycle_s))
            cost, made = cost + hull[0][1], made + hull[0][0]
            for (w1, c1), (w2, c2) in itertools.pairwise(hull):
                segments.append(((c1 - c2) / (w2 - w1), w2 - w1))
    for saved, n in sorted(segments, reverse=True):
        take = min(n, waits - made)
        if take <= 0:
            break
        cost, made = cost - saved * take, made + take
    return cost


def idle_gaps(requests: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """The busy seconds of one app's requests and its idle gaps (start, length)."""
    spans = sorted((t, t + d) for t, d in requests)
    start, end = spans[0]
    busy = 0.0
    gaps: list[tuple[float, float]] = []
    for a, z in spans[1:]:
        if a > end:
            busy += end - start
            gaps.append((end, a - end))
            start, end = a, z
        else:
            end = max(end, z)
    return busy + end - start, gaps


def busy_and_idle(requests: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """The seconds one app must be up (its busy time, and gaps under MIN_GAP_S, which no
    policy sleeps through) and its idle gaps a policy may sleep through."""
    busy, gaps = idle_gaps(requests)
    busy += sum(g for _, g in gaps if g < MIN_GAP_S)
    return busy, [g for _, g in gaps if g >= MIN_GAP_S]


def excess(trace: Trace, cost: float, cycle_s: float) -> None:
    """Adaptive's cost above each app's best all-or-nothing keep at ``wake_cost_s`` = cost,
    and above its best keep in hindsight (timers pre-warmed for free)."""
    resolve = config_resolver({}, {})
    report = simulate(trace, resolve, Timings(), ["adaptive"], overrides={"wake_cost_s": cost})
    stats = report.stats[report.strategies[0]]
    rows: list[tuple[float, int, float]] = []  # excess, gaps, mean gap
    best_total = 0.0
    above_keep = {True: 0.0, False: 0.0}  # by whether the app's gaps are regular
    keep_total = 0.0
    for app, requests in trace.apps.items():
        busy, long = busy_and_idle(requests)
        # The first request wakes a machine whatever the policy.
        best = busy + cost + min(sum(long), len(long) * (cost + cycle_s))
        got = stats[app].up_s + cost * stats[app].wake_waits
        rows.append((got - best, len(long), sum(long) / len(long) if long else 0.0))
        best_total += best
        regular = _regular(long)
        if regular:
            keep = busy + cost + cycle_s * len(long)
        else:
            keep = busy + cost + min(c + cost * w for w, c in _keep_points(long, cycle_s))
        above_keep[regular] += got - keep
        keep_total += keep
    total = sum(r[0] for r in rows)
    print(f"  wake_cost_s {cost:g}: {total:.0f} above the best keeps' {best_total:.0f}"
          f" ({100 * total / best_total:.1f}%)")  # fmt: skip
    for lo, hi in ((0, 8), (8, 30), (30, 100), (100, 1000), (1000, math.inf)):
        part = sum(r[0] for r in rows if lo <= r[1] < hi)
        print(f"    apps with {lo}-{hi:g} gaps: {part:.0f}")
    for lo, hi in ((0, 0.5), (0.5, 1), (1, 2), (2, math.inf)):
        part = sum(r[0] for r in rows if r[1] and lo <= r[2] / cost < hi)
        print(f"    mean gap {lo:g}-{hi:g} x wake_cost_s: {part:.0f}")
    regular, other = above_keep[True], above_keep[False]
    print(f"    above the best keep per app in hindsight ({keep_total:.0f}): {regular + other:.0f}"
          f" (apps with regular gaps {regular:.0f}, others {other:.0f})")  # fmt: skip


def _count(times: list[float], lo: float, hi: float) -> int:
    return bisect.bisect_left(times, hi) - bisect.bisect_left(times, lo)


def day_cycle(trace: Trace, cycle_s: float, think_s: float, window_s: float) -> None:
    """Print the fixed timer's points and the two day-cycle rules at its waits."""
    apps = [idle_gaps(r) for r in trace.apps.values()]
    busy = sum(b for b, _ in apps)

    def replay(keep: Callable[[float, list[float]], float]) -> tuple[int, float]:
        waits, cost = len(apps), busy  # each app's first request wakes it
        for _, gaps in apps:
            visits = sorted(t + g for t, g in gaps if g > think_s)
            for t, g in gaps:
                k = keep(t, visits)
                if g <= k or g < MIN_GAP_S:
                    cost += g
                else:
                    cost, waits = cost + k + cycle_s, waits + 1
        return waits, cost

    def rule(x: float, lo_s: float, hi_s: float) -> Callable[[float, list[float]], float]:
        def keep(t: float, visits: list[float]) -> float:
            seen = _count(visits, t - lo_s, t + hi_s)
            return math.inf if seen and (lo_s + hi_s) / seen < x else think_s

        return keep

    end = trace.end
    days = int(end // DAY_S) + 1

    def daily(x: float, past_only: bool) -> Callable[[float, list[float]], float]:
        """The visit rate at this time of day, counted over the other days (the hour
        around it); the first day, with no day before it, keeps the fixed 120 s."""

        def keep(t: float, visits: list[float]) -> float:
            seen, hours = 0, 0
            for d in range(-days, days + 1):
                mid = t + d * DAY_S
                if d == 0 or (past_only and d > 0) or mid < 1800 or mid > end - 1800:
                    continue
                seen, hours = seen + _count(visits, mid - 1800, mid + 1800), hours + 1
            if not hours:
                return 120.0
            return math.inf if seen and hours * 3600 / seen < x else think_s

        return keep

    rules: dict[str, Callable[[float], Callable[[float, list[float]], float]]] = {
        "two-sided": lambda x: rule(x, 3600.0, 3600.0),
        "causal": lambda x: rule(x, window_s, 0.0),
    }
    if days > 1:
        rules["other days"] = lambda x: daily(x, past_only=False)
        rules["past days"] = lambda x: daily(x, past_only=True)

    # The rules' curves, read at the fixed timer's waits along their lower envelopes.
    curves = Frontier([], {}, trace.end)
    for x in (100.0 * 1.15**i for i in range(40)):
        for name, make in rules.items():
            waits, cost = replay(make(x))
            curves.points.append(Point(name, "every_s", x, waits, cost, trace.requests))
    for keep_s in (30.0, 60.0, 120.0, 300.0, 600.0):
        waits, cost = replay(lambda t, v, k=keep_s: k)
        line = f"  keep {keep_s:.0f}s: {waits} woken, {cost:.0f} m·s"
        for name in rules:
            got = curves.at_waits(name, waits)
            line += f"; {name} " + ("-" if got is None else f"{got / cost:.3f}x")
        print(line)


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="memoryless")
    parser.add_argument("--seed", type=int, default=41)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--cycle-s", type=float, default=2.5)
    parser.add_argument("--think-s", type=float, default=60.0)
    parser.add_argument("--window-s", type=float, default=3600.0)
    parser.add_argument("--excess", default="", help="wake_cost_s values (comma-separated)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    trace = Trace()
    for t, app, duration in generate(args.shape, seed=args.seed, hours=args.hours):
        trace.apps.setdefault(app, []).append((t, duration))
    resolve = config_resolver({}, {})
    horizon = args.hours * 3600
    print(f"{args.shape}, seed {args.seed}, {args.hours:g} h, {trace.requests} requests")
    if args.excess:
        for cost in (float(c) for c in args.excess.split(",")):
            excess(trace, cost, args.cycle_s)
        return
    if args.shape == "sessions":
        day_cycle(trace, args.cycle_s, args.think_s, args.window_s)
        return
    for interval in (180, 300):
        name = f"fly-autostop-{interval}s"
        report = simulate(trace, resolve, Timings(), [name])
        label = report.strategies[0]
        total = report.total(label)
        bound = memoryless_bound(trace, total.wake_waits, args.cycle_s)
        busy = sum(
            st.up_s
            for app, st in report.stats[label].items()
            if st.up_s >= 0.9 * horizon and len(trace.apps[app]) >= horizon / 20
        )
        line = f"  {name}: {total.wake_waits} woken, {total.up_s:.0f} m·s; "
        if args.shape == "memoryless":  # a bound only where every app is Poisson
            line += f"memoryless bound {bound:.0f} m·s ({bound / total.up_s:.2f}x); "
        per_app = hindsight_bound(trace, total.wake_waits, args.cycle_s)
        per_hour = hindsight_bound(trace, total.wake_waits, args.cycle_s, 3600.0)
        line += (
            f"best keep per app in hindsight {per_app / total.up_s:.2f}x, "
            f"per app and hour {per_hour / total.up_s:.2f}x; "
        )
        print(line + f"busy floor {busy:.0f} m·s ({busy / total.up_s:.2f}x)")


if __name__ == "__main__":
    main()

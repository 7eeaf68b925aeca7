"""Adaptive keep-alive: learn each app's idle gaps, then decide how long to keep its last
machine and when to pre-warm it.

After "Serverless in the Wild" (Shahrad et al., USENIX ATC'20): per app, a histogram of
idle times (from the end of the last activity to the next request), kept online with
bounded memory; its shape says how long to keep the machine after the app goes idle and
whether to put it to sleep at once and wake it (pre-warm) shortly before the next request
is likely. The paper takes a pre-warm window and a keep-alive window from fixed
percentiles (5th and 99th); here the three times are chosen to minimise the expected cost
of one idle gap under the histogram,

    machine-seconds kept up + wake_cost_s x P(the next request waits for a wake),

which is the same rule with the percentiles picked by the cost knob (docs/policy.md). When
the histogram is not representative yet (fewer than ``MIN_GAPS`` gaps), or most gaps fall
beyond its range, the fixed timer decides instead: ``idle_to_zero_s``, or ``wake_cost_s``
if shorter (the break-even rule: keep for as long as one wake is worth), unless the gaps
seen so far say that sleeping at once, or keeping for ``wake_cost_s``, costs less.

Gaps as regular as a timer's are planned on before and apart from the histogram: its bins
are 7% wide, too coarse to time a pre-warm before an hourly job to a few seconds, and it
needs ``MIN_GAPS`` gaps, which a job every three hours makes in a day. The last
``RECENT`` gaps, kept exactly, are enough for those (``regular_plan``).

Pure: no clock, no I/O. Every value here is frozen and carried in ``PolicyState``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal, TypeAlias

from autoscaler.config import AppConfig

MIN_GAP_S = 2.0
"""Shorter gaps are not idleness (the app is busy): not learned, and never slept through."""
MAX_GAP_S = 4 * 3600.0
"""The histogram's range (the paper's 4 hours); longer gaps count as out of range."""
BINS = 96
"""Log-spaced bins between MIN_GAP_S and MAX_GAP_S: about 7% wide each."""
DECAY = 0.99
"""Each new gap multiplies the weight of the older ones by this: half-life about 69 gaps."""
MIN_GAPS = 8.0
"""Decayed count of gaps below which the histogram is not representative."""
MAX_OUT_OF_RANGE = 0.5
"""Share of gaps beyond MAX_GAP_S above which the histogram is not representative."""
PREWARM_LEAD_S = 2.0
"""A pre-warm begins at least this long before its window, so the resume is done when it
opens; longer if the app's last pre-warms took longer to come up (a resume that fell back
to a cold boot), up to MAX_PREWARM_LEAD_S."""
MAX_PREWARM_LEAD_S = 10.0
"""The longest lead: a cold boot on Fly takes one to several seconds."""
MIN_PREWARM_S = 30.0
"""No pre-warm sooner than this after the app went idle (a suspend and a resume take
seconds; keeping is cheaper below that). With the lead (MAX_PREWARM_LEAD_S at most) it
bounds pre-warms to 3600 / (30 - 10) an hour."""
SPREAD = 0.1
"""Share of each gap counted in each neighbouring bin when planning."""
MIN_SLEEP_S = 30.0
"""A machine put to sleep before a pre-warm sleeps at least this long."""
CYCLE_S = 2.0
"""Machine-seconds one sleep and wake cost beyond the idle time (suspend, API calls)."""
PLAN_EVERY = 4
"""The plan is made again after this many new gaps (it moves slowly; making it costs)."""
WINDOW_SHARE = 0.2
"""A pre-warm window must hold at least this share of the gaps (and 3 of them): fewer is
noise (a hole between two rare long gaps), not a pattern."""
PREWARM_DOUBT = 2.0
"""A plan that sleeps before a pre-warm is charged this many waits more than its histogram
shows in the sleep: among a few dozen gaps, a stretch of several bins is often empty by
chance, and the plan, the cheapest of all the stretches, finds the luckiest one. Without
it, apps with memoryless gaps slept through such holes and waited in them (docs/policy.md)."""
RECENT = 8
"""The last gaps kept exactly, for the regular plan."""
REGULAR_MIN = 3
"""Gaps needed before a regular plan. Three gaps within a few per cent of each other are
rare by chance in any gaps but a timer's: 0.6% of draws of three exponential gaps, 0.05%
of four, none of eight; a plan made by chance costs one gap's window."""
REGULAR_WIDTH = 0.5
"""A regular plan's pre-warm window (the range of the recent gaps, widened by half of it
below and by all of it above) is at most this share of the gap it opens at."""
REGULAR_MARGIN_S = 1.0
"""The least a regular plan's window is widened by either side."""
KEEP_SPREAD_BINS = 10
"""When choosing how long to keep without a pre-warm, each gap is spread evenly over the
bins this many either side of its own (10 bins: a factor of two): the few long gaps
between visits would otherwise each pull the keep to just past themselves, and a plan that
follows them costs more than any fixed length (docs/policy.md)."""

_TIE = 1e-9
"""Costs this close (relatively) are equal: they differ by the rounding of their sums."""
_RATIO = (MAX_GAP_S / MIN_GAP_S) ** (1.0 / BINS)
EDGES: tuple[float, ...] = (*(MIN_GAP_S * _RATIO**i for i in range(BINS)), MAX_GAP_S)
"""Bin b holds gaps in [EDGES[b], EDGES[b + 1])."""
_MIDS: tuple[float, ...] = tuple(math.sqrt(EDGES[i] * EDGES[i + 1]) for i in range(BINS))
_LOG_RATIO = math.log(_RATIO)
_FIRST_PREWARM = next(i for i, e in enumerate(EDGES) if e >= MIN_PREWARM_S)

Outcome = Literal["hit", "miss"]
Basis: TypeAlias = Literal["histogram", "early", "regular"]


def _bin(gap: float) -> int:
    """The bin of a gap in [MIN_GAP_S, MAX_GAP_S)."""
    b = int(math.log(gap / MIN_GAP_S) / _LOG_RATIO)
    # Rounding at an edge: the bin is the one whose edges hold the gap.
    if b > 0 and gap < EDGES[b]:
        b -= 1
    elif b < BINS - 1 and gap >= EDGES[b + 1]:
        b += 1
    return max(0, min(BINS - 1, b))


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one idle gap, in seconds from the start of the idle period."""

    sleep_after_s: float
    """Put the last machine to sleep once the app has been idle this long."""
    prewarm_at_s: float | None
    """Resume it when the app has been idle this long (minus the lead); None: never."""
    keep_until_s: float
    """Put it back to sleep (a pre-warm that missed) once idle this long."""
    gaps: float
    """Decayed count of gaps the plan was learned from."""
    p5_s: float
    p99_s: float
    """The histogram's 5th and 99th percentiles; of a regular plan, its shortest and
    longest gap."""
    basis: Basis = "histogram"
    """What the plan was chosen on: the histogram; the few gaps seen before it is
    representative (``early``: a keep only); the last gaps, as regular as a timer's."""
    text: str = ""
    """``describe()``, made once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.describe())

    def describe(self) -> str:
        if self.basis == "early":
            return (
                f"keep {self.sleep_after_s:.0f}s (cheaper than the fixed timer on the "
                f"{self.gaps:.0f} gaps seen, too few to plan on)"
            )
        if self.basis == "regular":
            learned = f"the last {self.gaps:.0f} gaps regular, {self.p5_s:.0f}-{self.p99_s:.0f}s"
        else:
            learned = f"{self.gaps:.0f} gaps, p5 {self.p5_s:.0f}s, p99 {self.p99_s:.0f}s"
        if self.prewarm_at_s is None:
            return f"keep {self.sleep_after_s:.0f}s ({learned})"
        return (
            f"sleep after {self.sleep_after_s:.0f}s, pre-warm at {self.prewarm_at_s:.0f}s, "
            f"keep until {self.keep_until_s:.0f}s ({learned})"
        )


@dataclass(frozen=True, slots=True)
class GapHistogram:
    """Decayed counts of idle gaps per log-spaced bin, plus those beyond the range."""

    weights: tuple[float, ...] = (0.0,) * BINS
    beyond: float = 0.0
    total: float = 0.0
    """sum(weights) + beyond, kept by add() (the policy reads it every tick)."""

    @property
    def count(self) -> float:
        return self.total

    def add(self, gap: float) -> GapHistogram:
        """The histogram with one more gap (the older ones decayed). A gap shorter than
        MIN_GAP_S is no idleness, and one that is not a number no gap: either leaves the
        histogram as it is (``step`` passes neither; before, such a gap aged the others
        without counting itself)."""
        if not gap >= MIN_GAP_S:  # NaN too
            return self
        weights = [w * DECAY for w in self.weights]
        beyond = self.beyond * DECAY
        total = self.total * DECAY + 1.0
        if gap >= MAX_GAP_S:
            beyond += 1.0
        else:
            weights[_bin(gap)] += 1.0
        return GapHistogram(tuple(weights), beyond, total)

    def quantile(self, q: float) -> float:
        """The gap below which a share ``q`` of the gaps fall (bin upper edges)."""
        total = self.count
        if total <= 0:
            return 0.0
        need = q * total
        run = 0.0
        for b, w in enumerate(self.weights):
            run += w
            if run >= need and w > 0:
                return EDGES[b + 1]
        return MAX_GAP_S

    def representative(self) -> bool:
        total = self.count
        return total >= MIN_GAPS and self.beyond <= MAX_OUT_OF_RANGE * total

    def plan(self, wake_cost_s: float, fallback_s: float) -> Plan | None:
        """The cheapest (sleep, pre-warm, keep-until) for the next gap. If the histogram
        is not representative: the cheaper of sleeping at once and keeping for
        ``wake_cost_s`` on the gaps seen, if one costs less there than the fixed timer
        (``fallback_s``); None (the fixed timer) otherwise.

        Costs per gap, with gaps at their bin's middle, S <= W <= K on the bin edges and
        N gaps of which C(j) fall below edge j and G(j) is their sum:

        - up: E[min(g, S)] + E[(min(g, K) - W)+]; waits: c (P(S < g < W) + P(g > K));
        - E[min(g, X_j)] = G(j) + X_j (N - C(j)).

        With W > S the total splits into f(S) + h(W) + k(K), minimised in one pass with
        a running minimum over S < W and one over K >= W. Keeping without a sleep (S = W)
        costs k(K) alone; that K is chosen with the gaps spread KEEP_SPREAD_BINS wide.
        """
        if not self.representative():
            return self._early(wake_cost_s, fallback_s)
        c = wake_cost_s
        n = self.count
        # Each gap spread a little over the bins next to its own (SPREAD each side), so
        # that a hole between two rare gaps does not look like a place to sleep in.
        raw, keep_share = self.weights, 1.0 - 2 * SPREAD
        smooth = [
            keep_share * raw[b] + SPREAD * (raw[b - 1] if b > 0 else raw[b])
            + SPREAD * (raw[b + 1] if b < BINS - 1 else raw[b])
            for b in range(BINS)
        ]  # fmt: skip
        cum_c, cum_g, later, keeps = _keeping(smooth, n, c)
        edges = EDGES
        # sleep(S): asleep after edge S, its part of the machine time and the waits.
        sleeps = [
            g + (e + CYCLE_S) * r - c * x
            for g, e, r, x in zip(cum_g, edges, later, cum_c, strict=True)
        ]
        # wake(W): pre-warm at edge W, PREWARM_LEAD_S early.
        wakes = [
            c * x - g - (e - PREWARM_LEAD_S) * r
            for g, e, r, x in zip(cum_g, edges, later, cum_c, strict=True)
        ]
        # Without a pre-warm: the keep that is cheapest with the gaps spread wide. A plan
        # with one must beat the cheapest keep on the histogram it is placed on.
        wide = _keeping(_spread_evenly(raw, KEEP_SPREAD_BINS), n, c)[3]
        keep_k = _shortest_cheapest(wide)
        best_cost = min(keeps)
        best: tuple[int, int | None, int] = (keep_k, None, keep_k)
        # Suffix minimum of keep(K) for K > W.
        suffix: list[int] = [BINS] * (BINS + 1)
        for k in range(BINS - 1, -1, -1):
            nxt = suffix[k + 1]
            suffix[k] = k if _no_dearer(keeps[k], keeps[nxt]) else nxt
        support = max(3.0, WINDOW_SHARE * n)
        # Best S at or before each edge (a running minimum).
        s_best_at: list[int] = [0] * (BINS + 1)
        for j in range(1, BINS + 1):
            prev = s_best_at[j - 1]
            s_best_at[j] = j if sleeps[j] < sleeps[prev] else prev
        for w in range(_FIRST_PREWARM, BINS):
            # Asleep for at least MIN_SLEEP_S: a shorter sleep saves less than it costs.
            last_s = bisect_right(edges, edges[w] - MIN_SLEEP_S) - 1
            if last_s < 0:
                continue
            s_best = s_best_at[last_s]
            s_cost = sleeps[s_best]
            # A window of at least one bin that holds enough of the gaps.
            k_min = bisect_left(cum_c, cum_c[w] + support, w + 1)
            if k_min > BINS:
                continue
            k = suffix[k_min]
            cost = s_cost + wakes[w] + keeps[k] + c * PREWARM_DOUBT
            if cost < best_cost - 1e-9:
                best_cost, best = cost, (s_best, w, k)
        s, w_opt, k = best
        return Plan(
            sleep_after_s=edges[s],
            prewarm_at_s=None if w_opt is None else edges[w_opt],
            keep_until_s=edges[k],
            gaps=n,
            p5_s=self.quantile(0.05),
            p99_s=self.quantile(0.99),
        )

    def _early(self, wake_cost_s: float, fallback_s: float) -> Plan | None:
        """Before the histogram can be planned on, the few gaps seen still tell apart an
        app whose gaps are all long (sleep at once: each costs a wait, where the fixed
        timer adds its length to it) from one whose gaps are shorter than one wake is
        worth but longer than the timer (keep for ``wake_cost_s``). Only these two keeps
        are weighed against the timer: a handful of gaps is too few to place a keep
        between them. The first gap, with nothing seen, keeps the fixed timer."""
        if self.total <= 0:
            return None
        keeps = _keeping(self.weights, self.total, wake_cost_s)[3]
        # The edges at (or just past) the timer and wake_cost_s; 4 h at most.
        timer, long = (min(BINS, bisect_left(EDGES, s)) for s in (fallback_s, wake_cost_s))
        best = timer
        for k in (0, long):
            if keeps[k] < keeps[best] - 1e-9:
                best = k
        if best == timer:
            return None
        edge = EDGES[best]
        p5, p99 = self.quantile(0.05), self.quantile(0.99)
        return Plan(edge, None, edge, self.total, p5, p99, basis="early")


def regular_plan(recent: Sequence[float], wake_cost_s: float) -> Plan | None:
    """Sleep at once and pre-warm just before the next gap ends, if the last gaps are as
    regular as a timer's: at least ``REGULAR_MIN`` of them, whose range (``REGULAR_MARGIN_S``
    at least), widened by half of itself below and by itself above, is at most
    ``REGULAR_WIDTH`` of the shortest. That widened range is the pre-warm window (the
    chance that the next gap falls outside the range of the last n is 2 / (n + 1), of
    any gaps; widened, much less, of a timer's). Taken only if it costs less
    than keeping through the gaps, or sleeping at once and waking for each (None
    otherwise, and the histogram decides)."""
    n = len(recent)
    if n < REGULAR_MIN:
        return None
    lo, hi = min(recent), max(recent)
    # Widened more above than below: a window open early costs at every gap, one that
    # closes late only when the request is not coming.
    spread = max(REGULAR_MARGIN_S, hi - lo)
    opens, closes = lo - spread / 2, hi + spread
    sleep = EDGES[0]
    if (
        opens < max(MIN_PREWARM_S, sleep + MIN_SLEEP_S)
        or closes >= MAX_GAP_S
        or closes - opens > REGULAR_WIDTH * opens
    ):
        return None
    mean = sum(recent) / n
    cost = sleep + CYCLE_S + PREWARM_LEAD_S + mean - opens
    if cost >= min(mean, wake_cost_s + sleep + CYCLE_S):
        return None
    return Plan(sleep, opens, closes, n, lo, hi, basis="regular")


def _keeping(
    weights: Sequence[float], n: float, c: float
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per edge j: C(j), G(j), N - C(j), and the cost of keeping until edge j then
    sleeping (and waking for the next request), for ``plan``."""
    cum_c = [0.0, *accumulate(weights)]
    cum_g = [0.0, *accumulate(w * m for w, m in zip(weights, _MIDS, strict=True))]
    later = [n - x if n > x else 0.0 for x in cum_c]
    keeps = [g + (e + c + CYCLE_S) * r for g, e, r in zip(cum_g, EDGES, later, strict=True)]
    return cum_c, cum_g, later, keeps


def _shortest_cheapest(costs: Sequence[float]) -> int:
    """The first (shortest) keep whose cost is the least, to rounding: past the longest
    gap every keep costs the same, and the rounding of the sums must not pick 4 h over
    the first keep past it."""
    least = min(costs)
    return next(j for j, x in enumerate(costs) if _no_dearer(x, least))


def _no_dearer(cost: float, than: float) -> bool:
    """``cost`` is at most ``than``, to the rounding of their sums (_TIE)."""
    return cost <= than + _TIE * abs(than)


def _spread_evenly(weights: Sequence[float], bins: int) -> list[float]:
    """Each bin's weight spread evenly over the bins up to ``bins`` either side of it
    (those that exist), added up with a difference array."""
    delta = [0.0] * (BINS + 1)
    for b, w in enumerate(weights):
        if w:
            lo, hi = max(0, b - bins), min(BINS, b + bins + 1)
            share = w / (hi - lo)
            delta[lo] += share
            delta[hi] -= share
    return list(accumulate(delta[:BINS]))


@dataclass(frozen=True, slots=True)
class KeepAliveState:
    """What the adaptive keep-alive carries from one decision to the next."""

    gaps: GapHistogram = field(default_factory=GapHistogram)
    plan: Plan | None = None
    idle_from: float | None = None
    """Latest activity seen (request arrival, or a sample with load in it)."""
    last_arrival: float | None = None
    prewarmed: bool = False
    """A pre-warm was made in the current idle period, and not yet judged hit or miss."""
    prewarm_from: float | None = None
    """When the latest pre-warm began, until a machine serves (then it is timed)."""
    wakes: tuple[float, ...] = ()
    """How long the last RECENT pre-warms took to bring a machine up (by the ticks)."""
    unplanned: int = 0
    """Gaps learned since the plan was made."""
    recent: tuple[float, ...] = ()
    """The last RECENT gaps, oldest first."""


@dataclass(frozen=True, slots=True)
class Phase:
    """What the keep-alive says at ``now``."""

    keep_s: float
    """Idle this long (from the latest activity) and the last machines go."""
    prewarm: bool
    """In a pre-warm window: one machine should be up although nothing arrives."""
    outcome: Outcome | None
    """A pre-warm was judged at this decision: a request came (hit) or none did (miss)."""
    next_check: float | None
    """When the answer changes next if nothing arrives (the sleep, a pre-warm window)."""
    why: str


def prewarm_lead_s(wakes: Sequence[float]) -> float:
    """How long before its window a pre-warm begins: as long as the slowest of the last
    pre-warms took to bring a machine up, within PREWARM_LEAD_S and MAX_PREWARM_LEAD_S."""
    return min(MAX_PREWARM_LEAD_S, max((PREWARM_LEAD_S, *wakes)))


def fallback_keep_s(app: AppConfig) -> float:
    """The keep while nothing is learned: the fixed timer, but never longer than one wake
    is worth (keeping for ``wake_cost_s``, the break-even rule of ski rental, costs at most
    twice what the best choice in hindsight would have, whatever the gaps)."""
    return min(app.idle_to_zero_s, app.wake_cost_s)


def step(
    state: KeepAliveState,
    app: AppConfig,
    now: float,
    last_request_at: float | None,
    last_active: float | None,
    up: int,
    serving: int | None = None,
) -> tuple[KeepAliveState, Phase]:
    """Learn from what arrived since the previous decision, then say what to keep now.
    ``up``: machines started or starting; ``serving``: of those, started (``up`` if
    not given)."""
    fixed = app.idle_to_zero_s
    if app.keep_alive != "adaptive":
        return state, Phase(fixed, False, None, None, "")
    gaps, plan, prewarmed, unplanned = state.gaps, state.plan, state.prewarmed, state.unplanned
    recent, prewarm_from, wakes = state.recent, state.prewarm_from, state.wakes
    if prewarm_from is not None and (up if serving is None else serving) > 0:
        # The pre-warm's machine serves: how long it took sets the next ones' lead.
        wakes, prewarm_from = (*wakes[1 - RECENT :], now - prewarm_from), None
    outcome: Outcome | None = None
    if last_request_at is not None and (
        state.last_arrival is None or last_request_at > state.last_arrival
    ):
        # A new request: the gap since the activity before it is one more sample.
        if state.idle_from is not None:
            gap = last_request_at - state.idle_from
            if gap >= MIN_GAP_S:
                gaps = gaps.add(gap)
                recent = (*recent[1 - RECENT :], gap)
                unplanned += 1
                # Regular and early plans are made again at every gap: the first holds
                # only as long as the gaps stay regular, the second until the histogram
                # is representative.
                regular = regular_plan(recent, app.wake_cost_s)
                if regular is not None:
                    plan = regular
                elif plan is None or plan.basis != "histogram" or unplanned >= PLAN_EVERY:
                    plan, unplanned = gaps.plan(app.wake_cost_s, fallback_keep_s(app)), 0
        if prewarmed:
            outcome, prewarmed = "hit", False
    idle_from = state.idle_from
    for t in (last_request_at, last_active):
        if t is not None and (idle_from is None or t > idle_from):
            idle_from = t

    def carried() -> KeepAliveState:
        return KeepAliveState(
            gaps=gaps, plan=plan, idle_from=idle_from, last_arrival=last_request_at,
            prewarmed=prewarmed, prewarm_from=prewarm_from, wakes=wakes,
            unplanned=unplanned, recent=recent,
        )  # fmt: skip

    if plan is None or idle_from is None:
        new = carried()
        keep = fallback_keep_s(app)
        why = f"adaptive: {gaps.count:.0f} gaps learned, not representative: fixed timer {keep:g}s"
        return new, Phase(keep, False, outcome, None, why)
    idle_for = now - idle_from
    s, w, k = plan.sleep_after_s, plan.prewarm_at_s, plan.keep_until_s
    starts = None if w is None else max(s, w - prewarm_lead_s(wakes))
    # The window's ends as times on the caller's clock, each one sum computed once and
    # compared with ``now`` as it is: the same value is the ``next_check`` below. Compared
    # as idle time (``now - idle_from``) with ``starts``, a tick at exactly that
    # ``next_check`` could fall a rounding short of the opening (at epoch-like clock
    # values: 1.7e9 + 98.1 - 1.7e9 < 98.1), find the window shut and the same
    # ``next_check`` again, and a sleeping app was polled a whole ``idle_poll_s`` later.
    opens = None if starts is None else idle_from + starts
    closes = idle_from + k
    in_window = opens is not None and opens <= now < closes
    if in_window and up == 0 and not prewarmed:
        prewarmed, prewarm_from = True, now
    if prewarmed and not in_window and now >= closes:
        outcome, prewarmed = "miss", False
        if up == 0:
            # Nothing came up for it (the resume failed): no wake to time. Kept, the
            # next machine to serve, maybe hours on, would time the whole wait.
            prewarm_from = None
    # The times the answer changes (the sleep, a pre-warm window opening and closing):
    # the first of them still to come. Only the opening wakes a quiet app back; the others
    # are given too, so that a caller that skips quiet ticks finds them without searching.
    marks = (idle_from + s, opens if opens is not None and opens < closes else None, closes)
    next_check = min((t for t in marks if t is not None and t > now), default=None)
    if in_window:
        why = f"adaptive: pre-warm, idle {idle_for:.0f}s ({plan.text})"
    else:
        why = f"adaptive: {plan.text}"
    return carried(), Phase(k if in_window else s, in_window, outcome, next_check, why)

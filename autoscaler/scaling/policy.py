"""The scaling policy: how many machines an app should have started, and which ones.

Pure: ``decide`` is a function of (fleet snapshot, load windows, knobs, now, previous
state). It reads no clock and does no I/O, so the controller, the table tests and the trace
simulator all run the very same code. docs/policy.md explains every knob.

Definitions used throughout (Knative's KPA, adapted to machines):

- unit = target_concurrency * target_utilization, at most hard_limit: the load one machine
  is planned for (as Knative caps its target at containerConcurrency: a machine is never
  given more than hard_limit, and planning on more would leave the rest queued).
- up: machines counted as capacity: started, uncordoned, not being drained, not hung and
  not sick (Fly's checks critical, while the app has healthy machines enough), plus
  machines on their way to started (``starting``/``restarting``, or one of our start,
  resume or uncordon actions in flight). Counting those stops a second start for one need.
- ready: up machines that serve now (started and routable). capacity = max(1, ready) * unit.
- panic is entered when the panic-window average reaches panic_threshold * capacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from autoscaler.config import AppConfig
from autoscaler.scaling.fleet import (
    COMING_UP_STATES,
    FAILED,
    GOING_DOWN_STATES,
    STARTED,
    STOPPED,
    SUSPENDED,
    SUSPENDING,
    Fleet,
    MachineSnapshot,
)
from autoscaler.scaling.keepalive import KeepAliveState, Outcome
from autoscaler.scaling.keepalive import step as keepalive_step
from autoscaler.scaling.window import LoadWindows

ActionKind = Literal["resume", "start", "uncordon", "drain", "stop", "restart"]

_UP_PENDING = frozenset({"start", "resume", "uncordon"})
_DOWN_PENDING = frozenset({"drain", "stop"})
# ceil() of a float that is an integer plus rounding noise must not add a machine.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Action:
    """One thing for the controller to do to one machine.

    drain = cordon (API + view) -> wait for in-flight 0 or drain_timeout_s ->
    policy.scale_down_action (suspend|stop) -> uncordon in the API. uncordon = take back a
    machine we are draining (or lift a cordon of ours left on a stopped or suspended
    machine). stop = a suspended machine past stop_suspended_after_s.
    """

    kind: ActionKind
    machine_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What one ``decide`` hands to the next; ``PolicyState()`` is the initial state."""

    born: float | None = None
    """``now`` of the first decision: idleness is never counted from before it."""
    panic_since: float | None = None
    last_trigger: float | None = None
    """Last time the panic condition held (panic ends a stable window after it)."""
    panic_desired: int = 0
    """Highest desired count of this panic: panic never scales down."""
    lower_since: float | None = None
    """Since when demand has wanted fewer machines than are up (None: it does not)."""
    lower_history: tuple[tuple[float, int], ...] = ()
    """(time, wanted) during the current lower streak, within scale_down_delay_s: a scale
    down goes only to the highest count wanted during the delay."""
    keepalive: KeepAliveState = field(default_factory=KeepAliveState)
    """The adaptive keep-alive's learned idle gaps and plan (keepalive.py)."""

    @property
    def panic(self) -> bool:
        return self.panic_since is not None


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    """Started machines wanted (within [min_machines, max_machines])."""
    panic: bool
    actions: tuple[Action, ...]
    reason: str
    """One human line: why. Logged per decision and shown on /status."""
    shortfall: int
    """Machines the app lacks to reach ``desired`` (creating machines is out of scope)."""
    state: PolicyState
    current: int = 0
    """Machines counted as up (see the module docstring)."""
    stable_load: float = 0.0
    panic_load: float = 0.0
    prewarm: Outcome | None = None
    """A pre-warm judged at this decision (adaptive keep-alive): "hit" or "miss"."""
    next_check: float | None = None
    """When the decision may change next if nothing arrives: the idle timer (or the
    adaptive keep-alive's sleep, pre-warm window opening or closing) running out, a
    removal held back by ``min_lifetime_s`` becoming possible. A caller that skips quiet
    ticks must decide again by then (None: no such time is known)."""


@dataclass(slots=True)
class _Groups:
    """The fleet sorted into what the policy may do with each machine."""

    serving: list[MachineSnapshot] = field(default_factory=list)
    coming: list[MachineSnapshot] = field(default_factory=list)
    draining: list[MachineSnapshot] = field(default_factory=list)
    """Started and cordoned by us: being drained, or a drain left behind by a restart."""
    suspended: list[MachineSnapshot] = field(default_factory=list)
    stopped: list[MachineSnapshot] = field(default_factory=list)
    going: list[MachineSnapshot] = field(default_factory=list)
    failed: list[MachineSnapshot] = field(default_factory=list)
    """Failed, and ours to start again now (``MachineSnapshot.restartable``)."""
    hung: list[MachineSnapshot] = field(default_factory=list)
    """Started, but hanging (``MachineSnapshot.hung``): to be restarted, not capacity."""
    sick: list[MachineSnapshot] = field(default_factory=list)
    """Started, Fly's checks critical (``MachineSnapshot.sick_since``): not capacity, to be
    replaced; drained once surplus. Counted as serving again when more than one more of
    them than of healthy machines is up (the failure is likely the app's own: replacing
    them would only start every machine it has)."""
    foreign: list[MachineSnapshot] = field(default_factory=list)
    other: list[MachineSnapshot] = field(default_factory=list)
    """States we do not drive (created, updating, replacing, destroying, ...), and failed
    machines waiting out their restart backoff or past their restart budget."""

    @classmethod
    def of(cls, machines: Iterable[MachineSnapshot]) -> _Groups:
        g = cls()
        for m in machines:
            if m.cordoned_by_others:
                g.foreign.append(m)
            elif m.pending in _UP_PENDING:
                g.coming.append(m)
            elif m.pending in _DOWN_PENDING or m.state in GOING_DOWN_STATES:
                g.going.append(m)
            elif m.state == STARTED and (m.cordoned or m.draining):
                g.draining.append(m)
            elif m.state == STARTED and m.hung:
                g.hung.append(m)
            elif m.state == STARTED:
                (g.serving if m.sick_since is None else g.sick).append(m)
            elif m.state in COMING_UP_STATES:
                g.coming.append(m)
            elif m.state == SUSPENDED:
                g.suspended.append(m)
            elif m.state == STOPPED:
                g.stopped.append(m)
            elif m.state == FAILED and m.restartable:
                g.failed.append(m)
            else:
                g.other.append(m)
        # The app's own failure (rule 4): more sick machines than healthy ones plus one,
        # those on their way down counted (a sick one drained must not make the others
        # stop counting, or the next tick takes the drain back: a flap every
        # scale_down_delay_s); or sick ones with nothing but machines known sick to
        # replace them (starting one, sick again, then draining the other, made a loop).
        sick_leaving = sum(1 for m in (*g.draining, *g.going) if m.sick_since is not None)
        spare = any(not m.down_sick for m in (*g.suspended, *g.stopped, *g.failed))
        no_replacement = not (spare or g.serving or g.coming)
        if g.sick and (len(g.sick) + sick_leaving > len(g.serving) + 1 or no_replacement):
            g.serving.extend(g.sick)
            g.sick.clear()
        return g

    @property
    def up(self) -> int:
        return len(self.serving) + len(self.coming)

    @property
    def pool(self) -> int:
        """Machines that serve, or could serve once we (or time) act on them."""
        asleep = len(self.suspended) + len(self.stopped) + len(self.failed)
        unwell = len(self.hung) + len(self.sick)
        return self.up + len(self.draining) + asleep + len(self.going) + unwell


def _recency(m: MachineSnapshot) -> tuple[float, float, str]:
    """Sort key: most recently used first (never used last), then most recent state."""
    used = m.last_used if m.last_used is not None else -math.inf
    since = m.state_since if m.state_since is not None else -math.inf
    return (-used, -since, m.id)


def _interruptible(m: MachineSnapshot) -> bool:
    """Suspending, and not by someone else's hand: starting it takes the suspend back (Fly
    allows it), which is faster than any other wake. Our own drain in its suspend step
    counts, although busy: taking it back is the point."""
    return (
        m.state == SUSPENDING and not m.cordoned_by_others and (not m.busy or m.pending == "drain")
    )


def _wake_candidates(g: _Groups) -> list[tuple[ActionKind, MachineSnapshot]]:
    """Rule 2, in order: take back a drain, take back a suspend under way, resume, start
    a stopped machine, start a failed one again; freshest first; machines whose Fly
    checks are critical, or were when they last ran, after the others, and those whose
    host Fly cannot reach after all (their actions fail until it is back).

    Busy machines are left alone; a stopped or suspended machine still carrying a cordon
    of ours is skipped (it gets its cordon lifted first, or it would start unroutable).
    """
    out: list[tuple[ActionKind, MachineSnapshot]] = []
    interrupt = [m for m in g.going if _interruptible(m)]
    out.extend(("resume", m) for m in sorted(interrupt, key=_recency))
    tiers: tuple[tuple[ActionKind, list[MachineSnapshot]], ...] = (
        ("resume", g.suspended),
        ("start", g.stopped),
        ("start", g.failed),
    )
    for kind, machines in tiers:
        ok = [m for m in machines if not m.busy and not m.cordoned]
        out.extend((kind, m) for m in sorted(ok, key=_recency))
    draining = [m for m in g.draining if not m.busy]
    ordered = [*(("uncordon", m) for m in sorted(draining, key=_recency)), *out]
    return sorted(ordered, key=_wake_tier)  # stable: within a tier, the order above


def _wake_tier(candidate: tuple[ActionKind, MachineSnapshot]) -> tuple[bool, bool]:
    """Machines whose host Fly cannot reach last; before them, those whose Fly checks are
    critical (a drain of a sick machine), or were when they last ran."""
    m = candidate[1]
    return (m.unreachable, m.down_sick or m.sick_since is not None)


def choose_wake(fleet: Fleet) -> Action | None:
    """The machine a wake should use (rule 2), or None if none can be woken now.

    It does not look at routable or starting machines: the caller decides whether a wake
    is needed at all.
    """
    candidates = _wake_candidates(_Groups.of(fleet))
    if not candidates:
        return None
    kind, m = candidates[0]
    return Action(kind, m.id, f"wake: {_wake_why(kind, m)}")


def _wake_why(kind: ActionKind, m: MachineSnapshot) -> str:
    if m.state == SUSPENDING:
        return "take back a machine being suspended"
    if m.state == FAILED:
        return "start a failed machine again"
    return _WAKE_WHY[kind]


_WAKE_WHY: dict[str, str] = {
    "uncordon": "take back a machine being drained",
    "resume": "resume a suspended machine",
    "start": "start a stopped machine",
}


def _removal_key(m: MachineSnapshot) -> tuple[int, int, float, str]:
    # Fewest long-lived connections (a drain ends a WebSocket, an event stream or a
    # download that a machine without one would have kept), then fewest requests in
    # flight, then longest idle (never used counts as idlest).
    used = m.last_used if m.last_used is not None else -math.inf
    return (m.long_lived, m.in_flight, used, m.id)


def _want(load: float, unit: float) -> int:
    return max(0, math.ceil(load / unit - _EPSILON))


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, n))


@dataclass(frozen=True, slots=True)
class _Count:
    """How many machines, and why (the first half of a decision)."""

    desired: int
    remove: int
    why: tuple[str, ...]
    lower_since: float | None = None
    history: tuple[tuple[float, int], ...] = ()


def _panic_count(
    up: int, burst: float, unit: float, low: int, high: int, prior: int, window: float
) -> _Count:
    # Scale on the panic window, and never below what this panic has had or wanted.
    desired = _clamp(max(_want(burst, unit), prior, up), low, high)
    if desired > up:
        return _Count(desired, 0, (f"scale up {up}->{desired} on {window:g}s avg {burst:.1f}",))
    return _Count(desired, 0, (f"hold {up} ({window:g}s avg {burst:.1f})",))


def _normal_count(
    up: int,
    stable: float,
    unit: float,
    low: int,
    policy: AppConfig,
    now: float,
    state: PolicyState,
    idle_for: float | None,
    keep_s: float,
) -> _Count:
    high = policy.max_machines
    wanted = _clamp(_want(stable, unit), low, high)
    avg = f"{policy.stable_window_s:g}s avg {stable:.1f}"
    if wanted > up:
        return _Count(wanted, 0, (f"scale up {up}->{wanted} on {avg}",))
    if wanted == up:
        return _Count(wanted, 0, (f"steady at {up} ({avg})",))

    # Demand wants fewer machines than are up.
    lower_since = state.lower_since if state.lower_since is not None else now
    lasted = now - lower_since
    # Keep only entries that can still be the delay window's maximum: a later entry that
    # wants at least as much makes an earlier one irrelevant, so this stays short.
    kept = [h for h in state.lower_history if h[0] > now - policy.scale_down_delay_s]
    while kept and kept[-1][1] <= wanted:
        kept.pop()
    most = min(up, max((wanted, *(h[1] for h in kept))))
    # An entry at the floor (min_machines) is dropped by the next tick whatever its time
    # (the next one wants at least as much): stamped with the streak's start, it leaves
    # the state unchanged from tick to tick while demand stays there, so a caller that
    # skips ticks which change nothing can skip those.
    floor = min(policy.min_machines, high)
    history = (*kept, (now if wanted > floor else lower_since, wanted))
    if idle_for is not None:
        # The idle time is the delay: no request for idle_to_zero_s.
        desired = wanted
        why = f"idle {idle_for:.0f}s >= {round(keep_s, 1):g}s: scale down {up}->{wanted}"
    elif lasted >= policy.scale_down_delay_s and most < up:
        # Only to the most that demand wanted during the delay.
        desired = most
        why = f"scale down {up}->{desired} (lower demand for {lasted:.0f}s, {avg})"
    elif up > high:
        # More than max_machines are up (someone else started them): the cap holds
        # without waiting for the delay, still one step at a time.
        desired = high
        why = f"above max_machines: scale down {up}->{high}"
    elif lasted >= policy.scale_down_delay_s:
        # Lower for the whole delay, but it wanted as many as are up within it (fewer than
        # were up then): "wants 1 for 6s of 3s" read as a delay that was not kept.
        desired = up
        why = (
            f"hold {up}: demand wanted {most} within the last {policy.scale_down_delay_s:g}s,"
            f" {wanted} now ({avg})"
        )
    else:
        desired = up
        why = (
            f"hold {up}: demand wants {wanted} for {lasted:.0f}s of "
            f"{policy.scale_down_delay_s:g}s ({avg})"
        )
    whys = [why]
    remove = min(policy.scale_down_step, up - desired) if desired < up else 0
    if 0 < remove < up - desired:
        whys.append(f"{remove} this tick (scale_down_step)")
    return _Count(desired, remove, tuple(whys), lower_since, history)


def decide(
    fleet: Fleet,
    load: LoadWindows,
    policy: AppConfig,
    now: float,
    state: PolicyState,
    last_request_at: float | None,
) -> Decision:
    """One tick of the policy; see docs/policy.md for each rule and knob."""
    born = state.born if state.born is not None else now
    g = _Groups.of(fleet)
    up, ready = g.up, len(g.serving)
    unit = min(policy.target_concurrency * policy.target_utilization, float(policy.hard_limit))
    stable = load.average(policy.stable_window_s, now)
    burst = load.average(policy.panic_window_s, now)
    capacity = max(1, ready) * unit
    high = policy.max_machines

    # Idle: no request arrived, none was in flight during the latest sample, none is in
    # flight now, and we have watched for at least idle_to_zero_s (so a restarted
    # autoscaler does not put machines to sleep at once). A request arriving this very
    # instant is not idleness either, even with idle_to_zero_s 0.
    # The idle time is idle_to_zero_s, or what the adaptive keep-alive says for now.
    keepalive, phase = keepalive_step(
        state.keepalive, policy, now, last_request_at, load.last_active, up, ready
    )
    keep_s = phase.keep_s

    in_flight = fleet.in_flight

    def quiet_since(t: float) -> bool:
        # ``t + keep_s`` as the next_check below computes it: a tick at that very time
        # must find the timer over (``now - t`` can fall a rounding short of keep_s).
        return in_flight == 0 and now > t and now >= t + keep_s

    seen = [t for t in (last_request_at, load.last_active) if t is not None]
    idle_for = now - max((*seen, born))
    idle = quiet_since(max((*seen, born)))
    # Nothing up and no recent demand: stay at zero (the first decision must not wake a
    # machine for traffic that never came).
    asleep = up == 0 and (quiet_since(max(seen)) if seen else in_flight == 0)
    if phase.prewarm:
        idle = asleep = False  # a pre-warm window: one machine up before the next request
    low = min(high, policy.min_machines if idle or asleep else max(policy.min_machines, 1))

    # Panic: enter when the panic average reaches panic_threshold x capacity; every
    # trigger extends it; leave a stable window after the last trigger.
    why: list[str] = []
    panic_since, last_trigger = state.panic_since, state.last_trigger
    if idle or asleep:
        # No request for idle_to_zero_s is no burst, whatever the windows still remember
        # (only reachable with idle_to_zero_s shorter than the windows).
        if panic_since is not None:
            why.append("leave panic (idle)")
        panic_since = last_trigger = None
    elif burst / capacity >= policy.panic_threshold - _EPSILON:
        if panic_since is None:
            panic_since = now
            why.append(
                f"enter panic ({policy.panic_window_s:g}s avg {burst:.1f} >= "
                f"{policy.panic_threshold:g} x capacity {capacity:.1f})"
            )
        last_trigger = now
    elif panic_since is not None and (
        last_trigger is None or now - last_trigger >= policy.stable_window_s
    ):
        why.append(f"leave panic (no trigger for {policy.stable_window_s:g}s)")
        panic_since = last_trigger = None
    in_panic = panic_since is not None

    if in_panic:
        prior = state.panic_desired if state.panic else 0
        count = _panic_count(up, burst, unit, low, high, prior, policy.panic_window_s)
    else:
        # Idle or asleep, demand is nil whatever the windows still remember (they can, when
        # idle_to_zero_s is shorter than the stable window): min_machines is the answer.
        demand = 0.0 if idle or asleep else stable
        count = _normal_count(
            up, demand, unit, low, policy, now, state, idle_for if idle else None, keep_s
        )
    if g.sick:  # not up, so not in the counts that follow: say which and why
        why.append(_sick_why(g.sick, count.desired > up))
    hung_at = len(why)  # the hung ones too, once the plan says what becomes of them
    why.extend(count.why)
    if phase.why:
        why.append(phase.why)
    if phase.outcome is not None:
        why.append(f"pre-warm {phase.outcome}")
    desired = count.desired
    # min_lifetime_s keeps a machine from flapping with demand. A sleep that the adaptive
    # keep-alive planned is no flap: the plan priced the cycle, and holding every woken
    # machine up for min_lifetime_s would keep a timer app that runs every minute up half
    # the time, and an app whose gaps are long up 30 s for every request.
    planned = idle and keepalive.plan is not None
    lifetime = 0.0 if planned and policy.keep_alive == "adaptive" else policy.min_lifetime_s
    actions = _plan(g, count, policy, now, in_panic, why, lifetime)
    if g.hung:
        why.insert(hung_at, _hung_why(g.hung, actions))
    if phase.prewarm:
        # The controller carries a pre-warm out as any wake; the reason says what it is.
        actions = [
            Action(a.kind, a.machine_id, f"pre-warm: {a.reason}")
            if a.reason.startswith("scale up")
            else a
            for a in actions
        ]
    # When the answer changes next if nothing arrives: the keep-alive's own times, the
    # idle timer running out, a removal held back by min_lifetime_s becoming possible.
    checks = [phase.next_check] if phase.next_check is not None else []
    if not idle and not asleep and not phase.prewarm and up and not in_flight:
        checks.append(max((*seen, born)) + keep_s)
    if count.remove and not in_panic:
        young = [
            m.started_at + lifetime
            for m in g.serving
            if not m.busy and m.started_at is not None and now < m.started_at + lifetime
        ]
        if young:
            checks.append(min(young))
    limit = policy.stop_suspended_after_s
    if limit is not None and not in_panic:  # the stop tier's timer (_plan)
        due = [
            m.state_since + limit
            for m in g.suspended
            if not m.busy and not m.unreachable and m.state_since is not None
        ]
        if due and min(due) > now:
            checks.append(min(due))
    next_check = min(checks) if checks else None
    shortfall = max(0, desired - g.pool)
    if shortfall:
        why.append(f"short of {shortfall} machine(s)")
        waiting = sum(1 for m in g.other if m.state == FAILED)
        if waiting:
            why.append(f"{waiting} failed machine(s) in restart backoff or past their budget")
    if actions:
        why.append(_summary(actions))
    return Decision(
        desired=desired,
        panic=in_panic,
        actions=tuple(actions),
        reason=f"{'panic' if in_panic else 'normal'}: " + "; ".join(why),
        shortfall=shortfall,
        state=PolicyState(
            born=born,
            panic_since=panic_since,
            last_trigger=last_trigger,
            panic_desired=desired if in_panic else 0,
            lower_since=count.lower_since,
            lower_history=count.history,
            keepalive=keepalive,
        ),
        current=up,
        stable_load=stable,
        panic_load=burst,
        prewarm=phase.outcome,
        next_check=next_check,
    )


def _plan(
    g: _Groups,
    count: _Count,
    policy: AppConfig,
    now: float,
    in_panic: bool,
    why: list[str],
    lifetime: float,
) -> list[Action]:
    """Which machines: the actions for ``count`` plus housekeeping; at most one each."""
    actions: list[Action] = []
    touched: set[str] = set()

    def act(kind: ActionKind, m: MachineSnapshot, reason: str) -> None:
        actions.append(Action(kind, m.id, reason))
        touched.add(m.id)

    # Scale up: take back, resume, start (rule 2).
    missing = count.desired - g.up
    woken = _wake_candidates(g)[:missing] if missing > 0 else []
    for kind, m in woken:
        act(kind, m, f"scale up to {count.desired}: {_wake_why(kind, m)}")
    # A hung machine restarted comes back as one more started machine: only as many as
    # max_machines leaves room for beside those up and those woken above (which replace
    # the hung ones sooner than a restart); the others are stopped.
    restarts = policy.max_machines - g.up - len(woken) if count.desired > 0 else 0

    # Scale down: fewest long-lived connections, then fewest in flight, then longest idle
    # (_removal_key), never younger than min_lifetime_s
    # (an unknown start time counts as old). Not a machine whose host Fly cannot reach: its
    # suspend or stop would answer 503 after the cordon, every tick, until the host is back.
    if count.remove:
        eligible = sorted(
            (
                m
                for m in g.serving
                if not m.busy
                and not m.unreachable
                and (m.started_at is None or now >= m.started_at + lifetime)
            ),
            key=_removal_key,
        )
        for m in eligible[: count.remove]:
            act("drain", m, f"scale down to {count.desired}: {m.in_flight} in flight")
        if len(eligible) < count.remove:
            why.append(
                f"{count.remove - len(eligible)} removal(s) wait (busy, under min_lifetime "
                "or host unreachable)"
            )

    # A machine that hangs is restarted (stopped, then started afresh), in panic too: it
    # serves nobody as it is. It does not count as capacity meanwhile (docs/policy.md, rule
    # 4). An app that wants no machine has it stopped: its next start is a new process.
    # On a host Fly cannot reach, the stop would answer 503 and spend the restart budget:
    # it waits for the host (a host that is down is the likeliest cause of the hang).
    for m in g.hung:
        if m.id in touched or m.busy:
            continue
        if m.unreachable:
            continue  # named in the reason line (_hung_why)
        reason = (
            "hung: out of routing for timeouts or resets (its probe failed too, or it timed"
            " out with no other machine to route to)"
        )
        if restarts > 0:
            restarts -= 1
            act("restart", m, reason)
        elif count.desired > 0:
            act("stop", m, f"{reason}; replaced within max_machines {policy.max_machines}")
        else:
            act("stop", m, reason)
    # A sick machine (Fly's checks critical) serves only as the last routable one: once
    # the healthy machines that serve are enough, it is drained, after the scale-down
    # delay (a check that flaps under load must not cost a warm machine), at once if the
    # app wants none. Its replacement may have taken the app over max_machines: then it
    # is drained at once, in panic too (over the cap no load may go to it anyway), so the
    # cap is exceeded only while the replacement boots and the sick one drains.
    staying = sum(1 for m in g.serving if m.id not in touched)  # not drained this tick
    over = staying + len(g.sick) - policy.max_machines
    for m in g.sick:
        if m.id in touched or m.busy or m.unreachable or staying < count.desired:
            continue
        if in_panic and over <= 0:
            break  # panic never removes a machine, a sick one neither (checks flap in bursts)
        sick_for = now - (m.sick_since if m.sick_since is not None else now)
        if over > 0:
            over -= 1
            why_now = f", replaced (over max_machines {policy.max_machines})"
        elif count.desired == 0 or sick_for >= policy.scale_down_delay_s:
            why_now = ", replaced" if count.desired else ""
        else:
            continue
        act("drain", m, f"sick: Fly's checks critical for {sick_for:.0f}s{why_now}")
    # Our cordon on a sleeping machine would only let it start unroutable: lift it (in
    # panic too: that adds capacity for later ticks).
    for m in (*g.suspended, *g.stopped):
        if m.id not in touched and not m.busy and m.cordoned:
            act("uncordon", m, f"lift our cordon left on a {m.state} machine")
    # Finishing a drain left behind, and the stop tier. Not in panic: the drain may yet be
    # taken back, and suspended machines stay a fast reserve.
    if in_panic:
        return actions
    for m in g.draining:
        if m.id not in touched and not m.busy and not m.draining and not m.unreachable:
            act("drain", m, "finish a drain left behind")
    limit = policy.stop_suspended_after_s
    if limit is not None:
        for m in g.suspended:
            if (
                m.id not in touched
                and not m.busy
                and not m.unreachable
                and m.state_since is not None
                and now >= m.state_since + limit
            ):
                act("stop", m, f"suspended {now - m.state_since:.0f}s >= {limit:g}s")
    return actions


def _sick_why(sick: list[MachineSnapshot], replaced: bool) -> str:
    ids = " ".join(m.id for m in sick)
    if replaced:
        return f"replace sick {ids} (Fly's checks critical)"
    return f"sick {ids} not counted (Fly's checks critical)"


def _hung_why(hung: list[MachineSnapshot], actions: Iterable[Action]) -> str:
    """The hung machines, which the counts leave out (not up), and what becomes of each:
    restarted or stopped this tick, a restart of ours under way, waiting for its host;
    else (an action's cooldown, one of ours under way) just not counted."""
    doing = {a.machine_id: a.kind for a in actions}
    phrases: dict[str, list[str]] = {}
    for m in hung:
        kind = doing.get(m.id)
        if kind is not None:
            phrase = f"{kind} hung {{}} (timeouts or resets)"
        elif m.pending == "restart":
            phrase = "hung {} restarting"
        elif m.unreachable:
            phrase = "hung {} waits for its host (unreachable)"
        else:
            phrase = "hung {} not counted (timeouts or resets)"
        phrases.setdefault(phrase, []).append(m.id)
    return "; ".join(phrase.format(" ".join(ids)) for phrase, ids in phrases.items())


def _summary(actions: Iterable[Action]) -> str:
    by_kind: dict[str, list[str]] = {}
    for a in actions:
        by_kind.setdefault(a.kind, []).append(a.machine_id)
    return ", ".join(f"{kind} {' '.join(ids)}" for kind, ids in by_kind.items())

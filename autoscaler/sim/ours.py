"""Our policy in the simulator: the controller's tick and wake, on the virtual clock.

Each tick does what ``Controller.tick`` does live: take a sample from the app's
ConcurrencyMeter into its LoadWindows, build the Fleet snapshot the way
``AppRuntime.fleet`` builds it, call ``autoscaler.scaling.policy.decide`` and carry out the
actions. A wake (requests held, nothing routable) does what ``Waker.wake`` does: join a
start of ours under way, else take the machine ``choose_wake`` names (with none, but a
failed machine in its restart backoff, ask again when that ends).

Skipping ticks that cannot decide anything, so that quiet hours cost little: when no
request is in flight or held and no action of ours is under way, nothing changes before
the next arrival except the clock, and the load windows receive only zero samples. The
policy's timers (idle_to_zero_s, scale_down_delay_s, min_lifetime_s, leaving panic,
stop_suspended_after_s) are one-way, and demand only decays meanwhile, so once a decision
differs from "nothing to do, same state" every later one does too. The tick just before
the next arrival is asked first (with the windows as they will be then: the zeros to come
add time covered and no load); if it would change something, the first such tick is
bisected. The end of a failed machine's restart backoff, like a decision's
``next_check``, is a tick that is run whatever the probes say. Ticks before it are not
run; their samples are still fed to the windows before the next real decision, so the
windows are exactly what they would have been.
``skip_idle=False`` runs every tick; the tests compare both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from autoscaler.config import AppConfig
from autoscaler.scaling import policy
from autoscaler.scaling.fleet import (
    FAILED,
    STARTED,
    SUSPENDED,
    SUSPENDING,
    Fleet,
    MachineSnapshot,
)
from autoscaler.scaling.policy import Action, Decision, PolicyState
from autoscaler.scaling.window import LoadWindows
from autoscaler.sim.engine import AppSim
from autoscaler.sim.model import Machine

Decider = Callable[[Fleet, LoadWindows, AppConfig, float, PolicyState, float | None], Decision]
WakeChooser = Callable[[Fleet], Action | None]


def snapshot(
    app: str,
    machines: list[Machine],
    cache: dict[int, Any] | None = None,
    now: float | None = None,
) -> Fleet:
    """The Fleet the policy sees, field by field as ``AppRuntime.fleet`` fills it (at
    ``now``: a failed machine is restartable once its backoff is over; None: whatever
    its backoff, as there).

    ``cache`` keeps each machine's last snapshot: a busy app's stopped machines do not
    change from tick to tick, and building a frozen dataclass is the costly part.
    """
    snaps = []
    for m in machines:
        key: tuple[Any, ...] = (
            m.state, m.cordoned, m.ours, m.draining, m.busy, m.in_flight, m.last_used,
            m.started_at, m.state_since,
        )  # fmt: skip
        restartable = False
        at = m.restart_at
        if at is not None:
            # Its boots failed: its key says whether it is restartable now. The others'
            # keys stay as they were (this runs for every machine at every tick).
            restartable = now is None or now >= at
            key = (*key, restartable)
        if cache is not None:
            hit = cache.get(m.idx)
            if hit is not None and hit[0] == key:
                snaps.append(hit[1])
                continue
        busy = m.busy is not None and not m.draining
        pending = m.busy if busy else None
        if pending == "uncordon" and m.state != STARTED:
            pending = None  # lifting a cordon off a sleeping machine adds no capacity
        snap = MachineSnapshot(
            id=m.id,
            state=m.state,
            cordoned=m.cordoned,
            cordoned_by_us=m.cordoned and m.ours,
            draining=m.draining,
            busy=busy,
            in_flight=m.in_flight,
            last_used=m.last_used,
            started_at=m.started_at if m.state == STARTED else None,
            state_since=m.state_since,
            restartable=restartable,
            pending=pending,
        )
        if cache is not None:
            cache[m.idx] = (key, snap)
        snaps.append(snap)
    return Fleet.of(app, snaps)


class PolicyStrategy:
    """The strategy named ``autoscaler``: our policy, through the live code (also
    ``adaptive`` and ``knative``: the same policy with some knobs set)."""

    def __init__(
        self,
        decider: Decider | None = None,
        chooser: WakeChooser | None = None,
        *,
        skip_idle: bool = True,
        record: bool = False,
        name: str = "autoscaler",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        # Looked up at call time by default, so a test that patches the policy module
        # sees the simulator's calls too.
        self._decider = decider
        self._chooser = chooser
        self.skip_idle = skip_idle
        self.name = name
        self.overrides = dict(overrides or {})
        """Knobs set on every app's config for this strategy (``adaptive``, ``knative``)."""
        self.history: list[tuple[float, Decision]] | None = [] if record else None
        """With ``record``: every decision acted on (probes of idle ticks are not)."""
        self.carried_out: list[tuple[str, str]] | None = [] if record else None
        """With ``record``: every action handed to the simulated machines, as (what the
        machine made of it, machine id): ``resume`` or ``start`` (a start of a
        suspended machine resumes it, and so does one of a machine our drain is
        suspending; a resume that falls back to a cold boot is a ``start``, as the live
        wake names it), ``drain``, ``uncordon``, ``stop``."""
        self.state = PolicyState()
        self._sim: AppSim | None = None
        self._windows: LoadWindows | None = None
        self._by_id: dict[str, Machine] = {}
        self._sampled = -1  # index of the last tick whose sample the windows have
        self._asleep = False  # ticks skipped until the next arrival
        self._rewake_at: float | None = None  # a wake asked again when a backoff ends
        self._snaps: dict[int, Any] = {}

    @property
    def sim(self) -> AppSim:
        assert self._sim is not None, "begin() first"
        return self._sim

    def decide(
        self,
        fleet: Fleet,
        windows: LoadWindows,
        config: AppConfig,
        now: float,
        state: PolicyState,
        last_request_at: float | None,
    ) -> Decision:
        fn = self._decider or policy.decide
        return fn(fleet, windows, config, now, state, last_request_at)

    # --- Strategy hooks ---------------------------------------------------------------

    def begin(self, sim: AppSim) -> None:
        self._sim = sim
        if self.overrides:
            sim.config = sim.config.model_copy(update=self.overrides)
        cfg = sim.config
        self._windows = LoadWindows(cfg.stable_window_s, cfg.panic_window_s)
        self._by_id = {m.id: m for m in sim.machines}
        sim.call(0.0, self._tick, 0)

    def on_arrival(self, sim: AppSim, now: float) -> None:
        if self._asleep:
            # The skipped ticks up to now changed nothing (the probe showed it); feed
            # their samples, then tick again from the next one.
            self._asleep = False
            tick = sim.timings.tick_s
            last = int(now // tick)  # the last tick at or before now, despite rounding:
            while last * tick > now:
                last -= 1
            while (last + 1) * tick <= now:
                last += 1
            self._catch_up(last)
            sim.call((last + 1) * tick, self._tick, last + 1)

    def wake(self, sim: AppSim, now: float) -> None:
        if sim.routable or sim.coming_up():
            return  # a start of ours is under way: the held requests join it
        chooser = self._chooser or policy.choose_wake
        action = chooser(snapshot(sim.app, sim.machines, self._snaps, now))
        if action is not None:
            self._act(action, now)
        elif sim.stats.failed_boots:
            # Nothing to wake but failed machines in their restart backoff: the wake asks
            # again when the first backoff ends, as the controller's waits for it
            # (``AppRuntime.next_restart_at``), not for the next tick.
            at = self._restart_due(now)
            if at is not None and (self._rewake_at is None or not now < self._rewake_at <= at):
                self._rewake_at = at
                sim.call(at, self._rewake)

    def _restart_due(self, now: float) -> float | None:
        """When the first failed machine's restart backoff after ``now`` ends, if any."""
        return min(
            (
                m.restart_at
                for m in self.sim.machines
                if m.state == FAILED and m.restart_at is not None and m.restart_at > now
            ),
            default=None,
        )

    def _rewake(self, now: float, _arg: object = None) -> None:
        sim = self.sim
        if sim.queued and not sim.routable:
            self.wake(sim, now)

    def on_full(self, sim: AppSim, now: float) -> None:
        """Queued demand shows in the meter; the next tick scales up."""

    def on_idle(self, sim: AppSim, machine: Machine, now: float) -> None:
        """Idleness is the policy's to judge, at its tick."""

    # --- the tick ---------------------------------------------------------------------

    def _catch_up(self, upto: int) -> None:
        """Feed the real windows the samples of the ticks up to ``upto``.

        The ticks skipped while the app was quiet saw nothing in flight and nothing held:
        their samples are all zero, so one zero sample across them reads the same (it
        covers the same time and adds no load).
        """
        assert self._windows is not None
        first = self._sampled + 1
        if first > upto:
            return
        self._windows.add(self.sim.meter.take(upto * self.sim.timings.tick_s))
        self._sampled = upto

    def _tick(self, now: float, i: int) -> None:
        sim, cfg = self.sim, self.sim.config
        windows = self._windows
        assert windows is not None
        self._catch_up(i)
        fleet = snapshot(sim.app, sim.machines, self._snaps, now)
        decision = self.decide(fleet, windows, cfg, now, self.state, sim.last_request_at)
        sim.stats.decisions += 1
        if self.history is not None:
            self.history.append((now, decision))
        self.state = decision.state
        for action in decision.actions:
            self._act(action, now)
        following: int | None = i + 1
        if self.skip_idle and not decision.actions and self._quiet():
            due = decision.next_check
            if sim.stats.failed_boots:
                # A failed machine becomes restartable when its backoff ends: the
                # decision may change then, whatever the probes before it say.
                restart = self._restart_due(now)
                if restart is not None and (due is None or restart < due):
                    due = restart
            following = self._probe(i, fleet, due)
        if following is None:
            self._asleep = True
        else:
            sim.call(following * sim.timings.tick_s, self._tick, following)

    def _quiet(self) -> bool:
        """Nothing will change before the next arrival but the clock (and the windows,
        which only receive zeros until then)."""
        sim = self.sim
        if sim.in_flight or sim.queued:
            return False
        return all(m.busy is None and not m.draining for m in sim.machines)

    def _windows_at(self, j: int) -> LoadWindows:
        """The windows as tick ``j`` will see them if no request arrives before it: only
        zero samples come until then, which add time covered and no load."""
        assert self._windows is not None
        return self._windows.assuming_idle_until(j * self.sim.timings.tick_s)

    def _probe(self, i: int, fleet: Fleet, next_check: float | None) -> int | None:
        """The next tick whose decision may differ; None: none before the next arrival.

        Relies on the policy's timers being one-way (once a decision differs from "nothing
        to do, same state", every later one does too, while nothing arrives) up to the
        decision's ``next_check`` (where a pre-warm window opens or closes): so the
        furthest tick is asked first, and a change is bisected.
        """
        sim, cfg, tick = self.sim, self.sim.config, self.sim.timings.tick_s
        state, last = self.state, sim.last_request_at
        limit = min(sim.next_arrival(), sim.horizon)
        top = int(limit // tick) - i  # the furthest tick at or before the limit
        due: int | None = None
        if next_check is not None:
            # The first tick at or after next_check is run whatever happens before it;
            # the ticks before it are probed as usual (one-way up to there).
            at = math.ceil(next_check / tick) - i
            while at > 1 and (i + at - 1) * tick >= next_check:
                at -= 1
            while (i + at) * tick < next_check:
                at += 1
            if at <= top:
                due, top = i + max(1, at), at - 1
        if top < 1:
            return due if due is not None else i + 1

        def same(k: int) -> bool:
            j = i + k
            d = self.decide(fleet, self._windows_at(j), cfg, j * tick, state, last)
            return not d.actions and d.state == state

        if same(top):
            return due
        if top == 1 or not same(1):
            return i + 1  # the very next tick differs (a streak of ticks that each do)
        lo, hi = 1, top
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if same(mid):
                lo = mid
            else:
                hi = mid
        return i + hi

    def _act(self, action: Action, now: float) -> None:
        sim = self.sim
        m = self._by_id.get(action.machine_id)
        if m is None:
            sim.stats.refused += 1
            return
        kind = action.kind
        if kind in ("resume", "start"):
            asked = "resume" if m.state in (SUSPENDED, SUSPENDING) else "start"
            started = sim.start(m, now)  # resume or start: the machine's state says which
            if self.carried_out is not None:
                # Named by what happens, as the live wake names it: a resume that falls
                # back to a cold boot is a start.
                self.carried_out.append(((m.how or asked) if started else asked, m.id))
            return
        if self.carried_out is not None:
            self.carried_out.append((kind, m.id))
        if kind == "drain":
            sim.drain(m, now)
        elif kind == "uncordon":
            sim.take_back(m, now)
        elif kind == "stop":
            sim.stop_suspended(m, now)
        else:
            sim.stats.refused += 1

"""What our policy is compared with, run on the same trace, pool and timings.

- ``fly-autostop``: Fly's own proxy as Fly documents it (docs "Fly Proxy
  autostop/autostart"). Every few minutes (``--autostop-interval-s``, 300 by default; Fly
  says only "every few minutes") it looks for excess capacity: with more than one running
  machine, ``excess = running - (running over soft_limit + 1)``, and one machine is
  stopped or suspended when excess >= 1; a lone machine goes when it has no traffic
  (nothing in flight and no request since the previous check). Never
  below ``min_machines`` (Fly's ``min_machines_running``). On a request, when no machine
  runs or every running machine is over its soft limit, it starts a stopped or suspended
  machine; the request goes to the least loaded running machine under its hard limit,
  and waits (for a freed slot or the machine started) only when none has room, or none
  runs (only then is it counted as woken). Our ``target_concurrency`` stands for the soft
  limit, ``hard_limit`` for the hard one, ``scale_down_action`` for ``auto_stop_machines``.
  One simplification in Fly's favour: it only stops a machine with nothing in flight (Fly
  would stop the least loaded and give it ``kill_timeout`` to finish).
- ``fixed-keepalive-10m``: a machine starts when a request finds none free and is put to
  sleep ``--keepalive-s`` (600) after its last request ended.
- ``always-on``: one machine started from the first second and never stopped; no others.

Each start, resume, stop or suspend counts as one API action.
"""

from __future__ import annotations

from autoscaler.scaling.fleet import STARTED
from autoscaler.sim.engine import AppSim
from autoscaler.sim.model import Machine


def _wake_one(sim: AppSim, now: float) -> None:
    if sim.coming_up():
        return  # one start at a time per app; held requests take whichever is first
    m = sim.wake_candidate()
    if m is not None:
        sim.start(m, now)


class AlwaysOn:
    name = "always-on"

    def begin(self, sim: AppSim) -> None:
        sim.set_state(sim.machines[0], STARTED, 0.0)

    def on_arrival(self, sim: AppSim, now: float) -> None:
        """Nothing to decide per request."""

    def wake(self, sim: AppSim, now: float) -> None:
        """Its one machine is always up: nothing to wake."""

    def on_full(self, sim: AppSim, now: float) -> None:
        """No second machine: requests queue behind the hard limit."""

    def on_idle(self, sim: AppSim, machine: Machine, now: float) -> None:
        """Never sleeps."""


class FixedKeepalive:
    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        minutes = keepalive_s / 60
        label = f"{minutes:g}m" if minutes == int(minutes) else f"{keepalive_s:g}s"
        self.name = f"fixed-keepalive-{label}"
        self._sim: AppSim | None = None

    def begin(self, sim: AppSim) -> None:
        self._sim = sim

    def on_arrival(self, sim: AppSim, now: float) -> None:
        """Nothing to decide per request."""

    def wake(self, sim: AppSim, now: float) -> None:
        _wake_one(sim, now)

    def on_full(self, sim: AppSim, now: float) -> None:
        _wake_one(sim, now)

    def on_idle(self, sim: AppSim, machine: Machine, now: float) -> None:
        sim.call(now + self.keepalive_s, self._expire, (machine, machine.op, machine.last_used))

    def _expire(self, now: float, arg: tuple[Machine, int, float | None]) -> None:
        m, op, used = arg
        sim = self._sim
        assert sim is not None
        if m.op != op or m.last_used != used or m.in_flight or m.state != STARTED:
            return  # used again since (a later timer covers it) or already going
        if sum(1 for x in sim.machines if x.state == STARTED) <= sim.config.min_machines:
            return
        sim.sleep(m, now, sim.config.scale_down_action)


class FlyAutostop:
    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"fly-autostop: expected a check interval > 0 s, got {interval_s:g}")
        self.name = "fly-autostop"
        self.interval_s = interval_s
        self._sim: AppSim | None = None
        self._last_check = 0.0

    def begin(self, sim: AppSim) -> None:
        self._sim = sim
        sim.call(self.interval_s, self._check)

    def on_arrival(self, sim: AppSim, now: float) -> None:
        running = sim.routable
        if not running:
            return  # held; wake() starts one
        soft = sim.config.target_concurrency
        if all(m.in_flight >= soft for m in running) and not sim.coming_up():
            # Soft limit exceeded everywhere: start another machine, and meanwhile route
            # the request to the least loaded machine under its hard limit (held only
            # when none has room, until a slot frees or the new machine is up).
            m = sim.wake_candidate()
            if m is not None:
                sim.start(m, now)

    def wake(self, sim: AppSim, now: float) -> None:
        _wake_one(sim, now)

    def on_full(self, sim: AppSim, now: float) -> None:
        """Starting is decided per request, in on_arrival."""

    def on_idle(self, sim: AppSim, machine: Machine, now: float) -> None:
        """Idle machines wait for the next excess-capacity check."""

    def _check(self, now: float, _arg: object = None) -> None:
        sim = self._sim
        assert sim is not None
        running = [m for m in sim.machines if m.state == STARTED and m.busy is None]
        if len(running) > sim.config.min_machines:
            soft = sim.config.target_concurrency
            if len(running) == 1:
                # "No traffic": nothing in flight, and no request since the last check.
                lone = running[0]
                quiet = lone.last_used is None or lone.last_used <= self._last_check
                victim = lone if quiet and not lone.in_flight and not sim.queued else None
            else:
                over = sum(1 for m in running if m.in_flight > soft)
                excess = len(running) - (over + 1)
                idle = [m for m in running if not m.in_flight]
                victim = None
                if excess >= 1 and idle:
                    victim = min(idle, key=lambda m: (m.last_used or -1.0, m.idx))
            if victim is not None:
                sim.sleep(victim, now, sim.config.scale_down_action)
        self._last_check = now
        sim.call(now + self.interval_s, self._check)

"""The event-driven replay of one app's requests on a virtual clock.

A heap of events (request ends, timers, the steps of machine actions) merged with the
sorted list of arrivals; nothing happens between events, so a quiet day costs nothing.
The engine plays the proxy (routing to the least-loaded routable machine under the hard
limit, holding requests while no machine can take them, 504 after ``wake_timeout_s``,
503 past ``max_queue``) and the Machines API (each action takes the API latency, then its
modelled duration; a cold boot may end ``failed`` instead, at ``boot_failure_rate``). A
:class:`Strategy` decides when machines start and go to sleep: our policy
(``autoscaler.sim.ours``) or a baseline (``autoscaler.sim.baselines``).

At equal times, events in the heap go before arrivals (a request ending at ``t`` frees its
slot for one arriving at ``t``), and heap events in the order they were scheduled.
"""

from __future__ import annotations

import heapq
import itertools
import random
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from autoscaler.config import AppConfig
from autoscaler.scaling.fleet import (
    FAILED,
    STARTED,
    STARTING,
    STOPPED,
    STOPPING,
    SUSPENDED,
    SUSPENDING,
    restart_backoff_s,
)
from autoscaler.scaling.window import ConcurrencyMeter
from autoscaler.sim.model import Machine, Stats, Timings
from autoscaler.sim.trace import Request

_END = 0
_CALL = 1
_INF = float("inf")
# Action kinds during which a started machine takes no new requests.
_LEAVING = frozenset({"drain", "suspend", "stop"})

Then = Callable[[float, Machine], None]


class Strategy(Protocol):
    """Who starts machines and puts them to sleep. Every hook runs at virtual ``now``."""

    name: str

    def begin(self, sim: AppSim) -> None:
        """Before the first request (schedule ticks, start an always-on machine)."""

    def on_arrival(self, sim: AppSim, now: float) -> None:
        """A request arrives (not yet counted, not yet routed): e.g. start a machine for
        it. The request then goes to a routable machine with room, or is held."""

    def wake(self, sim: AppSim, now: float) -> None:
        """Requests wait and no machine is routable. Must be idempotent (single-flight)."""

    def on_full(self, sim: AppSim, now: float) -> None:
        """A request waits because every routable machine is at its hard limit."""

    def on_idle(self, sim: AppSim, machine: Machine, now: float) -> None:
        """The last request in flight on ``machine`` ended."""


class AppSim:
    """One app, one strategy, one run. ``run()`` returns the app's :class:`Stats`."""

    def __init__(
        self,
        app: str,
        requests: list[Request],
        config: AppConfig,
        timings: Timings,
        strategy: Strategy,
        horizon: float,
    ) -> None:
        self.app = app
        self.requests = requests
        self.config = config
        self.timings = timings
        self.strategy = strategy
        self.horizon = horizon
        self.stats = Stats(app, strategy.name)
        self.machines = [Machine(i, f"{app}-m{i}") for i in range(config.max_machines)]
        self.routable: list[Machine] = []
        self.meter = ConcurrencyMeter(0.0)
        self.now = 0.0
        self.in_flight = 0
        self.queued = 0
        self.last_request_at: float | None = None
        """The proxy view's: the latest time a request was held or sent to a machine."""
        self.idle_since = 0.0
        """Since when no request has been in flight or held (meaningful when both are 0)."""
        self.up_count = 0
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self._held: deque[int] = deque()
        self._held_info: dict[int, tuple[float, float]] = {}
        self._rid = itertools.count()
        self._next = 0  # index of the next arrival in ``requests``
        # Each app its own stream: the same app draws the same under every strategy.
        self.rng = random.Random(zlib.crc32(app.encode()) ^ timings.seed)  # noqa: S311

    # --- the loop -------------------------------------------------------------------

    def call(self, at: float, fn: Callable[[float, Any], None], arg: Any = None) -> None:
        """Run ``fn(at, arg)`` at virtual time ``at``."""
        heapq.heappush(self._heap, (at, next(self._seq), _CALL, fn, arg))

    def run(self) -> Stats:
        heap, reqs, horizon = self._heap, self.requests, self.horizon
        pop, n, i = heapq.heappop, len(reqs), 0
        end, arrive = self._end, self._arrive
        self.strategy.begin(self)
        while True:
            ta = reqs[i][0] if i < n else _INF
            if heap and heap[0][0] <= ta:
                if heap[0][0] > horizon:
                    break
                t, _, kind, x, y = pop(heap)
                self.now = t
                if kind == _END:
                    end(x, y, t)
                else:
                    x(t, y)
            elif ta <= horizon:
                t, d = reqs[i]
                i += 1
                self._next = i
                self.now = t
                arrive(t, d)
            else:
                break
        if self.queued:
            self._run_on()
        self._close(horizon)
        return self.stats

    def _run_on(self) -> None:
        """Requests still held at the horizon: follow them past it until each is served
        or times out, so every request is served or an error and a wait the horizon cut
        short (the last request's wake, when the horizon is the trace's end) is counted
        whole. Nothing else is: no arrival past the horizon, machine-seconds and machine
        changes only up to it (``_account``, ``set_state``), and the actions, refusals
        and decisions of the run-on are not counted."""
        st = self.stats
        kept = (
            st.api_actions, st.refused, st.cold_resumes, st.failed_actions, st.failed_boots,
            st.decisions,
        )  # fmt: skip
        heap, pop, end = self._heap, heapq.heappop, self._end
        while self.queued and heap:  # each held request has its timeout in the heap
            t, _, kind, x, y = pop(heap)
            self.now = t
            if kind == _END:
                end(x, y, t)
            else:
                x(t, y)
        (
            st.api_actions, st.refused, st.cold_resumes, st.failed_actions, st.failed_boots,
            st.decisions,
        ) = kept  # fmt: skip

    def next_arrival(self) -> float:
        """When the next request arrives (infinity after the last)."""
        reqs = self.requests
        return reqs[self._next][0] if self._next < len(reqs) else _INF

    def _close(self, horizon: float) -> None:
        self.now = horizon
        for m in self.machines:
            self._account(m, horizon)

    # --- the proxy's part -----------------------------------------------------------

    def _pick(self) -> Machine | None:
        limit = self.config.hard_limit
        if self.timings.two_choices and len(self.routable) > 1:
            # The proxy's balancer: two distinct routable machines at random, the one with
            # fewer requests in flight (the first on a tie); the other if one is full.
            a, b = self.rng.sample(self.routable, 2)
            if b.in_flight < a.in_flight:
                a, b = b, a
            if a.in_flight < limit:
                return a
            if b.in_flight < limit:
                return b
        best: Machine | None = None
        for m in self.routable:
            if m.in_flight < limit and (best is None or m.in_flight < best.in_flight):
                best = m
        return best

    def _arrive(self, t: float, duration: float) -> None:
        st = self.stats
        st.requests += 1
        self.strategy.on_arrival(self, t)
        # Held requests are first in line; there are some only while no routable machine
        # has room (a freed slot or a machine come up serves them at once).
        if not self.queued:
            m = self._pick()
            if m is not None:
                self.meter.add(1, t)
                self._begin(m, t, duration)
                st.served += 1
                return
        if self.queued >= self.config.max_queue:
            st.errors += 1  # 503: never counted as demand, like the proxy's refusal
            return
        self.meter.add(1, t)
        self.last_request_at = t
        rid = next(self._rid)
        self._held.append(rid)
        self._held_info[rid] = (t, duration)
        self.queued += 1
        self.call(t + self.config.wake_timeout_s, self._timeout, rid)
        if not self.routable:
            st.wake_waits += 1  # woken: arrived with no machine routable
            self.strategy.wake(self, t)
        else:
            self.strategy.on_full(self, t)  # every routable machine at its hard limit

    def _begin(self, m: Machine, t: float, duration: float) -> None:
        m.in_flight += 1
        m.last_used = t
        self.in_flight += 1
        self.last_request_at = t
        heapq.heappush(self._heap, (t + duration, next(self._seq), _END, m, m.gen))

    def _end(self, m: Machine, gen: int, t: float) -> None:
        if gen != m.gen:
            return  # cut short when its machine was stopped; counted then
        m.in_flight -= 1
        m.last_used = t
        self.in_flight -= 1
        self.meter.add(-1, t)
        if not self.in_flight and not self.queued:
            self.idle_since = t
        if not m.in_flight:
            if m.waiting:
                self._drain_done(m, t)
            else:
                self.strategy.on_idle(self, m, t)
        if self.queued:
            self._dispatch(t)

    def _timeout(self, now: float, rid: int) -> None:
        if self._held_info.pop(rid, None) is None:
            return
        self.queued -= 1
        self.stats.errors += 1  # 504
        self.meter.add(-1, now)
        if not self.in_flight and not self.queued:
            self.idle_since = now

    def _dispatch(self, now: float) -> None:
        held, info, st = self._held, self._held_info, self.stats
        while held:
            rid = held[0]
            if rid not in info:
                held.popleft()  # timed out earlier
                continue
            m = self._pick()
            if m is None:
                return
            held.popleft()
            arrival, duration = info.pop(rid)
            self.queued -= 1
            self._begin(m, now, duration)
            st.served += 1
            if now > arrival:
                st.waits.append(now - arrival)

    # --- machine states and their cost ----------------------------------------------

    def _account(self, m: Machine, now: float) -> None:
        now = min(now, self.horizon)  # past it only to serve requests held at it
        span = now - m.acc_since
        if span > 0:
            if m.up:
                self.stats.up_s += span
            elif m.state == SUSPENDED:
                self.stats.suspended_s += span
        m.acc_since = now

    def set_state(self, m: Machine, state: str, now: float) -> None:
        was_up = m.up
        self._account(m, now)
        m.state = state
        m.state_since = now
        m.started_at = now if state == STARTED else None
        if m.up != was_up:
            self.up_count += 1 if m.up else -1
            if now <= self.horizon:
                self.stats.changes.append((now, 1 if m.up else -1))
                if self.up_count > self.stats.peak_machines:
                    self.stats.peak_machines = self.up_count
        self._update_routable(m)

    def _update_routable(self, m: Machine) -> None:
        routable = (
            m.state == STARTED and not m.cordoned and not m.draining and m.busy not in _LEAVING
        )
        if routable != m.routable:
            m.routable = routable
            if routable:
                self.routable.append(m)
                self.routable.sort(key=lambda x: x.idx)
            else:
                self.routable.remove(m)

    def _settled(self, now: float) -> None:
        """An action finished: serve held requests, or ask for a wake again."""
        if self.queued:
            if self.routable:
                self._dispatch(now)
                if self.queued:
                    self.strategy.on_full(self, now)  # still more than the machines take
            else:
                self.strategy.wake(self, now)

    def _cut(self, m: Machine, now: float) -> None:
        """Requests still running on a machine that is being stopped fail."""
        if m.in_flight:
            self.stats.errors += m.in_flight
            self.meter.add(-m.in_flight, now)
            self.in_flight -= m.in_flight
            m.in_flight = 0
            m.gen += 1
            if not self.in_flight and not self.queued:
                self.idle_since = now

    # --- actions, as the Machines API carries them out ------------------------------

    def start(self, m: Machine, now: float) -> bool:
        """Start a stopped or failed machine or resume a suspended one, or take back our
        drain's suspend under way; False if it cannot be. ``m.how`` then says how it
        comes up: "resume", or "start" (a cold boot, a resume that falls back to one too);
        a call the API fails, what it asked for."""
        if m.state == SUSPENDING and m.busy == "drain":
            return self._interrupt(m, now)
        if m.busy is not None or m.state not in (STOPPED, SUSPENDED, FAILED):
            self.stats.refused += 1
            return False
        resume = m.state == SUSPENDED
        m.busy = m.how = "resume" if resume else "start"
        m.op += 1
        self.stats.api_actions += 1
        timings = self.timings
        if timings.action_failure_rate and self.rng.random() < timings.action_failure_rate:
            self.stats.failed_actions += 1
            self.call(now + timings.api_latency_s, self._start_failed, (m, m.op))
            return True
        duration = timings.resume_s if resume else timings.start_s
        cold = not resume
        if resume and self._boots_cold(m, now):
            self.stats.cold_resumes += 1
            duration = timings.start_s
            cold = True
            m.how = "start"  # as the live wake names it (``Machine.last_boot``)
        rate = timings.boot_failure_rate
        fails = cold and bool(rate) and self.rng.random() < rate
        self.call(now + timings.api_latency_s, self._starting, (m, m.op, duration, fails))
        return True

    def _interrupt(self, m: Machine, now: float) -> bool:
        """Start a machine that our drain is suspending, as the controller's ``interrupt``
        does (cancel the drain, resume the machine; Fly and the emulator allow a start
        during a suspend: the suspend is abandoned, no snapshot is made and the same
        process carries on, so it never boots cold). Our cordon is lifted in the view at
        once and in the API (uncordon, key removal) once the machine is up."""
        timings = self.timings
        self.stats.api_actions += 1
        m.how = "resume"
        if timings.action_failure_rate and self.rng.random() < timings.action_failure_rate:
            # The call failed: the suspend (and the drain's release after it) carries on.
            self.stats.failed_actions += 1
            self.call(now + timings.api_latency_s, self._interrupt_failed, m)
            return True
        m.op += 1  # the pending suspend's end (``_slept``) and its release give up
        m.busy = "resume"
        m.draining = m.waiting = False
        m.cordoned = m.ours = False
        self.stats.api_actions += 2
        self.call(now + timings.api_latency_s, self._starting, (m, m.op, timings.resume_s, False))
        return True

    def _interrupt_failed(self, now: float, m: Machine) -> None:
        self._settled(now)  # held requests ask for a wake again

    def _boots_cold(self, m: Machine, now: float) -> bool:
        """A resume that falls back to a cold start: at the modelled rate, or always when
        the snapshot is older than ``snapshot_max_age_s``."""
        t = self.timings
        since = m.state_since if m.state_since is not None else now
        if t.snapshot_max_age_s and now - since > t.snapshot_max_age_s:
            return True
        return bool(t.resume_cold_rate) and self.rng.random() < t.resume_cold_rate

    def _start_failed(self, now: float, arg: tuple[Machine, int]) -> None:
        """The API answered the start or resume with an error: the machine is unchanged,
        and held requests ask for a wake again."""
        m, op = arg
        if m.op == op:
            m.busy = None
            self._settled(now)

    def _starting(self, now: float, arg: tuple[Machine, int, float, bool]) -> None:
        m, op, duration, fails = arg
        if m.op == op:
            self.set_state(m, STARTING, now)
            self.call(now + duration, self._boot_failed if fails else self._started, (m, op))

    def _boot_failed(self, now: float, arg: tuple[Machine, int]) -> None:
        """The cold boot ended ``failed``, ``starting`` for a boot's time first, as on Fly
        and in the emulator. It is billed no more; held requests ask for a wake again,
        which another machine answers (the baselines' as Fly's proxy does; ours while
        this one waits out its restart backoff). Our controller may start it again
        after its backoff (``restart_backoff_s``), as long as ``restart_failed`` is on and
        fewer than ``max_restart_attempts`` of its boots failed in a row, as it does live
        (``AppRuntime.boot_failed``)."""
        m, op = arg
        if m.op != op:
            return
        m.busy = None
        m.failures += 1
        self.stats.failed_boots += 1
        cfg = self.config
        budget = cfg.restart_failed and m.failures < cfg.max_restart_attempts
        m.restart_at = now + restart_backoff_s(m.failures) if budget else None
        self.set_state(m, FAILED, now)
        self._settled(now)

    def _started(self, now: float, arg: tuple[Machine, int]) -> None:
        m, op = arg
        if m.op == op:
            m.busy = None
            m.failures, m.restart_at = 0, None  # up: its restart budget is whole again
            self.set_state(m, STARTED, now)
            self._settled(now)
            if not m.in_flight and m.routable:
                self.strategy.on_idle(self, m, now)

    def sleep(self, m: Machine, now: float, how: str, then: Then | None = None) -> bool:
        """Suspend or stop a started machine; requests still on it are cut."""
        if m.state != STARTED:
            self.stats.refused += 1
            return False
        m.busy = m.busy if then is not None else how
        m.op += 1
        self.stats.api_actions += 1
        self._update_routable(m)
        self._cut(m, now)
        self.call(now + self.timings.api_latency_s, self._sleeping, (m, m.op, how, then))
        return True

    def _sleeping(self, now: float, arg: tuple[Machine, int, str, Then | None]) -> None:
        m, op, how, _ = arg
        if m.op != op:
            return
        suspend = how == "suspend"
        self.set_state(m, SUSPENDING if suspend else STOPPING, now)
        duration = self.timings.suspend_s if suspend else self.timings.stop_s
        self.call(now + duration, self._slept, arg)

    def _slept(self, now: float, arg: tuple[Machine, int, str, Then | None]) -> None:
        m, op, how, then = arg
        if m.op != op:
            return
        self.set_state(m, SUSPENDED if how == "suspend" else STOPPED, now)
        if then is not None:
            then(now, m)
        else:
            m.busy = None
            self._settled(now)

    def stop_suspended(self, m: Machine, now: float) -> bool:
        """Stop a suspended machine (drops its snapshot)."""
        if m.state != SUSPENDED or m.busy is not None:
            self.stats.refused += 1
            return False
        m.busy = "stop"
        m.op += 1
        self.stats.api_actions += 1
        at = now + self.timings.api_latency_s + self.timings.stop_s
        self.call(at, self._stopped_from_suspended, (m, m.op))
        return True

    def _stopped_from_suspended(self, now: float, arg: tuple[Machine, int]) -> None:
        m, op = arg
        if m.op == op:
            m.busy = None
            self.set_state(m, STOPPED, now)
            self._settled(now)

    # --- our drain sequence, as the controller's actuator runs it ------------------
    # set our metadata key + cordon (2 calls; out of routing in the view at once) -> wait
    # for requests in flight or drain_timeout_s -> suspend or stop (1 call) -> uncordon +
    # delete the key (2 calls). Until the wait ends the drain may be taken back.

    def drain(self, m: Machine, now: float) -> bool:
        if m.state != STARTED or m.busy is not None:
            self.stats.refused += 1
            return False
        m.busy = "drain"
        m.op += 1
        m.draining = True
        m.cordoned = m.ours = True
        self.stats.api_actions += 2
        self._update_routable(m)
        self.call(now + 2 * self.timings.api_latency_s, self._drain_wait, (m, m.op))
        return True

    def _drain_wait(self, now: float, arg: tuple[Machine, int]) -> None:
        m, op = arg
        if m.op != op:
            return
        m.waiting = True
        if not m.in_flight:
            self._drain_done(m, now)
        else:
            self.call(now + self.config.drain_timeout_s, self._drain_timeout, arg)

    def _drain_timeout(self, now: float, arg: tuple[Machine, int]) -> None:
        m, op = arg
        if m.op == op and m.waiting:
            self._drain_done(m, now)

    def _drain_done(self, m: Machine, now: float) -> None:
        m.draining = m.waiting = False
        self.sleep(m, now, self.config.scale_down_action, then=self._release_after_sleep)

    def _release_after_sleep(self, now: float, m: Machine) -> None:
        self.stats.api_actions += 2
        self.call(now + 2 * self.timings.api_latency_s, self._released, (m, m.op))

    def take_back(self, m: Machine, now: float) -> bool:
        """Cancel a drain that still waits: the machine serves again at once."""
        if not m.draining:
            self.stats.refused += 1
            return False
        m.op += 1  # cancels the drain's timer
        m.draining = m.waiting = False
        m.cordoned = False
        m.busy = "uncordon"
        self.stats.api_actions += 2
        self._update_routable(m)
        self.call(now + 2 * self.timings.api_latency_s, self._released, (m, m.op))
        self._settled(now)
        return True

    def _released(self, now: float, arg: tuple[Machine, int]) -> None:
        m, op = arg
        if m.op == op:
            m.cordoned = m.ours = False
            m.busy = None
            self._update_routable(m)
            self._settled(now)

    # --- helpers for strategies -----------------------------------------------------

    def coming_up(self) -> bool:
        """A machine is being started or resumed."""
        return any(m.busy in ("start", "resume") for m in self.machines)

    def wake_candidate(self) -> Machine | None:
        """Suspended before stopped, most recently used first (the baselines' choice)."""
        return max(
            (m for m in self.machines if m.wakeable),
            key=lambda m: (m.state == SUSPENDED, m.last_used or -1.0, -m.idx),
            default=None,
        )

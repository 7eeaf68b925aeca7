"""One app's control state: what the API said last, what we are doing about it, and why.

The controller keeps an :class:`AppRuntime` per scaled app. It merges each machine list
from the API with its own bookkeeping (actions in flight, drains, local changes newer than
the list) and turns the result into the two shapes others read: the pure
:class:`~autoscaler.scaling.fleet.Fleet` for the policy and the
:class:`~autoscaler.control.view.MachineInfo` list for the proxy's view.

What is kept of each machine is a :class:`MachineRecord`: the few fields the controller
and the proxy read, one object per machine. The API's pydantic model of a machine is some
16 objects the garbage collector tracks; a process scaling 1,000 apps of 10 machines
kept 160,000 of them, and every full collection walked them all while the data path
waited (docs/benchmarks.md, "Many apps").

A list can be older than what we know: a list request that left before our start call
returned may still say "suspended". A machine we changed after the list was requested,
or one with an action of ours under way, keeps our local record until the next list.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from autoscaler.checks import CheckSpec, check_spec
from autoscaler.config import AppConfig
from autoscaler.control.view import HUNG_AFTER, AppView, MachineInfo, Upstream
from autoscaler.fly.models import Machine
from autoscaler.scaling.fleet import (
    CORDON_METADATA_KEY,
    FAILED,
    FINAL_STATES,
    RESTART_MAX_S,
    STARTED,
    STARTING,
    SUSPENDED,
    Fleet,
    MachineSnapshot,
    restart_backoff_s,
)
from autoscaler.scaling.policy import Decision, PolicyState
from autoscaler.scaling.window import LoadWindows

# What an action task of ours is doing to a machine; "drain" covers the whole sequence.
TaskKind = Literal["resume", "start", "uncordon", "drain", "stop", "restart", "cleanup"]
DEFAULT_PORT = 8080
CheckResult = tuple[str, datetime | None]
"""One check's result as Fly listed it: (the check's name, when Fly ran it)."""


@dataclass(slots=True)
class Restarts:
    """A failed machine: how many of our starts failed in a row, and when to try again."""

    failures: int
    retry_at: float
    exhausted: bool = False
    """``max_restart_attempts`` failures in a row: left alone until its state changes."""


@dataclass(frozen=True, slots=True)
class MachineRecord:
    """What the controller keeps of one machine: the fields it acts on, nothing more."""

    id: str
    state: str
    private_ip: str | None = None
    instance_id: str | None = None
    internal_port: int | None = None
    cordoned: bool | None = None
    """As the API says; None where it leaves the flag out (see :meth:`AppRuntime.cordoned`)."""
    marked: bool = False
    """The machine carries our cordon metadata key."""
    checks_critical: bool = False
    """A Fly health check that routes (:func:`routes`) is critical, and no run of ours has
    seen it pass since."""
    host_unreachable: bool = False
    critical: tuple[CheckResult, ...] = ()
    """Fly's critical results of the checks that route, as listed (control/recheck.py)."""
    critical_specs: tuple[CheckSpec, ...] = ()
    """Those checks as the machine's config defines them (the ones it defines)."""
    unrouted: tuple[str, ...] = ()
    """Critical checks that do not route (:func:`routes`): shown, never acted on."""
    start_began: float | None = None
    """Starting or restarting: when Fly began that start, a Unix time, as its events say
    (:meth:`Machine.current_start`); None when they do not say."""
    resuming: bool = False
    """That start began from ``suspended`` (or ``suspending``): a resume."""
    how: str | None = None
    """How its current start brings it up (``starting``), or its last one did
    (``started``): "resume" or "start"; None when unknown (any other state). From a
    start of ours, its kind until it is up, then what the machine's events say (a resume
    that fell back to a cold boot is a start); from someone else's, the events
    (``resuming``, :meth:`Machine.last_boot`). Published to the followers in cluster
    mode, which label their held requests by it."""
    mark_until: float | None = None
    """Our key's value says no cordon request of the drain that wrote it can land after
    this Unix time (:func:`mark_value`); None: it does not say (an older version's key)."""
    unsuspendable: str | None = None
    """Why Fly will not suspend the machine, as its listed config says (swap, a schedule,
    a GPU: :meth:`MachineConfig.suspend_refusal`): its drains stop it without asking for
    a suspend. None when the config says nothing against it (or was not listed)."""
    mark_by: str | None = None
    """Who wrote our key, as its value names them (cluster mode: the leader's process and
    fencing token, :func:`mark_value`); None: it does not say (one process, or an older
    version's key)."""

    @classmethod
    def of(cls, machine: Machine, passed: frozenset[CheckResult] = frozenset()) -> MachineRecord:
        """The record of a listed machine; ``passed``: critical results of Fly's that a run
        of ours has seen pass since (they no longer make the machine critical)."""
        config = machine.config
        meta = config.metadata if config is not None else None
        critical: tuple[CheckResult, ...] = ()
        specs: tuple[CheckSpec, ...] = ()
        unrouted: tuple[str, ...] = ()
        if machine.checks_critical:  # rare: the usual machine pays one scan of its checks
            failing = [c for c in machine.checks or () if c.status == "critical"]
            critical = tuple(
                (c.name or "", c.updated_at) for c in failing if routes(machine, c.name or "")
            )
            unrouted = tuple(sorted({c.name or "" for c in failing} - {n for n, _ in critical}))
            specs = _specs(machine, [name for name, _ in critical])
        start = machine.current_start()  # None at once unless starting or restarting
        return cls(
            machine.id,
            machine.state,
            machine.private_ip,
            machine.instance_id,
            machine.internal_port,
            machine.cordoned,
            meta is not None and CORDON_METADATA_KEY in meta,
            any(result not in passed for result in critical),
            machine.host_unreachable,
            critical,
            specs,
            unrouted,
            start[0] if start is not None else None,
            start is not None and start[1],
            machine.last_boot() if start is None else "resume" if start[1] else "start",
            mark_until(meta.get(CORDON_METADATA_KEY)) if meta is not None else None,
            config.suspend_refusal() if config is not None else None,
            mark_by(meta.get(CORDON_METADATA_KEY)) if meta is not None else None,
        )


_MARK_UNTIL = re.compile(r"drain-until-(\d{1,12})(?:-by-([0-9A-Za-z]{1,32}\.\d{1,20}))?")


def mark_value(until: float, by: str | None = None) -> str:
    """Our key's value: no cordon request of the drain that writes it lands after
    ``until`` (Unix seconds, rounded up); ``by`` (cluster mode) names the writer, the
    leader's process and fencing token (``<boot>.<token>``): once that process says that
    none of its cordon requests can land any more, the next leader needs not wait for
    ``until`` (``Actuator.listed``)."""
    return f"drain-until-{math.ceil(until)}" + (f"-by-{by}" if by is not None else "")


def _mark(value: object) -> re.Match[str] | None:
    return _MARK_UNTIL.fullmatch(value) if isinstance(value, str) else None


def mark_until(value: object) -> float | None:
    """The time :func:`mark_value` wrote into ``value``; None for any other value."""
    found = _mark(value)
    return float(found.group(1)) if found is not None else None


def mark_by(value: object) -> str | None:
    """The writer :func:`mark_value` named in ``value``; None if it names none."""
    found = _mark(value)
    return found.group(2) if found is not None else None


def routes(machine: Machine, name: str) -> bool:
    """Whether the check ``name``'s verdict says where traffic may go, as it does for Fly's
    proxy: a service's check does; a machine check (``config.checks``, fly.toml's top-level
    ``[checks]``) only if its ``kind`` is ``readiness`` (the others are for monitoring: Fly
    does not route by them, nor should we, nor count the machine as sick for them). A
    result whose check the config does not hold is taken as one that does."""
    config = machine.config
    check = (config.checks or {}).get(name) if config is not None else None
    return check is None or check.kind == "readiness"


# The name Fly gives a service's check in a machine's `checks` (docs/fly-api-notes.md).
_SERVICE_CHECK = re.compile(r"servicecheck-\d+-([a-z]+)-(\d+)")


def _specs(machine: Machine, names: Iterable[str]) -> tuple[CheckSpec, ...]:
    """The named checks as the machine's config defines them: a machine check by its
    name; a service's check by the name Fly gives it (``servicecheck-00-http-8080``) when
    exactly one check of the config's services has that type and port. A name that
    matches nothing (or more than one) has no spec."""
    config = machine.config
    if config is None:
        return ()
    port = machine.internal_port or DEFAULT_PORT
    defined = config.checks or {}
    specs = []
    for name in names:
        if name in defined:
            specs.append(check_spec(name, defined[name].to_json(), port))
        elif match := _SERVICE_CHECK.fullmatch(name):
            kind, at = match[1], int(match[2])
            found = [
                check_spec(name, check.to_json(), service.internal_port or port)
                for service in config.services or ()
                for check in service.checks or ()
            ]
            found = [spec for spec in found if (spec.kind, spec.port) == (kind, at)]
            if len(found) == 1:
                specs.extend(found)
    return tuple(specs)


def hangs(machine: MachineRecord, up: Upstream | None) -> bool:
    """Started, and ejected HUNG_AFTER times in a row for its own failures (by any replica's
    proxy; a timeout ejection of the app's last routable machine counts as HUNG_AFTER):
    its process accepts and never answers."""
    return machine.state == STARTED and up is not None and up.ejections_in_a_row >= HUNG_AFTER


def ours(machine: MachineRecord) -> bool:
    """The machine carries our cordon metadata key."""
    return machine.marked


BILLED_STATES = (STARTED, SUSPENDED)
"""The states whose machine-seconds ``autoscaler_machine_seconds_total`` counts."""


@dataclass(slots=True)
class MachineTime:
    """An app's machine-seconds by state (``autoscaler_machine_seconds_total``), billed by
    when each machine changed state as far as we know it: a change of ours when we made it
    (:meth:`AppRuntime.record`); a change that only a list shows (someone else's start,
    a crash, a machine destroyed or created) halfway between the last time we knew the
    machine's state and that list, but never before what is billed already. Billing by
    the state at each tick instead billed a machine woken between two polls of a sleeping
    app (every ``control.idle_poll_s``, the first up to twice that) as started since the
    poll before, and one put to sleep between two ticks as asleep since the tick before.
    """

    on: bool = False
    """Billing: from the first :meth:`take` until :meth:`off` (a leader stepping down:
    the time until it leads again is another replica's to bill)."""
    since: dict[str, float] = field(default_factory=dict)
    """Machine -> the time up to which its state is billed."""
    owed: dict[str, float] = field(default_factory=dict)
    """State -> seconds billed and not yet taken."""
    ahead: dict[str, str] = field(default_factory=dict)
    """Machine -> the state Fly has it in while our record still says the one before (a
    start of ours is ``started`` on Fly from its /wait, ``starting`` in our record until
    its port answers): billed in the former until the record next changes."""

    def reached(self, machine_id: str, old_state: str, state: str, at: float) -> None:
        """Fly says ``machine_id`` went from ``old_state`` to ``state`` at ``at``, ahead of
        our record: billed so from then, though the record changes later."""
        self.change(machine_id, old_state, at)
        if machine_id in self.since:
            self.ahead[machine_id] = state

    def change(self, machine_id: str, old_state: str, at: float) -> None:
        """``machine_id`` left ``old_state`` at ``at``: that state is billed up to then."""
        self._bill(machine_id, self.ahead.pop(machine_id, old_state), at)

    def _bill(self, machine_id: str, old_state: str, at: float) -> None:
        start = self.since.get(machine_id)
        if start is None:
            if self.on:
                self.since[machine_id] = at  # unknown until now: billed from here
            return
        if at > start:
            if old_state in BILLED_STATES:
                self.owed[old_state] = self.owed.get(old_state, 0.0) + (at - start)
            self.since[machine_id] = at

    def appeared(self, machine_id: str, at: float) -> None:
        """A machine we did not know of existed from ``at`` on."""
        if self.on:
            self.since.setdefault(machine_id, at)

    def gone(self, machine_id: str, old_state: str, at: float) -> None:
        """A machine left ``old_state`` for good at ``at`` (destroyed)."""
        self.change(machine_id, old_state, at)
        self.since.pop(machine_id, None)
        self.ahead.pop(machine_id, None)

    def take(self, machines: Iterable[MachineRecord], now: float) -> dict[str, float]:
        """Bill every machine in its state up to ``now``: the seconds by state billed since
        the last take (none at the first: billing starts then)."""
        if not self.on:
            self.on = True
            self.since = {machine.id: now for machine in machines}
            self.owed = {}
            return {}
        for machine in machines:
            self._bill(machine.id, self.ahead.get(machine.id, machine.state), now)
        owed, self.owed = self.owed, {}
        return owed

    def off(self) -> None:
        self.on = False
        self.since.clear()
        self.owed.clear()
        self.ahead.clear()


@dataclass(slots=True)
class Running:
    """One action task on one machine (at most one per machine)."""

    kind: TaskKind
    task: asyncio.Task[bool]
    """True when the action reached its goal; False when it failed (logged already)."""
    waiting: bool = False
    """A drain still waiting for requests in flight: it may be taken back (cancelled)."""
    error: Exception | None = None
    """Why the action failed, when an API call failed it (a wake retries transient ones)."""


@dataclass(slots=True)
class AppRuntime:
    config: AppConfig
    windows: LoadWindows
    policy_state: PolicyState = field(default_factory=PolicyState)
    machines: dict[str, MachineRecord] = field(default_factory=dict)
    touched: dict[str, float] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)
    cordon_held: set[str] = field(default_factory=set)
    """Machines we took out of routing in the view (drains), before the API agrees."""
    state_since: dict[str, float] = field(default_factory=dict)
    sick_since: dict[str, float] = field(default_factory=dict)
    """Started machines whose Fly health checks are critical -> since when (by the lists)."""
    rechecked: dict[str, frozenset[CheckResult]] = field(default_factory=dict)
    """Started machines -> their critical results of Fly's that a run of ours of the same
    checks has seen pass since (control/recheck.py): not critical until Fly runs them
    again."""
    sick_grace: dict[str, float] = field(default_factory=dict)
    """Machines in ``sick_since`` -> until when the policy does not count them as sick:
    our runs of their checks may yet clear them (control/recheck.py, ``SICK_GRACE_S``)."""
    rechecks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Machine -> the task running its critical checks (control/recheck.py)."""
    down_sick: set[str] = field(default_factory=set)
    """Machines that left ``started`` with their checks critical (a sick one drained, or
    stopped by someone): Fly's list forgets the checks of a machine that is not started,
    so we remember, until it is started again, that wakes should try it last. A cluster
    follower's is the leader's, as published (``AppFleet.down_sick``)."""
    cooldown: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Machine -> (until, last delay) after a failed action: the tick leaves it alone."""
    restarts: dict[str, Restarts] = field(default_factory=dict)
    hung_restarts: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Machine -> (restarts of ours because it hung, in a row; when the last one began).
    Forgotten once RESTART_MAX_S pass without another."""
    leased_by_others: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Machine -> (seen, busy until): an action found it leased by another holder."""
    suspend_refused: dict[str, str] = field(default_factory=dict)
    """Machine -> the version (``instance_id``) whose suspend the API refused with a 400
    or 422 (a config Fly will not suspend for a reason the listed config does not show:
    :attr:`MachineRecord.unsuspendable` covers swap, a schedule, a GPU): its scale-downs
    stop it without asking again. Forgotten when a list shows another version (a deploy
    may have made it suspendable) or no such machine, and with the process."""
    listed_busy: dict[str, tuple[float, MachineRecord]] = field(default_factory=dict)
    """Machine -> (when the list was asked, what it said) of the last list that showed a
    machine while an action of ours kept our record of it (``merge``): what the API said
    meanwhile, for an action that ends short of its goal and puts back what it changed
    ahead of its calls (``Actuator.bring_up``)."""
    read_once: bool = False
    cordon_listed: bool = True
    """The last list said of every machine whether it is cordoned (the real API may leave
    the flag out: our key is then all that shows a cordon of ours)."""
    on_first_list: Callable[[str, list[Machine]], None] | None = None
    """Called with the app's name and its first list as the API gave it (the service
    looks there for Fly's own autostop, instead of listing every app once more)."""
    listed_at: float | None = None
    """When the last list that was merged was asked for."""
    changed_at: float = float("-inf")
    """When something last happened that a list should show (an action of ours ended, a
    tick failed): a list asked for before then is not enough (control/schedule.py)."""
    unreachable: dict[str, float] = field(default_factory=dict)
    """Machine -> until when the proxy held it out of routing, as of the last list."""
    retired: bool = False
    """The app left the scaled apps (removed, or made static): what its actions still
    do as they end must not reach the view, which is no longer ours."""
    desired: int | None = None
    panic: bool = False
    last_reason: str = ""
    last_decision_at: float | None = None
    next_check: float | None = None
    """When the last decision's answer changes by itself (``Decision.next_check``: a
    pre-warm window opens, the idle timer ends): the loop ticks again by then."""
    last_tick_at: float | None = None
    last_error: str | None = None
    api_error: str | None = None
    """``last_error`` when it says the Machines API is in trouble (a tick's read failed, an
    action's call failed: 5xx, 429, transport), None when it does not (a boot that ended
    ``failed``, an action the API refused for the machine's state or config:
    ``actions.MACHINE_REFUSALS``): only those make the control plane unhealthy
    ("Machines API unreachable"), as a boot failure and a refused start made it."""
    api_refused: bool = False
    """``api_error`` is the API refusing our token (401, 403: ``Unauthorized``), which
    control health names as such: "unreachable" sent the reader to the network."""
    backoff_s: float = 0.0
    billing: MachineTime = field(default_factory=MachineTime)
    wake_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loop: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @classmethod
    def of(cls, config: AppConfig) -> AppRuntime:
        return cls(config, LoadWindows(config.stable_window_s, config.panic_window_s))

    def reconfigure(self, config: AppConfig) -> None:
        """New knobs; the load windows are rebuilt only when their lengths change."""
        old = self.config
        self.config = config
        # A new budget applies to the failures counted so far: raised, a machine left
        # alone gets its next try (after its backoff); lowered, one over it is left alone.
        for rec in self.restarts.values():
            rec.exhausted = rec.failures >= config.max_restart_attempts
        if (old.stable_window_s, old.panic_window_s) != (
            config.stable_window_s,
            config.panic_window_s,
        ):
            self.windows = LoadWindows(config.stable_window_s, config.panic_window_s)

    def lead_begins(self, now: float) -> None:
        """This process begins to decide again (cluster mode: a replica leads again). The
        load windows and the policy's streaks (panic, a lower demand's delay, the idle
        timer) describe the load up to our last lead, with a gap since: kept, the first
        ticks acted on it (a scale-up for load long gone, an idle timer counted across
        the gap). They begin afresh, as a new leader's; what the adaptive keep-alive
        learned of the app's idle gaps is kept (a long-run model of its traffic, which
        the gap leaves true), its current idle period and pre-warm are not. The config is
        ours as ever; the machines are read again at the first tick (``changed_at``): a
        list from our last lead describes the past too."""
        self.windows = LoadWindows.for_app(self.config)
        keepalive = replace(
            self.policy_state.keepalive,
            idle_from=None,
            last_arrival=None,
            prewarmed=False,
            prewarm_from=None,
        )
        self.policy_state = PolicyState(keepalive=keepalive)
        if self.listed_at is not None:  # (never listed: the first tick lists anyway)
            self.changed_at = now

    # --- the machine list ------------------------------------------------------------

    def merge(self, listed: Iterable[Machine], listed_at: float, now: float) -> None:
        """Take a fresh list, keeping our record of machines changed since it was asked."""
        if not self.read_once and self.on_first_list is not None:
            listed = list(listed)
            self.on_first_list(self.name, listed)
        fresh: dict[str, MachineRecord] = {}
        busy: dict[str, tuple[float, MachineRecord]] = {}
        previous = self.listed_at
        self.cordon_listed = True
        for listed_machine in listed:
            if listed_machine.cordoned is None:
                self.cordon_listed = False
            if listed_machine.state in FINAL_STATES:
                continue
            machine = MachineRecord.of(
                listed_machine, self.rechecked.get(listed_machine.id, frozenset())
            )
            mine = self.machines.get(machine.id)
            keep = mine is not None and (
                machine.id in self.running or self.recorded_since(machine.id, listed_at)
            )
            chosen = mine if keep and mine is not None else machine
            if mine is not None and machine.id in self.running:
                busy[machine.id] = (listed_at, machine)
            if (
                chosen is machine
                and machine.how is None
                and machine.state == STARTED
                and mine is not None
                and mine.state in (STARTING, STARTED)
            ):
                # Up since the start we knew the kind of (ours, or one Fly's events named):
                # the list of a started machine does not say how it came up.
                chosen = machine = replace(machine, how=mine.how)
            if mine is None:
                self.billing.appeared(machine.id, self._changed_at(machine.id, previous, listed_at))
            elif mine.state != chosen.state:
                at = self._changed_at(machine.id, previous, listed_at)
                self.billing.change(machine.id, mine.state, at)
            if mine is None or mine.state != chosen.state:
                self.state_since[machine.id] = now
            fresh[machine.id] = chosen
        # A machine that vanished from the list is gone (destroyed by someone else),
        # unless we are acting on it right now.
        for mid, machine in self.machines.items():
            if mid not in fresh and mid in self.running:
                fresh[mid] = machine
            elif mid not in fresh:
                self.billing.gone(mid, machine.state, self._changed_at(mid, previous, listed_at))
        for mid in list(self.state_since):
            if mid not in fresh:
                del self.state_since[mid]
        self.down_sick = {
            mid
            for mid in self.down_sick | self.sick_since.keys()
            if mid in fresh and fresh[mid].state != STARTED
        }
        self.rechecked = {
            mid: still
            for mid, passed in self.rechecked.items()
            if mid in fresh
            and fresh[mid].state == STARTED
            and (still := passed.intersection(fresh[mid].critical))
        }
        self.sick_since = {
            mid: self.sick_since.get(mid, now)
            for mid, machine in fresh.items()
            if machine.state == STARTED and machine.checks_critical
        }
        self.sick_grace = {k: v for k, v in self.sick_grace.items() if k in self.sick_since}
        for mid, machine in fresh.items():
            if machine.state == FAILED and mid not in self.restarts:
                # Failed before we knew it (its boot by someone else, or by a process of
                # ours that died): no attempt of ours spent yet, the first one at once.
                self.restarts[mid] = Restarts(0, now, self.config.max_restart_attempts <= 0)
        # A machine that left the failed state (started by us, fixed by someone) is clean.
        self.restarts = {
            k: v
            for k, v in self.restarts.items()
            if k in fresh and (fresh[k].state == FAILED or k in self.running)
        }
        self.touched = {k: v for k, v in self.touched.items() if k in fresh}
        self.hung_restarts = {k: v for k, v in self.hung_restarts.items() if k in fresh}
        self.leased_by_others = {k: v for k, v in self.leased_by_others.items() if k in fresh}
        self.suspend_refused = {
            k: v
            for k, v in self.suspend_refused.items()
            if k in fresh and fresh[k].instance_id == v
        }
        self.machines = fresh
        self.listed_busy = busy
        self.read_once = True
        self.listed_at = listed_at

    def _changed_at(self, machine_id: str, previous: float | None, listed_at: float) -> float:
        """When a change that a list asked for at ``listed_at`` shows took place, as far
        as we can tell: halfway from the last time we knew the machine's state (the list
        before, asked for at ``previous``, or a change of ours since) to ``listed_at``."""
        known = max(
            previous if previous is not None else listed_at,
            self.state_since.get(machine_id, -math.inf),
        )
        return known + max(0.0, listed_at - known) / 2

    def record(
        self,
        machine_id: str,
        now: float,
        *,
        state: str | None = None,
        cordoned: bool | None = None,
        marked: bool | None = None,
        how: str | None = None,
    ) -> None:
        """Note a change we made (state, cordon, our metadata key) ahead of the next list;
        ``how``: a start's kind ("resume" or "start", :attr:`MachineRecord.how`), kept
        until it is up; a change to any other state forgets it."""
        machine = self.machines.get(machine_id)
        if machine is None:
            return
        update: dict[str, object] = {}
        if how is not None:
            update["how"] = how
        if state is not None and state != machine.state:
            update["state"] = state
            update["start_began"] = None  # a change of ours: Fly's events do not say yet
            update["resuming"] = False
            if state not in (STARTING, STARTED):
                update["how"] = None
            self.billing.change(machine_id, machine.state, now)
            self.state_since[machine_id] = now
        if cordoned is not None:
            update["cordoned"] = cordoned
        if marked is not None:
            update["marked"] = marked
        if update:
            self.machines[machine_id] = replace(machine, **update)  # type: ignore[arg-type]
        self.touched[machine_id] = now

    def recorded_since(self, machine_id: str, listed_at: float) -> bool:
        """Our record of the machine changed after a list asked for at ``listed_at``: it
        is newer than what that list says (``merge`` keeps it)."""
        return self.touched.get(machine_id, float("-inf")) > listed_at

    # --- what others read ------------------------------------------------------------

    def address(self, machine: MachineRecord) -> tuple[str, int]:
        port = self.config.port or machine.internal_port or DEFAULT_PORT
        return machine.private_ip or "", port

    def cordoned(self, machine: MachineRecord) -> bool:
        """Cordoned in the API, or by us ahead of it. An API that leaves the flag out
        (the real one may) is read from our key: a cordon of ours always carries it."""
        if machine.id in self.cordon_held:
            return True
        return machine.cordoned if machine.cordoned is not None else ours(machine)

    def cordoned_by_us(self, machine: MachineRecord) -> bool:
        """Cordoned (:meth:`cordoned`) by a drain of ours: our key is on it, or our cordon
        is ahead of the API's. Any other cordon is another party's."""
        return self.cordoned(machine) and (ours(machine) or machine.id in self.cordon_held)

    def hung(self, view: AppView) -> set[str]:
        """The machines that hang (:func:`hangs`)."""
        return {
            mid
            for mid, up in view.upstreams.items()
            if (machine := self.machines.get(mid)) is not None and hangs(machine, up)
        }

    def hold_hung(self, view: AppView, held: set[str]) -> None:
        """Hold out of the proxy's rotation the hung machines that are to be restarted
        (``held``: the policy's snapshot says ``hung``), and let the others back.

        When an ejection ends the proxy probes the machine with a client's request, which
        waits ``upstream_timeout_s`` for a 504: once per ejection (10 s doubling to 300 s
        with the defaults) for as long as the restart waits, for its host or its lease.
        The restart's new start lets the machine back (``AppView``); one that will not be
        restarted after all (its budget spent, restarts switched off) is let back for the
        proxy to probe. In cluster mode the leader publishes a held machine as cordoned,
        so that no replica's proxy probes it; ``held`` empty lets every machine back (a
        leader stepping down: the new one holds what it finds hung)."""
        for mid, up in view.upstreams.items():
            view.hold_out(up, mid in held)

    def infos(self) -> list[MachineInfo]:
        """The proxy's view: routable only if the API says started and nobody cordoned it."""
        out = []
        for machine in self.machines.values():
            host, port = self.address(machine)
            if not host:
                continue  # no address yet (being created): nothing the proxy could reach
            out.append(
                MachineInfo(
                    machine.id,
                    host,
                    port,
                    machine.state,
                    self.cordoned(machine),
                    machine.checks_critical,
                    machine.how,
                    self.cordoned_by_us(machine),
                )
            )
        return out

    def fleet(self, view: AppView, now: float | None = None, *, urgent: bool = False) -> Fleet:
        """The policy's snapshot: API state, our bookkeeping, and live load from the proxy.

        With ``now``, a machine whose last action failed less than its backoff ago counts
        as busy, so the policy picks another one; ``urgent`` (a wake) ignores that cooldown,
        but not the backoff of a failed machine's restarts.
        """
        snaps = []
        hung = self.hung(view)
        for machine in self.machines.values():
            up = view.upstreams.get(machine.id)
            run = self.running.get(machine.id)
            # A drain still waiting is "draining" (the policy may take it back), not busy;
            # past that point it is a pending "drain" like any other action of ours.
            draining = run is not None and run.kind == "drain" and run.waiting
            # A cleanup (our stale key dropped) of a machine that is not started gives way
            # to a start or resume at once (``Actuator.take_over``): not busy for the
            # policy or a wake.
            cleaning = run is not None and run.kind == "cleanup" and machine.state != STARTED
            pending: str | None = None
            if run is not None and not draining:
                pending = run.kind
                if run.kind == "cleanup" or (run.kind == "uncordon" and machine.state != STARTED):
                    pending = None  # lifting a cordon off a sleeping machine adds no capacity
            cordoned = self.cordoned(machine)
            started_at: float | None = None
            if machine.state == STARTED:
                # The view learns of a start when the tick publishes, after the decision:
                # a machine first listed started in this tick (started by someone else)
                # started now as far as we know, not at an unknown time, which counts as
                # old (it was drained at once, whatever min_lifetime_s).
                if up is not None and up.state == STARTED:
                    started_at = up.started_at
                else:
                    started_at = view.clock() if now is None else now
            snaps.append(
                MachineSnapshot(
                    id=machine.id,
                    state=machine.state,
                    cordoned=cordoned,
                    cordoned_by_us=self.cordoned_by_us(machine),
                    draining=draining,
                    busy=(run is not None and not draining and not cleaning)
                    or (not urgent and self.cooling(machine.id, now))
                    or self.leased(machine.id, now),
                    in_flight=up.in_flight + up.remote_in_flight if up else 0,
                    long_lived=up.long_lived + up.remote_long_lived if up else 0,
                    last_used=up.last_used if up else None,
                    started_at=started_at,
                    state_since=self.state_since.get(machine.id),
                    restartable=self.restartable(machine.id, now),
                    unreachable=machine.host_unreachable,
                    down_sick=machine.id in self.down_sick,
                    sick_since=self.sick_since.get(machine.id)
                    if machine.state == STARTED and not self.sick_grace_left(machine.id, now)
                    else None,
                    hung=machine.id in hung and self.may_restart_hung(machine.id, now),
                    pending=pending,
                )
            )
        return Fleet.of(self.name, snaps)

    def sick_grace_left(self, machine_id: str, now: float | None) -> bool:
        """Critical, but our runs of its checks may yet clear it (``sick_grace``)."""
        until = self.sick_grace.get(machine_id)
        return until is not None and now is not None and now < until

    def restartable(self, machine_id: str, now: float | None) -> bool:
        """A failed machine we may start again now (see ``Restarts``)."""
        rec = self.restarts.get(machine_id)
        if not self.config.restart_failed or rec is None or rec.exhausted:
            return False
        return now is None or now >= rec.retry_at

    def may_restart_hung(self, machine_id: str, now: float | None) -> bool:
        """Restarts are on, and fewer than ``max_restart_attempts`` restarts of the machine
        for hanging came in a row (each within RESTART_MAX_S of the one before)."""
        if not self.config.restart_failed:
            return False
        count, at = self.hung_restarts.get(machine_id, (0, 0.0))
        recent = now is None or now - at < RESTART_MAX_S
        return not recent or count < self.config.max_restart_attempts

    def hung_restarts_in_a_row(self, machine_id: str, now: float) -> tuple[int, float | None]:
        """Our restarts of the machine for hanging in a row, and when the next may begin
        (None: the budget allows one now; only past RESTART_MAX_S once it is spent)."""
        count, at = self.hung_restarts.get(machine_id, (0, 0.0))
        if count == 0 or now - at >= RESTART_MAX_S:
            return 0, None
        return count, (None if count < self.config.max_restart_attempts else at + RESTART_MAX_S)

    def restarting_hung(self, machine_id: str, now: float) -> int:
        """A restart of ours for hanging begins: the count in a row, this one included."""
        count, at = self.hung_restarts.get(machine_id, (0, now))
        count = count + 1 if now - at < RESTART_MAX_S else 1
        self.hung_restarts[machine_id] = (count, now)
        return count

    def next_restart_at(self) -> float | None:
        """When the earliest failed machine with budget left may be started again."""
        if not self.config.restart_failed:
            return None
        times = [r.retry_at for r in self.restarts.values() if not r.exhausted]
        return min(times, default=None)

    def boot_failed(self, machine_id: str, now: float) -> Restarts:
        """A start of ours ended in ``failed``: count it, and back off exponentially."""
        rec = self.restarts.get(machine_id)
        failures = 1 if rec is None else rec.failures + 1
        exhausted = failures >= self.config.max_restart_attempts
        rec = Restarts(failures, now + restart_backoff_s(failures), exhausted)
        self.restarts[machine_id] = rec
        return rec

    def cooling(self, machine_id: str, now: float | None) -> bool:
        entry = self.cooldown.get(machine_id)
        return now is not None and entry is not None and now < entry[0]

    def leased(self, machine_id: str, now: float | None) -> bool:
        """Skipped for a tick: another holder had its lease when we last tried."""
        entry = self.leased_by_others.get(machine_id)
        return now is not None and entry is not None and now < entry[1]

    def failed(self, machine_id: str, now: float, max_s: float) -> None:
        """An action on the machine failed: back off, doubling from 1 s up to ``max_s``."""
        _, last = self.cooldown.get(machine_id, (0.0, 0.0))
        delay = min(max_s, max(1.0, 2 * last))
        self.cooldown[machine_id] = (now + delay, delay)

    def note_decision(self, decision: Decision, now: float) -> None:
        self.policy_state = decision.state
        self.desired = decision.desired
        self.panic = decision.panic
        self.last_reason = decision.reason
        self.last_decision_at = now
        self.next_check = decision.next_check

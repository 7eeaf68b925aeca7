"""What the simulator models: timings, machines and the figures it counts.

Times are virtual seconds from the start of the trace. Nothing here reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoscaler.scaling.fleet import FAILED, STARTED, STOPPED, SUSPENDED

# Timings that repeat (a tick, a check): each must take some time.
_PERIODS = frozenset({"tick_s", "autostop_interval_s"})
_SHARES = frozenset({"resume_cold_rate", "action_failure_rate", "boot_failure_rate"})


class TimingError(ValueError):
    """A field of Timings out of its range. ``field`` names it, so that the command line
    can say which flag set it (``--tick-s``, not ``tick_s``)."""

    def __init__(self, field: str, expected: str, value: float) -> None:
        super().__init__(f"{field}: expected {expected}, got {value:g}")
        self.field = field
        self.expected = expected
        self.value = value


@dataclass(frozen=True, slots=True)
class Timings:
    """Modelled durations (defaults from docs/fly-api-notes.md where it gives them)."""

    tick_s: float = 1.0
    """The controller's tick (``control.tick_s``)."""
    api_latency_s: float = 0.1
    """Each Machines API call, before its effect starts."""
    resume_s: float = 0.3
    """Suspended to started."""
    start_s: float = 2.0
    """Stopped to started (a cold boot)."""
    suspend_s: float = 1.0
    """Started to suspended (longer for machines with much memory)."""
    stop_s: float = 1.0
    """Started (or suspended) to stopped."""
    autostop_interval_s: float = 300.0
    """How often the ``fly-autostop`` baseline looks for excess capacity."""
    keepalive_s: float = 600.0
    """How long the ``fixed-keepalive-10m`` baseline keeps an idle machine."""
    resume_cold_rate: float = 0.0
    """Share of resumes that fall back to a cold start (the snapshot could not be used)."""
    snapshot_max_age_s: float = 0.0
    """A machine suspended longer than this boots cold when resumed (0: never)."""
    action_failure_rate: float = 0.0
    """Share of start and resume calls the API fails (the machine stays as it was)."""
    boot_failure_rate: float = 0.0
    """Share of cold boots (a start, or a resume that falls back to one) that end
    ``failed`` after a cold boot's time, as the emulator's ``faults.boot_failure_rate``."""
    two_choices: bool = False
    """Route as the proxy does: the less loaded of two routable machines picked at random
    (False: the least loaded of all, the ideal the proxy approximates)."""
    seed: int = 0
    """Seed of the random draws above (each app has its own stream)."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in _SHARES:
                ok, expected = 0 <= value <= 1, "a share between 0 and 1"
            elif name in _PERIODS:  # at 0 a replay never ends
                ok, expected = value > 0 and math.isfinite(value), "a finite number > 0"
            else:
                ok, expected = value >= 0 and math.isfinite(value), "a finite number >= 0"
            if not ok:
                raise TimingError(name, expected, value)


class Machine:
    """One machine of the simulated pool, mutable; the engine owns every write."""

    __slots__ = (
        "acc_since",
        "busy",
        "cordoned",
        "draining",
        "failures",
        "gen",
        "how",
        "id",
        "idx",
        "in_flight",
        "last_used",
        "op",
        "ours",
        "restart_at",
        "routable",
        "started_at",
        "state",
        "state_since",
        "waiting",
    )

    def __init__(self, idx: int, machine_id: str, state: str = STOPPED) -> None:
        self.idx = idx
        self.state = state
        self.state_since: float | None = 0.0
        self.acc_since = 0.0
        self.cordoned = False
        self.ours = False  # the cordon is ours (carries our metadata key)
        self.draining = False  # a drain that may still be taken back
        self.waiting = False  # ... and is past its cordon calls, waiting for requests
        self.busy: str | None = None  # kind of the action of ours under way
        self.op = 0  # bumped by every new action: stale timers compare and give up
        self.gen = 0  # bumped when requests on it are cut: their end events give up
        self.in_flight = 0
        self.last_used: float | None = None
        self.started_at: float | None = None
        self.routable = False
        self.id = machine_id
        self.how: str | None = None
        """How its latest start brings (or brought) it up: "resume" from its snapshot, or
        "start", a cold boot (a resume that fell back to one too), as
        ``autoscaler.fly.models.Machine.last_boot`` tells it live."""
        self.failures = 0  # cold boots that ended failed in a row (a start that works: 0)
        self.restart_at: float | None = None
        """Failed, and our controller may start it again from then (its restart backoff);
        None: it may not (never failed, ``max_restart_attempts`` spent, or
        ``restart_failed`` off). The controller's ``Restarts`` record, as the policy's
        ``MachineSnapshot.restartable`` reads it."""

    @property
    def up(self) -> bool:
        """Billed as running: anything but resting stopped, suspended or failed."""
        return self.state not in (STOPPED, SUSPENDED, FAILED)

    @property
    def wakeable(self) -> bool:
        return self.state in (STOPPED, SUSPENDED) and self.busy is None

    @property
    def started(self) -> bool:
        return self.state == STARTED


@dataclass(slots=True)
class Stats:
    """One app under one strategy."""

    app: str
    strategy: str
    requests: int = 0
    served: int = 0
    wake_waits: int = 0
    """Requests that arrived when no machine was routable and waited for one to wake."""
    errors: int = 0
    """Requests that timed out waiting, found the queue full, or were cut by a stop."""
    waits: list[float] = field(default_factory=list)
    """Added wait of each served request that waited at all (the rest waited 0)."""
    up_s: float = 0.0
    suspended_s: float = 0.0
    peak_machines: int = 0
    api_actions: int = 0
    refused: int = 0
    """Actions the machine's state did not allow (the API would answer 412)."""
    cold_resumes: int = 0
    """Resumes that fell back to a cold start (``resume_cold_rate``, ``snapshot_max_age_s``)."""
    failed_actions: int = 0
    """Start and resume calls the API failed (``action_failure_rate``)."""
    failed_boots: int = 0
    """Cold boots that ended with the machine ``failed`` (``boot_failure_rate``)."""
    decisions: int = 0
    """Times the policy was asked (live ticks; skipped idle ticks are not counted)."""
    changes: list[tuple[float, int]] = field(default_factory=list)
    """(time, +1 or -1) whenever a machine comes up or goes to rest: for the total's peak."""

    def wait_quantile(self, q: float) -> float:
        return quantile(self.waits, self.served, q)

    @property
    def max_wait(self) -> float:
        return max(self.waits, default=0.0)


def quantile(waits: list[float], total: int, q: float) -> float:
    """Nearest-rank quantile over ``total`` values: ``waits`` (unsorted) and zeros."""
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    zeros = total - len(waits)
    if rank <= zeros:
        return 0.0
    return sorted(waits)[rank - zeros - 1]

"""A frozen snapshot of one app's machines, as the policy sees them.

Pure: no I/O, no clock. Times are plain floats on whatever clock the caller uses (monotonic
seconds live, virtual seconds in the simulator), always the same clock as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# Machine states, as the real Machines API reports them (see docs/fly-api-notes.md).
STARTED = "started"
STOPPED = "stopped"
SUSPENDED = "suspended"
CREATED = "created"
FAILED = "failed"
STARTING = "starting"
STOPPING = "stopping"
SUSPENDING = "suspending"
DESTROYING = "destroying"
DESTROYED = "destroyed"
RESTARTING = "restarting"

RESTING_STATES = frozenset({CREATED, STARTED, STOPPED, SUSPENDED, FAILED})
MOVING_STATES = frozenset(
    {
        "creating",
        STARTING,
        STOPPING,
        RESTARTING,
        SUSPENDING,
        DESTROYING,
        "updating",
        "replacing",
        "launch_failed",
    }
)
FINAL_STATES = frozenset({DESTROYED, "replaced", "migrated"})
# Moving states that end in "started": such a machine counts as capacity already, so the
# policy does not start a second one for the same demand.
COMING_UP_STATES = frozenset({STARTING, RESTARTING})
# Moving states that end in "stopped" or "suspended".
GOING_DOWN_STATES = frozenset({STOPPING, SUSPENDING})


def boot_kind(state: str | None) -> str:
    """How a machine in ``state`` comes up when woken, as far as its state tells:
    "resume" from suspended (or suspending), else "start". For a wake whose kind nobody
    said (the leader of an older release, or a wake that has not chosen yet)."""
    return "resume" if state in (SUSPENDED, SUSPENDING) else "start"


# Metadata key that marks a cordon as ours, so we never undo someone else's.
CORDON_METADATA_KEY = "fly_autoscaler_cordon"

RESTART_BASE_S = 2.0  # the wait after a machine's first failed start; it doubles after each
RESTART_MAX_S = 300.0


def restart_backoff_s(failures: int) -> float:
    """How long a machine whose last ``failures`` starts (>= 1) failed in a row is left
    failed before it is started again: 2 s, doubling, 300 s at most. Here, not in the
    controller, so that the simulator backs off as the controller does."""
    return min(RESTART_MAX_S, RESTART_BASE_S * 2.0 ** min(failures - 1, 16))


@dataclass(frozen=True, slots=True)
class MachineSnapshot:
    """One machine at one instant."""

    id: str
    state: str
    cordoned: bool = False
    """Cordoned in the API (by anybody)."""
    cordoned_by_us: bool = False
    """The cordon carries our metadata key: we may lift it."""
    draining: bool = False
    """We are draining it now (cordoned by us, waiting for requests in flight)."""
    busy: bool = False
    """An action of ours on it is under way; the policy leaves it alone this tick."""
    in_flight: int = 0
    long_lived: int = 0
    """WebSockets (idle ones too: they give their slot back, so ``in_flight`` misses
    them) and streamed answers still coming from it (event streams, downloads) that our
    proxy carries (cluster mode: every replica's, as each last reported): a drain ends
    them, so a scale-down takes a machine without any first."""
    last_used: float | None = None
    """When its last request ended (or began, if one is in flight)."""
    started_at: float | None = None
    """When it last became started; None if not started."""
    state_since: float | None = None
    """When it entered its current state, where known."""
    restartable: bool = False
    """A ``failed`` machine that may be started again now (restarts are on, its budget is
    not spent and its backoff is over); a failed machine without it is left alone."""
    hung: bool = False
    """Started, but the proxy took it out of routing twice in a row for failing itself
    (timeouts, resets, refused connections), or once for timeouts with no other machine of
    the app to route to: its process hangs. Not capacity; restarted while its restart
    budget lasts (without it, counted as serving, as the API says)."""
    sick_since: float | None = None
    """Started, and Fly's health checks of it are critical since then (None: they are not).
    The proxy routes to it only if nothing else is routable; not capacity while the app
    has a healthy machine, or fewer sick ones than healthy ones plus one (rule 4)."""
    down_sick: bool = False
    """Not started, and its Fly checks were critical when it last was: a wake or scale-up
    tries it after the others (its trouble may come back with it)."""
    unreachable: bool = False
    """The API says Fly cannot reach its host (``host_status``): an action on it fails
    until the host is back, so wakes and scale-ups try it last and scale-downs take it
    last (it may still serve: the host may only be cut off from Fly's API)."""
    pending: str | None = None
    """The kind of our action in flight on it (an ``Action.kind``), if any.

    Lets the policy count a machine being started or resumed as capacity before the API
    says so (and one being drained as going), so it never starts two for one need.
    """

    @property
    def cordoned_by_others(self) -> bool:
        """Cordoned, and not by us: never routed to, never uncordoned, never removed by us."""
        return self.cordoned and not (self.cordoned_by_us or self.draining)

    @property
    def routable(self) -> bool:
        return self.state == STARTED and not self.cordoned and not self.draining


@dataclass(frozen=True, slots=True)
class Fleet:
    """All machines of one app (destroyed ones already left out)."""

    app: str
    machines: tuple[MachineSnapshot, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, app: str, machines: Iterable[MachineSnapshot]) -> Fleet:
        return cls(app, tuple(m for m in machines if m.state not in FINAL_STATES))

    def __iter__(self) -> Iterator[MachineSnapshot]:
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self.machines)

    @property
    def routable(self) -> list[MachineSnapshot]:
        return [m for m in self.machines if m.routable]

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.machines)

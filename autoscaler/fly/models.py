"""Pydantic models of the seed's schemas, lenient to what the real API sends.

Every model keeps unknown fields (``extra="allow"``): the real API returns far more than the
seed describes (events, checks, image_ref, autostop, ...), and a config read from a machine
must survive a round trip through ``update_machine`` unchanged. Seed enums (state, cpu_kind,
protocol, restart policy, ...) are plain strings, because the real API has more values than
the seed lists; ``MachineState`` names the states this project knows and classifies them.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The request body: JSON types, unset fields left out, extra fields kept."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


def _lenient_datetime(value: object) -> object:
    # An unparsable timestamp must not make a whole machine list unreadable.
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


Timestamp = Annotated[datetime | None, BeforeValidator(_lenient_datetime)]


class MachineState(StrEnum):
    """Every state the real API reports (the seed lists five of them)."""

    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    FAILED = "failed"
    CREATING = "creating"
    STARTING = "starting"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    SUSPENDING = "suspending"
    DESTROYING = "destroying"
    UPDATING = "updating"
    REPLACING = "replacing"
    LAUNCH_FAILED = "launch_failed"
    DESTROYED = "destroyed"
    REPLACED = "replaced"
    MIGRATED = "migrated"

    @classmethod
    def parse(cls, value: str | None) -> MachineState | None:
        """The known state, or None for a state this code has never heard of."""
        try:
            return cls(value) if value is not None else None
        except ValueError:
            return None


RESTING_STATES = frozenset(
    {
        MachineState.CREATED,
        MachineState.STARTED,
        MachineState.STOPPED,
        MachineState.SUSPENDED,
        MachineState.FAILED,
    }
)
FINAL_STATES = frozenset({MachineState.DESTROYED, MachineState.REPLACED, MachineState.MIGRATED})
MOVING_STATES = frozenset(MachineState) - RESTING_STATES - FINAL_STATES


START_EVENTS = frozenset(
    {
        ("start", "starting"),
        ("restart", "restarting"),
        ("restart", "starting"),
        ("launch", "created"),
    }
)
"""The (type, status) of the event that begins a start, as Fly records them: a user's start
(``start``/``starting``, a resume too), a restart (``restart``/``restarting``; by Fly's
restart policy ``restart``/``starting``), a launch at create (``launch``/``created``)."""
EARLIEST_S = 1_577_836_800.0
"""2020-01-01 as a Unix time: Fly's machines are younger. An earlier time of Fly's is
garbage (a time in seconds read as milliseconds, a zero), never the age of a start."""


def _unix(stamp: datetime | None) -> float | None:
    """A timestamp of the API's as a Unix time (one without a zone is UTC, as Fly's are)."""
    if stamp is None:
        return None
    return (stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)).timestamp()


def _kind(event: dict[str, Any]) -> tuple[str, str] | None:
    """An event's (type, status); None unless both are strings (a list or a dict is no
    key of :data:`START_EVENTS`: a TypeError)."""
    kind, status = event.get("type"), event.get("status")
    if not isinstance(kind, str) or not isinstance(status, str):
        return None
    return kind, status


def _millis(event: object) -> float | None:
    """An event's ``timestamp`` (milliseconds) as a finite float; None when it has none
    (not a number, a bool, NaN, infinite, or an integer too large for a float, which
    raised OverflowError and made the whole machine list unreadable)."""
    if not isinstance(event, dict):
        return None
    value = event.get("timestamp")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        stamp = float(value)
    except OverflowError:
        return None
    return stamp if math.isfinite(stamp) else None


class Organization(_Lenient):
    name: str | None = None
    slug: str | None = None


class App(_Lenient):
    id: str | None = None
    name: str | None = None
    status: str | None = None
    machine_count: int | None = None
    volume_count: int | None = None
    network: str | None = None
    organization: Organization | None = None


class AppList(_Lenient):
    total_apps: int | None = None
    apps: list[App] = Field(default_factory=list)


class CreateAppRequest(_Lenient):
    """Sent with both ``app_name`` (seed) and ``name`` (newer real API); see the client."""

    app_name: str
    org_slug: str
    enable_subdomains: bool | None = None
    network: str | None = None


class MachineGuest(_Lenient):
    cpus: int | None = None
    memory_mb: int | None = None
    cpu_kind: str | None = None  # shared | performance (real adds more)
    gpus: int | None = None  # real API only, as gpu_kind
    gpu_kind: str | None = None


class MachinePort(_Lenient):
    port: int | None = None
    handlers: list[str] | None = None
    force_https: bool | None = None


class MachineServiceConcurrency(_Lenient):
    type: str | None = None  # connections | requests
    soft_limit: int | None = None
    hard_limit: int | None = None


class MachineCheck(_Lenient):
    type: str | None = None
    kind: str | None = None
    """A machine check's (``config.checks``): ``readiness`` or ``informational``. Only a
    readiness check says where traffic may go; a service's checks always do."""
    port: int | None = None
    interval: str | None = None
    timeout: str | None = None
    grace_period: str | None = None
    path: str | None = None
    method: str | None = None


class MachineService(_Lenient):
    protocol: str | None = None
    internal_port: int | None = None
    ports: list[MachinePort] | None = None
    concurrency: MachineServiceConcurrency | None = None
    checks: list[MachineCheck] | None = None  # real API (fly.toml's service checks)
    # Real API only; absent from the seed. autostop: "off"/"stop"/"suspend" or a bool.
    autostart: bool | None = None
    autostop: bool | str | None = None
    min_machines_running: int | None = None


class MachineMount(_Lenient):
    volume: str | None = None
    path: str | None = None
    size_gb: int | None = None


class MachineInit(_Lenient):
    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    tty: bool | None = None
    swap_size_mb: int | None = None  # real API only


def _restart_policy(value: object) -> object:
    # YAML 1.1 turns a bare `no` into False; a config written that way still means "no".
    return "no" if value is False else value


class MachineRestart(_Lenient):
    policy: Annotated[str | None, BeforeValidator(_restart_policy)] = None


def suspend_refusal(
    *, swap_size_mb: object, schedule: object, gpus: object, gpu_kind: object
) -> str | None:
    """Why Fly refuses to suspend a machine whose config has these values; None when it
    does not. Fly's suspend-resume page: suspend works for machines with no swap, no
    schedule and no GPU. It also names 2 GB of memory or less, but "larger is possible
    but discouraged" (longer suspends), so a large machine is suspended. The one rule for
    the controller, which reads it off a listed machine (no refused call), and the
    emulator, which plays Fly's refusal (HTTP 400)."""
    if swap_size_mb:
        return f"swap is configured (config.init.swap_size_mb: {swap_size_mb})"
    if schedule:
        return f"it runs on a schedule (config.schedule: {schedule})"
    if gpus:
        return f"it has a GPU (config.guest.gpus: {gpus})"
    if gpu_kind:
        return f"it has a GPU (config.guest.gpu_kind: {gpu_kind})"
    return None


class MachineConfig(_Lenient):
    image: str
    guest: MachineGuest | None = None
    env: dict[str, str] | None = None
    services: list[MachineService] | None = None
    checks: dict[str, MachineCheck] | None = None
    mounts: list[MachineMount] | None = None
    init: MachineInit | None = None
    restart: MachineRestart | None = None
    schedule: str | None = None
    auto_destroy: bool | None = None
    metadata: dict[str, str] | None = None

    def suspend_refusal(self) -> str | None:
        """Why Fly refuses to suspend a machine of this config (:func:`suspend_refusal`)."""
        return suspend_refusal(
            swap_size_mb=self.init.swap_size_mb if self.init is not None else None,
            schedule=self.schedule,
            gpus=self.guest.gpus if self.guest is not None else None,
            gpu_kind=self.guest.gpu_kind if self.guest is not None else None,
        )


class CheckStatus(_Lenient):
    """One health check's last result, as a machine reports it (real API: CheckStatus)."""

    name: str | None = None
    status: str | None = None  # passing, warning, critical
    output: str | None = None
    updated_at: Timestamp = None


class Machine(_Lenient):
    id: str
    name: str | None = None
    state: str = "unknown"  # plain str: a state this code does not know must still parse
    region: str | None = None
    instance_id: str | None = None
    private_ip: str | None = None
    created_at: Timestamp = None
    updated_at: Timestamp = None
    config: MachineConfig | None = None
    cordoned: bool | None = None  # emulator/extension field; the real API may leave it out
    checks: list[CheckStatus] | None = None
    host_status: str | None = None
    """``ok``, ``unknown`` or ``unreachable``: whether Fly can reach the machine's host
    (left out of summary lists)."""

    def _timed_events(self) -> list[tuple[float, dict[str, Any]]]:
        """The machine's ``events`` that carry a time, as (ms, event), newest first (in
        the listed order on a tie); empty when there are none."""
        events = (self.model_extra or {}).get("events")
        if not isinstance(events, list):
            return []
        timed = [(ms, e) for e in events if (ms := _millis(e)) is not None]
        timed.sort(key=lambda t: -t[0])  # stable: newest first on a tie
        return timed

    def current_start(self) -> tuple[float, bool] | None:
        """When Fly began the machine's current start (a Unix time, seconds) and whether it
        is a resume (it began from ``suspended`` or ``suspending``), from the machine's
        ``events`` (real API: newest first, ``timestamp`` in milliseconds; the seed has
        none): None unless the machine is ``starting`` or ``restarting`` and its newest
        event is one that begins a start (:data:`START_EVENTS`). So a start Fly did not
        record (an update's boot, say) is never timed by an older one's event.

        ``updated_at``, when later, is taken instead: it moves when the state does (on
        the emulator, and as far as we can tell on Fly), so the start is at most that old.
        A time before :data:`EARLIEST_S` or before the machine was created is garbage:
        None. A time in the future is returned as it is: the caller reads it against
        its own clock (control/wake.py)."""
        if self.state not in (MachineState.STARTING, MachineState.RESTARTING):
            return None
        timed = self._timed_events()
        if not timed or (newest := _kind(timed[0][1])) not in START_EVENTS:
            return None
        kind = newest[0]
        began = timed[0][0] / 1000
        created = _unix(self.created_at)
        if began < EARLIEST_S or (created is not None and began < created - 1.0):  # (seconds)
            return None
        updated = _unix(self.updated_at)
        if updated is not None and updated > began:
            began = updated
        resume = (
            kind == "start"
            and len(timed) > 1
            and timed[1][1].get("status") in (MachineState.SUSPENDED, MachineState.SUSPENDING)
        )
        return began, resume

    def last_boot(self) -> str | None:
        """How the start that brought a ``started`` machine up did it, as its ``events``
        say: "resume" (from its snapshot) or "start" (a cold boot); None when they do not
        say (another state, no events, a newest event that ended no start).

        The newest event must be the platform's end of a start (``start``/``started``,
        or ``launch``/``started``). A resume that fell back to a cold boot (an unusable
        snapshot) is a "start": its end is a ``launch``, or carries ``request.resume``
        false, as the emulator records it (docs/emulator.md, "Interrupting a
        transition"; Fly documents no event for it, and one it records otherwise reads as
        the start it began as). Otherwise ``request.resume`` true is a resume, and a
        start that began (``start``/``starting``) from ``suspended`` or ``suspending``
        too; any other start (from stopped, a restart, a create) is a "start"."""
        if self.state != MachineState.STARTED:
            return None
        timed = self._timed_events()
        if not timed:
            return None
        end = timed[0][1]
        if end.get("status") != MachineState.STARTED or end.get("type") not in ("start", "launch"):
            return None
        request = end.get("request")
        resumed = request.get("resume") if isinstance(request, dict) else None
        if end.get("type") == "launch" or resumed is False:
            return "start"
        if resumed is True:
            return "resume"
        if len(timed) < 2:
            return None
        began = _kind(timed[1][1])
        if began != ("start", MachineState.STARTING):
            return "start" if began in START_EVENTS else None
        if len(timed) < 3:
            return None  # what it began from is no longer listed
        before = timed[2][1].get("status")
        return "resume" if before in (MachineState.SUSPENDED, MachineState.SUSPENDING) else "start"

    @property
    def host_unreachable(self) -> bool:
        """Fly cannot reach the machine's host: actions on it fail until the host is back."""
        return self.host_status == "unreachable"

    @property
    def checks_critical(self) -> bool:
        """A Fly health check of the machine says critical."""
        return any(c.status == "critical" for c in self.checks or ())

    @property
    def known_state(self) -> MachineState | None:
        return MachineState.parse(self.state)

    @property
    def resting(self) -> bool:
        """In a state that stays until someone acts (started, stopped, suspended, ...)."""
        return self.known_state in RESTING_STATES

    @property
    def moving(self) -> bool:
        """Between states (starting, suspending, ...) or in a state this code does not know."""
        state = self.known_state
        return state is None or state in MOVING_STATES

    @property
    def gone(self) -> bool:
        return self.known_state in FINAL_STATES

    @property
    def internal_port(self) -> int | None:
        """The first service's internal port (what the proxy connects to)."""
        if self.config and self.config.services:
            return self.config.services[0].internal_port
        return None


class CreateMachineRequest(_Lenient):
    """Body of create and update (the seed uses one schema for both)."""

    config: MachineConfig
    name: str | None = None
    region: str | None = None
    skip_service_registration: bool | None = None


class StopRequest(_Lenient):
    signal: str | None = None
    timeout: str | None = None  # a duration string, "30s": what the real API parses


class StartResult(_Lenient):
    """The real API answers a start with ``{"previous_state": ...}``; the seed with nothing."""

    previous_state: str | None = None


class WaitResult(_Lenient):
    """The real API's wait body ``{ok, state, version, event_id}``; filled in for the seed."""

    ok: bool = True
    state: str | None = None
    version: str | None = None
    event_id: str | None = None


class CreateLeaseRequest(_Lenient):
    """Body of ``POST .../lease`` (real API only): ``ttl`` in seconds, and why."""

    ttl: int | None = Field(default=None, ge=1)
    description: str | None = None


class Lease(_Lenient):
    """A machine lease (the real API's and the emulator's; the seed has none). ``nonce``
    goes in ``fly-machine-lease-nonce`` on every call that changes the machine while the
    lease lives; ``expires_at`` is a Unix time in seconds. The real API (and the emulator)
    wraps it as ``{"status": "success", "data": {...}}``; the client unwraps that."""

    # Sent back as a header value: visible ASCII only (a nonce Fly makes is hex).
    nonce: str = Field(pattern=r"^[!-~]{1,256}$")
    expires_at: int | None = None
    owner: str | None = None
    description: str | None = None
    version: str | None = None


class Volume(_Lenient):
    id: str
    name: str | None = None
    state: str | None = None
    size_gb: int | None = None
    region: str | None = None
    zone: str | None = None
    encrypted: bool | None = None
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    filesystem_type: str | None = None
    snapshot_retention: int | None = None
    created_at: Timestamp = None


class CreateVolumeRequest(_Lenient):
    name: str
    size_gb: int = Field(ge=1)
    region: str
    encrypted: bool | None = None
    unique_zones_only: bool | None = None
    snapshot_id: str | None = None
    snapshot_retention: int | None = Field(default=None, ge=1, le=60)


class UpdateVolumeRequest(_Lenient):
    snapshot_retention: int | None = Field(default=None, ge=1, le=60)


class ExtendVolumeRequest(_Lenient):
    size_gb: int = Field(ge=1)


class VolumeSnapshot(_Lenient):
    id: str | None = None
    size: int | None = None
    digest: str | None = None
    created_at: Timestamp = None
    status: str | None = None


class OidcTokenRequest(_Lenient):
    aud: str | None = None


class ErrorResponse(_Lenient):
    """``status`` is an int in the seed and a string code on the real API; either parses."""

    error: str | None = None
    message: str | None = None
    status: int | str | None = None

    @property
    def text(self) -> str | None:
        return self.error or self.message

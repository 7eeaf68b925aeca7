"""The emulator's world: apps, machines, volumes, and their JSON shapes.

Plain dataclasses, no I/O. The lifecycle engine (``machines.py``) mutates them; the API
(``api.py``) renders them with ``to_json``; ``persist.py`` saves them. Runtime-only parts
(the process, the condition that ``/wait`` blocks on) are excluded from persistence.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# States, as docs/fly-api-notes.md lists them. The seed only knows five; clients see all.
RESTING = frozenset({"created", "started", "stopped", "suspended", "failed"})
MOVING = frozenset(
    {
        "creating",
        "starting",
        "stopping",
        "restarting",
        "suspending",
        "destroying",
        "updating",
        "replacing",
        "launch_failed",
    }
)
FINAL = frozenset({"destroyed", "replaced", "migrated"})
ALL_STATES = RESTING | MOVING | FINAL
WAITABLE = frozenset({"started", "stopped", "suspended", "destroyed", "failed", "settled"})

MAX_EVENTS = 50  # per machine: the most the real API's events endpoint returns
EVENTS_DEFAULT = 20  # what it returns without ?limit
MAX_DELETED = 50  # destroyed machines an app lists with include_deleted
MAX_PAST_CONFIGS = 10  # earlier configs kept per machine for GET .../versions


def now_rfc3339(clock: float | None = None) -> str:
    """Second-precision RFC 3339 in UTC, the form the real API sends."""
    stamp = datetime.fromtimestamp(time.time() if clock is None else clock, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def internal_port_of(config: dict[str, Any]) -> int:
    """The port a machine's process must listen on: the first service's internal_port."""
    for service in config.get("services") or []:
        port = service.get("internal_port")
        if isinstance(port, int):
            return port
    return 8080


class Ids:
    """Identifier factory; the random source is injectable so tests can be reproducible."""

    _ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def hex(self, n: int) -> str:
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(n))

    def machine(self) -> str:
        return self.hex(14)  # Fly machine ids are 14 hex digits

    def volume(self) -> str:
        return "vol_" + "".join(
            self._rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16)
        )

    def instance(self) -> str:
        return "".join(self._rng.choice(self._ULID_ALPHABET) for _ in range(26))

    def event(self) -> str:
        return self.instance()


@dataclass
class Event:
    id: str
    type: str  # launch, start, stop, suspend, exit, update, restart, destroy
    status: str  # the state this event leads to
    source: str  # "user" for API calls, "flyd" for what the platform did on its own
    timestamp: int  # milliseconds, like the real API
    request: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "source": self.source,
            "timestamp": self.timestamp,
        }
        if self.request:
            out["request"] = self.request
        return out


# The event that ends a transition, by the type of the event that began it: a stop ends in
# "exit" (status stopped), a restart or a launch in "start" (started), the others in their
# own type, as Fly's machines show them (docs/emulator.md, "Events").
_ENDED_BY = {
    "launch": "start",
    "start": "start",
    "restart": "start",
    "stop": "exit",
    "suspend": "suspend",
    "update": "update",
    "destroy": "destroy",
}


def settled_event(
    m: Machine, previous: str, state: str, source: str, request: dict[str, Any] | None
) -> tuple[str | None, str, dict[str, Any] | None]:
    """(type, source, request) of the event a change from ``previous`` to ``state`` records
    when its caller named none: an event only when a transition ends (a moving state gives
    way to a resting or final one), by the platform ("flyd")."""
    if previous not in MOVING or state not in RESTING | FINAL or not m.events:
        return None, source, request
    began = m.events[-1].type
    kind = _ENDED_BY.get(began)
    if kind is None:
        return None, source, request
    if kind == "update" and state == "started":
        kind = "start"  # the new version booted
    if kind == "exit" and not request:
        request = {"exit_event": {"requested_stop": True}}
    return kind, "flyd", request


@dataclass
class CheckResult:
    """One health check's latest result, as the real API's CheckStatus."""

    name: str
    status: str  # passing, warning or critical
    output: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "output": self.output,
            "updated_at": self.updated_at,
        }


@dataclass
class Machine:
    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    instance_id: str
    private_ip: str
    created_at: str
    updated_at: str
    state: str = "created"
    cordoned: bool = False
    events: list[Event] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # earlier instance ids, oldest first
    # The configs of the latest earlier versions, by instance id (GET .../versions).
    past_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: int = 0  # automatic restarts since the last start by a user
    host_status: str = "ok"  # ok or unreachable (faults.host_unreachable), as the real API
    # Runtime only, never persisted: replaced and set on every change, so /wait can block
    # on the current one without polling and without holding a lock.
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Runtime only: the health checks' latest results, by check name (checks.py).
    checks: dict[str, CheckResult] = field(default_factory=dict, repr=False)

    def touch(self) -> None:
        """Wake everyone waiting on this machine."""
        fired, self.changed = self.changed, asyncio.Event()
        fired.set()

    @property
    def internal_port(self) -> int:
        return internal_port_of(self.config)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "config": self.config,
            "cordoned": self.cordoned,
            "events": [e.to_json() for e in reversed(self.events)],
            "host_status": self.host_status,
            **({"checks": [c.to_json() for c in self.checks.values()]} if self.checks else {}),
        }

    def to_state(self) -> dict[str, Any]:
        out = self.to_json()
        out["app"] = self.app
        out["versions"] = list(self.versions)
        out["past_configs"] = dict(self.past_configs)
        out.pop("checks", None)  # results of a process that does not survive a restart
        return out

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Machine:
        events = [
            Event(
                id=e["id"],
                type=e["type"],
                status=e["status"],
                source=e["source"],
                timestamp=e["timestamp"],
                request=e.get("request", {}),
            )
            for e in reversed(data.get("events", []))
        ]
        return cls(
            id=data["id"],
            app=data["app"],
            name=data["name"],
            region=data["region"],
            config=data["config"],
            instance_id=data["instance_id"],
            private_ip=data["private_ip"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            state=data["state"],
            cordoned=data.get("cordoned", False),
            events=events,
            versions=list(data.get("versions", [])),
            past_configs=dict(data.get("past_configs", {})),
        )


@dataclass
class Volume:
    id: str
    name: str
    size_gb: int
    region: str
    zone: str
    encrypted: bool
    snapshot_retention: int
    created_at: str
    state: str = "created"
    filesystem_type: str = "ext4"
    attached_machine_id: str | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "size_gb": self.size_gb,
            "region": self.region,
            "zone": self.zone,
            "encrypted": self.encrypted,
            "filesystem_type": self.filesystem_type,
            "snapshot_retention": self.snapshot_retention,
            "created_at": self.created_at,
        }
        # The seed types these as plain strings, so an unattached volume omits them.
        if self.attached_machine_id:
            out["attached_machine_id"] = self.attached_machine_id
            out["attached_alloc_id"] = self.attached_machine_id
        return out

    def to_state(self) -> dict[str, Any]:
        out = self.to_json()
        out["attached_machine_id"] = self.attached_machine_id
        out["snapshots"] = self.snapshots
        out.pop("attached_alloc_id", None)
        return out

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Volume:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class App:
    id: str
    name: str
    org_slug: str
    network: str
    created_at: str
    machines: dict[str, Machine] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    # Runtime only: the latest destroyed machines, oldest first (list ?include_deleted).
    deleted: list[Machine] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        live = [m for m in self.machines.values() if m.state != "destroyed"]
        running = any(m.state == "started" for m in live)
        return {
            "id": self.id,
            "name": self.name,
            "status": "deployed" if running else "suspended" if live else "pending",
            "machine_count": len(live),
            "volume_count": len(self.volumes),
            "network": self.network,
            "organization": {"name": self.org_slug, "slug": self.org_slug},
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "org_slug": self.org_slug,
            "network": self.network,
            "created_at": self.created_at,
            # A destroy that was accepted is kept, also one that waited for an unreachable
            # host (faults do not survive a restart: the host is back, the machine gone).
            "machines": [
                m.to_state()
                for m in self.machines.values()
                if m.state not in ("destroyed", "destroying")
            ],
            "volumes": [v.to_state() for v in self.volumes.values()],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> App:
        app = cls(
            id=data["id"],
            name=data["name"],
            org_slug=data["org_slug"],
            network=data["network"],
            created_at=data["created_at"],
        )
        for m in data.get("machines", []):
            machine = Machine.from_state(m)
            app.machines[machine.id] = machine
        for v in data.get("volumes", []):
            volume = Volume.from_state(v)
            app.volumes[volume.id] = volume
        return app

"""The emulator's store: apps, machines and volumes, with lookups and the rules between them.

HTTP-free, so the API handlers stay thin and tests can drive the world directly. Errors are
exceptions the API maps to statuses: NotFound 404, BadRequest 400, Conflict 412, NameTaken
422.
"""

from __future__ import annotations

import copy
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from autoscaler.config import EmulatorApp, EmulatorSettings, FaultSettings
from autoscaler.emulator.checks import DEMO_CHECK
from autoscaler.emulator.machines import DEFAULT_GUEST, Conflict, Lifecycle, is_demo_image
from autoscaler.emulator.model import (
    MAX_DELETED,
    MAX_PAST_CONFIGS,
    App,
    Ids,
    Machine,
    Volume,
    internal_port_of,
    now_rfc3339,
)
from autoscaler.emulator.procs import AddressPool, NoAddress
from autoscaler.emulator.validate import BadRequest
from autoscaler.logs import get_logger

log = get_logger(__name__)

DEFAULT_REGION = "iad"
DEFAULT_PROCESS_GROUP = "app"  # a machine's group when fly.toml has no [processes]
_TOMBSTONES = 10_000  # destroyed machine ids remembered, so /wait?state=destroyed succeeds


def _fill_guest(config: dict[str, Any]) -> None:
    """A config without a guest (or ``null``, ``{}``) gets Fly's default size, as Fly
    fills it in: shared-cpu-1x, 256 MB."""
    if not config.get("guest"):
        config["guest"] = dict(DEFAULT_GUEST)


class NotFound(Exception):
    """An unknown app, machine, volume or metadata key (HTTP 404)."""


class NameTaken(Exception):
    """An app name already in use (HTTP 422, as on the real API)."""


class World:
    def __init__(
        self,
        settings: EmulatorSettings,
        *,
        rng: random.Random,
        on_change: Callable[[], None],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.wall = wall
        """The emulator's time of day, Fly's clock (``Emulator``'s ``wall``)."""
        self.ids = Ids(rng)
        self.pool = AddressPool(rng, ipv6=settings.ipv6)
        self.apps: dict[str, App] = {}
        self._gone: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._on_change = on_change
        self.lifecycle = Lifecycle(
            settings,
            ids=self.ids,
            rng=rng,
            pool=self.pool,
            on_change=on_change,
            on_gone=self._forget,
            find=self._by_id,
            wall=wall,
        )

    # --- lookups -------------------------------------------------------------------

    def app(self, name: str) -> App:
        try:
            return self.apps[name]
        except KeyError:
            raise NotFound(f"app not found: {name}") from None

    def machine(self, app_name: str, machine_id: str) -> Machine:
        app = self.app(app_name)
        try:
            return app.machines[machine_id]
        except KeyError:
            raise NotFound(f"machine not found: {machine_id}") from None

    def volume(self, app_name: str, volume_id: str) -> Volume:
        app = self.app(app_name)
        try:
            return app.volumes[volume_id]
        except KeyError:
            raise NotFound(f"volume not found: {volume_id}") from None

    def _by_id(self, machine_id: str) -> Machine | None:
        for app in self.apps.values():
            m = app.machines.get(machine_id)
            if m is not None:
                return m
        return None

    def was_destroyed(self, app_name: str, machine_id: str) -> bool:
        return (app_name, machine_id) in self._gone

    # --- a state file's apps ---------------------------------------------------------

    def restore(self, apps: dict[str, App]) -> None:
        """Take in the apps of a state file (persist.load), every machine's address held.

        A machine saved by an emulator of the other family (``emulator.ipv6`` turned on or
        off since) gets an address of this one's, as a new machine would: kept, an IPv4
        machine of an ``ipv6`` emulator listened on 127.x, where nothing of ::1's one
        machine per port held, and the reverse put machines of one port together on ::1
        beside 127.x ones. (On Fly a machine keeps its address; here no process survives
        the restart, so nothing listens on the old one.) NoAddress when one cannot have
        an address (two of them on one port on ::1): the emulator does not start.
        """
        self.apps.update(apps)
        moved = []
        for app in apps.values():
            for m in app.machines.values():
                if (":" in m.private_ip) == self.settings.ipv6:
                    self.pool.reserve(m.private_ip, m.internal_port)
                else:
                    moved.append(m)
        for m in moved:  # after the others: a machine that kept its address keeps its port
            try:
                new = self.pool.readdress(m.internal_port)
            except NoAddress as exc:
                family = "without" if self.settings.ipv6 else "with"
                raise NoAddress(
                    f"machine {m.id} of app {m.app} was saved {family} emulator.ipv6 and"
                    f" cannot move to this emulator's addresses: {exc}"
                ) from None
            log.info(
                "emulator_machine_readdressed", app=m.app, machine=m.id, was=m.private_ip, now=new
            )
            m.private_ip = new

    # --- faults ----------------------------------------------------------------------

    def set_faults(self, faults: FaultSettings) -> None:
        """Replace the faults in force; per-machine ones take effect at once. A rise of
        the error rate wakes every /wait in flight, which it may end (api.wait_machine)."""
        rose = faults.error_rate > self.lifecycle.faults.error_rate
        self.lifecycle.set_faults(faults)
        if rose:
            for app in self.apps.values():
                for m in app.machines.values():
                    m.touch()

    # --- apps ------------------------------------------------------------------------

    def create_app(self, name: str, org_slug: str, network: str | None = None) -> App:
        if org_slug != self.settings.org_slug:
            raise BadRequest(
                f"org_slug: unknown organization {org_slug!r} "
                f"(this emulator has one: {self.settings.org_slug!r})"
            )
        if name in self.apps:
            raise NameTaken(f"app name {name!r} is already taken")
        app = App(
            id=self.ids.hex(16),
            name=name,
            org_slug=org_slug,
            network=network or "default",
            created_at=now_rfc3339(self.wall()),
        )
        self.apps[name] = app
        self._on_change()
        return app

    def delete_app(self, name: str, force: bool) -> None:
        app = self.app(name)
        busy = [
            m.id
            for m in app.machines.values()
            if m.state not in ("stopped", "created", "failed", "destroyed", "suspended")
        ]
        if busy and not force:
            raise Conflict(
                f"app {name!r} has machines that are not stopped ({', '.join(busy)}); "
                "stop them first or pass force=true"
            )
        for m in list(app.machines.values()):
            if m.state not in ("destroying", "destroyed"):
                self.lifecycle.destroy(m, force=True)
        del self.apps[name]
        self._on_change()

    def seed_app(self, spec: EmulatorApp) -> None:
        """A start-up app from the config; an app already loaded from the state file stays.
        An image the emulator refuses (``strict_images``) is BadRequest, before the app is
        made."""
        self._check_image({"image": spec.image})
        app = self.apps.get(spec.name) or self.create_app(spec.name, self.settings.org_slug)
        missing = spec.machines - len(app.machines)
        regions = spec.regions or [DEFAULT_REGION]
        # What `fly deploy` writes into every machine of an app without [processes]: its
        # fly.toml's primary_region (here the first region) and its process group, `app`,
        # in config.env and the group in metadata too. The app's own env wins: the
        # emulator's config has no primary_region key, so env is where one is said.
        env = {"PRIMARY_REGION": regions[0], "FLY_PROCESS_GROUP": DEFAULT_PROCESS_GROUP}
        config: dict[str, Any] = {
            "image": spec.image,
            "env": env | dict(spec.env),
            "metadata": {"fly_process_group": DEFAULT_PROCESS_GROUP},
            "services": [
                {
                    "protocol": "tcp",
                    "internal_port": spec.internal_port,
                    "ports": [{"port": 80, "handlers": ["http"]}],
                }
            ],
            # No restart policy, as `fly launch` leaves it: Fly's default (on-failure)
            # restarts a crashed machine, up to 10 times.
        }
        if is_demo_image(spec.image):
            # Its check, as fly.toml's [[http_service.checks]] declares one: a check of the
            # service (which Fly's proxy routes by), reported as servicecheck-00-http-<port>.
            config["services"][0]["checks"] = [dict(DEMO_CHECK)]
        for i in range(len(app.machines), len(app.machines) + max(0, missing)):
            region = regions[i % len(regions)]  # round-robin, as Fly spreads a count
            m = self.create_machine(app, copy.deepcopy(config), None, region)
            self.lifecycle.record(m, "stopped")  # they wait, stopped, for the first request

    # --- machines --------------------------------------------------------------------

    def create_machine(
        self, app: App, config: dict[str, Any], name: str | None, region: str | None
    ) -> Machine:
        self._check_image(config)
        _fill_guest(config)
        private_ip = self._address(internal_port_of(config))  # before anything is attached
        mid = self.ids.machine()
        try:
            self._attach(app, mid, config)
        except BadRequest:
            self.pool.release(private_ip, internal_port_of(config))
            raise
        stamp = now_rfc3339(self.wall())
        m = Machine(
            id=mid,
            app=app.name,
            name=name or f"{app.name}-{mid[:6]}",
            region=region or DEFAULT_REGION,
            config=config,
            instance_id=self.ids.instance(),
            private_ip=private_ip,
            created_at=stamp,
            updated_at=stamp,
        )
        app.machines[mid] = m
        self.lifecycle.record(m, "created", "launch")
        return m

    def _check_image(self, config: dict[str, Any]) -> None:
        if self.lifecycle.resolve_image(str(config["image"])) is None:
            known = ", ".join(sorted(self.lifecycle.images))
            raise BadRequest(
                f"config.image: {config['image']!r} is not in the emulator's image table "
                f"(known: {known}; emulator.strict_images is on)"
            )

    def _address(self, port: int) -> str:
        try:
            return self.pool.allocate(port)
        except NoAddress as exc:
            raise Conflict(str(exc)) from None

    def update_machine(
        self, m: Machine, config: dict[str, Any], name: str | None, region: str | None
    ) -> None:
        self._check_image(config)
        _fill_guest(config)
        if region and region != m.region:
            raise BadRequest(f"region: a machine cannot move regions ({m.region} to {region})")
        app = self.app(m.app)
        old_version, old_config = m.instance_id, m.config
        ports = m.internal_port, internal_port_of(config)
        try:
            self.pool.move(m.private_ip, *ports)  # Fly keeps the address across an update
        except NoAddress as exc:
            raise Conflict(str(exc)) from None
        self._detach(app, m.id)
        try:
            self._attach(app, m.id, config)
            self.lifecycle.update(m, config, name)  # refuses (409/412) in a moving state
        except Exception:
            self._detach(app, m.id)  # a refused update leaves the volumes as they were
            self._attach(app, m.id, m.config)
            self.pool.move(m.private_ip, *reversed(ports))  # and the address
            raise
        m.past_configs[old_version] = old_config
        for version in list(m.past_configs)[:-MAX_PAST_CONFIGS]:
            del m.past_configs[version]

    def destroy_machine(self, m: Machine, force: bool) -> None:
        self.lifecycle.destroy(m, force)

    def _forget(self, m: Machine) -> None:
        app = self.apps.get(m.app)
        if app is not None and app.machines.get(m.id) is m:
            del app.machines[m.id]
            self._detach(app, m.id)
            app.deleted.append(m)
            del app.deleted[:-MAX_DELETED]
        self._gone[(m.app, m.id)] = None
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)
        self._on_change()

    # --- volumes ---------------------------------------------------------------------

    def _attach(self, app: App, machine_id: str, config: dict[str, Any]) -> None:
        wanted = [m.get("volume") for m in config.get("mounts") or [] if m.get("volume")]
        for vid in wanted:
            vol = app.volumes.get(vid)
            if vol is None:
                raise BadRequest(f"config.mounts: volume {vid!r} not found in app {app.name!r}")
            if vol.attached_machine_id not in (None, machine_id):
                raise BadRequest(
                    f"config.mounts: volume {vid!r} is attached to {vol.attached_machine_id}"
                )
        for vid in wanted:
            app.volumes[vid].attached_machine_id = machine_id

    def _detach(self, app: App, machine_id: str) -> None:
        for vol in app.volumes.values():
            if vol.attached_machine_id == machine_id:
                vol.attached_machine_id = None

    def create_volume(self, app: App, body: dict[str, Any]) -> Volume:
        vol = Volume(
            id=self.ids.volume(),
            name=body["name"],
            size_gb=body["size_gb"],
            region=body["region"],
            zone=self.ids.hex(4),
            encrypted=body.get("encrypted", True),
            snapshot_retention=body.get("snapshot_retention", 5),
            created_at=now_rfc3339(self.wall()),
        )
        app.volumes[vol.id] = vol
        self._on_change()
        return vol

    def delete_volume(self, app: App, vol: Volume) -> None:
        if vol.attached_machine_id:
            raise Conflict(f"volume {vol.id} is attached to machine {vol.attached_machine_id}")
        vol.state = "destroyed"
        del app.volumes[vol.id]
        self._on_change()

    def snapshot_volume(self, vol: Volume) -> dict[str, Any]:
        snap = {
            "id": "vs_" + self.ids.hex(16),
            "size": vol.size_gb * 1024**3 // 10,
            "digest": self.ids.hex(64),
            "created_at": now_rfc3339(self.wall()),
            "status": "created",
        }
        vol.snapshots.append(snap)
        self._on_change()
        return snap

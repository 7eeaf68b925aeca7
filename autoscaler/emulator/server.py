"""``Emulator``: the in-process handle the demo, the tests and the CLI share.

    async with Emulator(settings, host="127.0.0.1", port=0) as emu:
        emu.url, emu.token

Leaving the block stops the API, kills every machine process and saves the state file.
"""

from __future__ import annotations

import random
import secrets
import signal
import time
from collections.abc import Callable
from email.utils import formatdate
from types import TracebackType
from typing import Any

from aiohttp import web

from autoscaler.config import (
    ConfigError,
    EmulatorSettings,
    FaultSettings,
    is_loopback,
    parse_host_port,
)
from autoscaler.emulator import faults as fault_routes
from autoscaler.emulator.api import Context, build_app
from autoscaler.emulator.leases import Lease
from autoscaler.emulator.limits import RateLimiter
from autoscaler.emulator.model import Event, Machine
from autoscaler.emulator.persist import Saver, StateFileError, load
from autoscaler.emulator.procs import MachineProcess, NoAddress
from autoscaler.emulator.validate import BadRequest
from autoscaler.emulator.world import World
from autoscaler.logs import get_logger

log = get_logger(__name__)


class Emulator:
    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        host: str | None = None,
        port: int | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
    ) -> None:
        """``wall``: the emulator's time of day, Fly's clock, for tests of a skew between
        Fly's clock and ours (its machines' event times, ``created_at``, ``updated_at``,
        the checks' times and every answer's ``Date`` read it); the host's by default."""
        self.settings = settings or EmulatorSettings()
        listen = parse_host_port(self.settings.listen, listen=True)
        self.host = host if host is not None else listen.host
        self.port = port if port is not None else listen.port
        if not is_loopback(self.host):
            # Its token runs commands on this host (a machine's cmd and env): never on the
            # network. EmulatorSettings.listen refuses such an address too.
            raise ValueError(f"the emulator listens on loopback only, not on {self.host!r}")
        secret = self.settings.token
        self.token: str = secret.get_secret_value() if secret else secrets.token_urlsafe(24)
        self._rng = rng or random.Random()  # noqa: S311 - ids and faults, not secrets
        self._clock = clock  # of the rate limits' buckets (a test's frozen time)
        self._wall = wall
        self._saver: Saver | None = None
        self._runner: web.AppRunner | None = None
        self._world: World | None = None
        self._ctx: Context | None = None
        self._bound_port = 0

    def __repr__(self) -> str:  # the token stays out of reprs and logs
        return f"Emulator(url={self.url!r})" if self._runner else "Emulator(stopped)"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port or self.port}"

    @property
    def world(self) -> World:
        if self._world is None:
            raise RuntimeError("the emulator is not started")
        return self._world

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        state_file = self.settings.state_file
        world = World(
            self.settings, rng=self._rng, on_change=self._changed, wall=self._wall or time.time
        )
        self._world = world
        if state_file is not None:
            try:
                world.restore(load(state_file))
            except NoAddress as exc:
                raise StateFileError(f"{state_file}: {exc}") from None
            saver = Saver(state_file, world.apps)
            saver.save_now()  # a file that cannot be written is said now, not at exit
            self._saver = saver
        for i, spec in enumerate(self.settings.apps):
            try:
                world.seed_app(spec)
            except BadRequest as exc:  # its image, under strict_images: a config error
                await self.close()
                raise ConfigError([f"emulator.apps[{i}] ({spec.name}): {exc}"]) from None
        for warning in self.settings.placeholder_warnings():  # config.EmulatorSettings's
            log.warning("emulator_image_placeholder_unsure", warning=warning)
        self._ctx = Context(
            world=world,
            token=self.token,
            rng=self._rng,
            rate_limits=self.settings.rate_limits,
            oidc_key=secrets.token_bytes(32),
            limiter=RateLimiter(self._clock) if self._clock else RateLimiter(),
        )
        api = build_app(self._ctx)
        fault_routes.add_routes(api)
        if self._wall is not None:
            api.on_response_prepare.append(self._date)
        # A client that hangs up cancels its call (a /wait blocks for up to 60 s), and
        # closing gives the calls still under way 2 s, not aiohttp's default minute.
        self._runner = web.AppRunner(
            api, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self.close()
            raise
        sockets = [s for s in self._runner.addresses if isinstance(s, tuple)]
        self._bound_port = int(sockets[0][1]) if sockets else self.port
        log.info("emulator_listening", url=self.url)

    async def close(self) -> None:
        """Stop answering, kill every machine process, save the state. Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._world is not None:
            await self._world.lifecycle.close()
        if self._saver is not None:
            await self._saver.close()
            self._saver = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer's ``Date`` on the emulator's clock (``wall``), as Fly's are on its."""
        if self._wall is not None:
            response.headers["Date"] = formatdate(self._wall(), usegmt=True)

    def _changed(self) -> None:
        if self._saver is not None:
            self._saver.changed()

    # --- helpers for tests and the demo ----------------------------------------------

    def machine(self, app: str, machine_id: str) -> Machine:
        """The live machine record (read it, do not mutate it)."""
        return self.world.machine(app, machine_id)

    def machines(self, app: str) -> list[Machine]:
        return list(self.world.app(app).machines.values())

    def process(self, app: str, machine_id: str) -> MachineProcess | None:
        """The machine's running process, if any."""
        self.world.machine(app, machine_id)
        return self.world.lifecycle.procs.get(machine_id)

    def pids(self) -> list[int]:
        """Every machine process this emulator has running now."""
        return [mp.pid for mp in self.world.lifecycle.procs.values()]

    def spawned_pids(self) -> list[int]:
        """Every machine process this emulator ever started (running or not)."""
        return list(self.world.lifecycle.spawned)

    def kill_machine_process(self, app: str, machine_id: str, sig: int = signal.SIGKILL) -> bool:
        """Simulate a crash; the machine then restarts or stops, per its restart policy
        (without one Fly's default, ``on-failure``, restarts it)."""
        return self.world.lifecycle.kill_process(self.world.machine(app, machine_id), sig)

    @property
    def faults(self) -> FaultSettings:
        """The faults in force now."""
        return self.world.lifecycle.faults

    def set_faults(self, faults: FaultSettings | None = None, /, **changes: Any) -> FaultSettings:
        """Change fault injection at run time, at once (as ``POST /_emulator/faults``).

        ``set_faults(FaultSettings(...))`` replaces every fault; ``set_faults(error_rate=1.0)``
        changes only the named ones (``None`` turns one off). Returns the faults in force.
        """
        base = faults if faults is not None else self.world.lifecycle.faults
        self.world.set_faults(fault_routes.changed(base, changes) if changes else base)
        return self.world.lifecycle.faults

    def set_rate_limits(self, enabled: bool) -> None:
        if self._ctx is not None:
            self._ctx.rate_limits = enabled

    def lease(self, app: str, machine_id: str) -> Lease | None:
        """The lease held on the machine now (None: none, or lapsed), as ``GET .../lease``
        shows it: its owner, description, nonce and expiry."""
        self.world.machine(app, machine_id)
        if self._ctx is None:
            raise RuntimeError("the emulator is not started")
        return self._ctx.leases.current(machine_id)

    def watch_events(self, watcher: Callable[[Machine, Event], None]) -> Callable[[], None]:
        """Call ``watcher`` with every machine event as it is recorded, until the returned
        function is called. A machine keeps only its last 50 (``MAX_EVENTS``, what the
        real API returns), and a destroyed one's go with it: whoever counts events over a
        long run (a soak) sees them all here, none lost to the cap or to a sample's gap."""
        watchers = self.world.lifecycle.event_watchers
        watchers.append(watcher)

        def unwatch() -> None:
            if watcher in watchers:
                watchers.remove(watcher)

        return unwatch

    def output(self, app: str, machine_id: str) -> list[str]:
        """The last lines a machine's process printed (for diagnosing a failed boot)."""
        self.world.machine(app, machine_id)
        return list(self.world.lifecycle.outputs.get(machine_id, ()))

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "apps": sorted(self.world.apps)}

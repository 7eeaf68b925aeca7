"""The composition root of ``autoscaler run``: builds every part, starts and stops them in order.

Start, inside out: the embedded emulator (only when ``fly.api_url`` is ``embedded``, or
unset: ``autoscaler run`` refuses that unless given --emulator; the demo and tests), the
Machines API client (none for ``autoscaler run`` on static apps alone without
``fly.api_url``), the fleet view, the controller (its loops and the wake path), the proxy,
and the admin server. Stop, outside in, so that no request meets a half-stopped service:
readiness fails first (load balancers stop sending), the proxy stops accepting and lets
requests in flight finish (``proxy.shutdown_timeout_s``), then the controller's loops and
actions stop (it lets go of the apps a reload under way was removing, and gives back the
machine leases of the actions it cuts, within ``control.api_timeout_s``), and the client
and the emulator close last.

Signals: SIGTERM and SIGINT stop gracefully (a second one stops at once: requests held
for a wake still get their 503, as does one whose machine refuses its connection after,
those at a machine are cut; one held back by ``autoscaler run`` until ``run`` had its
handlers stops it before anything starts); SIGHUP reloads
the configuration file (not during the stop); SIGUSR2 (the rolling restart of ``run
--workers``, sent to one process) is logged and ignored. A reload that does not validate
is rejected whole (the running configuration stays, the problems are logged,
``autoscaler_config_reloads{result="error"}`` counts it); a valid one reaches the controller
and the proxy. ``proxy.listen`` and the ``fly``, ``emulator``, ``admin`` and ``cluster``
sections take effect only on restart; a reload that changes them says so in a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from autoscaler import HELD_SIGNALS, __version__
from autoscaler.admin import AdminServer
from autoscaler.config import (
    EMBEDDED,
    ConfigError,
    ListenHosts,
    Settings,
    load_settings,
    no_apps_problem,
    no_redis_problem,
    no_token_problem,
    parse_host_port,
    resolve_listen_host,
    unreachable,
)
from autoscaler.control.controller import Controller, freeze_heap
from autoscaler.control.schedule import stalled_after_s
from autoscaler.control.view import Clock, FleetView
from autoscaler.emulator import Emulator, StateFileError
from autoscaler.fly.autostop import fight_warning
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.models import Machine
from autoscaler.logs import get_logger, process_keys, redactor
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

if TYPE_CHECKING:  # imported at run time only in cluster mode (it brings in redis)
    from autoscaler.control.replica import Replica

T = TypeVar("T")

_log = get_logger("autoscaler.service")
# Sections a running process cannot change: bound to sockets, the client or the emulator.
_RESTART_ONLY = ("fly", "emulator", "admin", "cluster")
NO_API_URL = (
    "{path}: fly.api_url is not set{why}: set it to the Machines API (https://api.machines.dev,"
    " or http://_api.internal:4280 inside Fly), or ask for the embedded emulator with"
    " --emulator or fly.api_url: embedded"
)


def _scaled(settings: Settings) -> list[str]:
    """The apps that need the Machines API (no ``backends``)."""
    return [app.name for app in settings.apps if not app.static]


def _no_api_url(path: object, settings: Settings) -> str:
    scaled = _scaled(settings)
    why = f" and app {scaled[0]} is scaled (it has no backends)" if scaled else ""
    return NO_API_URL.format(path=path, why=why)


def start_problem(path: Path, settings: Settings) -> str | None:
    """Why ``autoscaler run`` does not start on these settings (a reload may still take
    some of them), or None: no app at all, an app to scale without ``fly.api_url`` (static
    apps alone need no Machines API), or through Fly's API without a token, or cluster
    mode without the Redis client. The supervisor of ``run --workers`` asks it once,
    before any worker starts (each would say it, and the group stop)."""
    if not settings.apps:
        return no_apps_problem(path)
    if settings.fly.api_url is None and _scaled(settings):
        return _no_api_url(path, settings)
    return no_token_problem(path, settings) or no_redis_problem(path, settings)


CONFIG_REFUSED = 2
"""``autoscaler run``'s exit code when it refuses its configuration, before anything starts
(the supervisor of ``run --workers`` does not start such a worker again)."""

LISTEN_REFUSED = 3
"""``autoscaler run``'s exit code when one of its servers could not listen on its address at
the start (a port in use by another process, an address not of this host or not allowed:
``start_failed`` with its ``key``). Started again, it would fail again, however long it ran
before: the supervisor of ``run --workers`` does not start such a worker again. Another OS
error at the start exits 1."""

WORKER_ENV = "_AUTOSCALER_WORKER"
"""The worker's index, which the ``run --workers`` supervisor gives each worker (outside
``AUTOSCALER_*``: not a setting). The workers share one configuration: what is said of it
(``config_loaded``, a reload's lines, ``app_unreachable``) is logged by one worker alone, not
once by each (:attr:`Service.speaks_for_config`). Every line a worker writes carries its
index (``worker``: :func:`autoscaler.logs.process_keys`); a plain run's carry none."""

SPEAKER_ENV = "_AUTOSCALER_SPEAKER"
"""The file in which the ``run --workers`` supervisor names the worker that speaks for the
configuration: the lowest slot with a worker in it, which is worker 0 but while a failed
rolling restart leaves slot 0 empty (then nobody said a reload's outcome, a rejected one
too). Read at each line to say: the speaker changes while the workers run."""


def warn_unreachable(settings: Settings) -> None:
    """Log :func:`unreachable`'s apps, one line each: check-config warned of them, and
    ``run``, which is often given a config that was never checked, said nothing."""
    for app, problem in unreachable(settings).items():
        _log.warning("app_unreachable", app=app, problem=problem)


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class Service:
    """Everything ``autoscaler run`` runs, in one object.

    ``overrides`` are the CLI's settings (they win over the file on every reload), and
    ``flags`` the flag that set each of their key paths (load_settings: its problems say it);
    ``proxy_port`` / ``admin_port`` bind other ports than the configured ones (0 picks a
    free one: tests).
    """

    def __init__(
        self,
        settings: Settings,
        config_path: str | Path | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        flags: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        proxy_port: int | None = None,
        admin_port: int | None = None,
        emulator_port: int | None = None,
        without_api: bool = False,
        listen_hosts: ListenHosts | None = None,
        worker: int = 0,
        speaker: Path | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        """Its index under ``run --workers`` (:data:`WORKER_ENV`); 0 in one process."""
        self.speaker = speaker
        """The supervisor's file naming the worker that speaks (:data:`SPEAKER_ENV`)."""
        self.without_api = without_api
        """No Machines API (``autoscaler run`` on a config without ``fly.api_url`` whose apps
        are all static): no emulator either, and a reload that adds a scaled app is refused."""
        self.listen_hosts = listen_hosts
        """The listen hosts' names as the start resolved them (``autoscaler run``): a reload
        takes them at those addresses (an admin server on a name of this host's loopback
        needs no token) without asking a name service in the event loop."""
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.flags = dict(flags or {})
        self.metrics = metrics or Metrics(version=__version__)
        self.clock = clock
        self._ports = {"proxy": proxy_port, "admin": admin_port, "emulator": emulator_port}
        self.emulator: Emulator | None = None
        self.client: MachinesClient | None = None
        self.view = FleetView(clock)
        self.controller: Controller | None = None
        self.replica: Replica | None = None
        self.proxy: ProxyServer | None = None
        self.admin: AdminServer | None = None
        self._parts = contextlib.AsyncExitStack()
        """Each part's stop, pushed as the part starts: ``stop`` runs them in reverse, and
        one that fails does not keep the others from running (the emulator's machine
        processes are reaped whatever failed before)."""
        self._stopped = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = False
        """Every part started (``start`` returned): an OS error out of ``run`` after that
        is a part's stop's, already logged as ``stop_failed``, not a failed start."""
        self.binding: tuple[str, str] | None = None
        """The listen key and address of the server starting (cleared once it listens):
        what a failed start's OS error was about, for ``start_failed``."""
        self._reload_again = False
        self._autostop_checked: set[str] = set()
        self.freeze_heap = False
        """The process is this service's alone (``autoscaler run``): once every app was
        read, the controller freezes the heap for the garbage collector (``gc.freeze``)."""
        for secret in settings.secrets():
            redactor().add(secret)
        self._declare_apps(settings)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every part; on a failure, stop what had started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.started = True

    async def _start(self) -> None:
        s = self.settings
        self._warn_unreachable(s)
        if self.without_api:
            self.client = MachinesClient.unconfigured(observer=self.metrics.observe_api)
        elif not s.fly.embedded:
            self.client = MachinesClient.from_settings(s.fly, observer=self.metrics.observe_api)
        else:
            listen = parse_host_port(s.emulator.listen, listen=True)
            port = self._ports["emulator"]
            self.emulator = Emulator(s.emulator, listen.host, listen.port if port is None else port)
            self._on_stop("emulator", self.emulator.close)  # also when its start fails midway
            self.binding = ("emulator.listen", s.emulator.listen)
            await self.emulator.start()
            self.binding = None
            redactor().add(self.emulator.token)
            _log.info("embedded_emulator", url=self.emulator.url)
            self._warn_lacking(s)
            self.client = MachinesClient.from_settings(
                s.fly,
                base_url=self.emulator.url,
                token=self.emulator.token,
                observer=self.metrics.observe_api,
            )
        self._on_stop("client", self.client.aclose)
        if s.cluster.redis_url is not None:
            from autoscaler.control.replica import Replica

            self.replica = Replica(
                s,
                self.client,
                self.view,
                self.metrics,
                clock=self.clock,
                budget=self.client.limiter,
                freeze_heap=freeze_heap if self.freeze_heap else None,
            )
            self.controller = self.replica.controller
        else:
            self.controller = Controller(
                self.client,
                self.view,
                s,
                self.metrics,
                clock=self.clock,
                budget=self.client.limiter,
                freeze_heap=freeze_heap if self.freeze_heap else None,
            )
            self.metrics.cluster_leader.set(1)
            self.metrics.cluster_replicas.set(1)
        self.controller.on_first_list = self._warn_fly_autoscaling
        self.admin = AdminServer(
            s.admin,
            self.metrics,
            self.controller,
            tick_s=s.control.tick_s,
            max_tick_age_s=_stalled_after_s(s),
            secrets=[*s.secrets(), *([self.emulator.token] if self.emulator else [])],
            clock=self.clock,
        )
        self.admin.cluster = self.replica
        self.admin.proxy_listening = False  # the admin port opens first: not ready until then
        self._on_stop("admin", self.admin.stop)
        self.binding = ("admin.listen", s.admin.listen)
        await self.admin.start(port=self._ports["admin"])
        self.binding = None
        self._on_stop(None, self.view.close)  # after the loops stop: they may still wake
        # The controller before the proxy: the first request may need a wake. In cluster
        # mode the replica starts it when (and while) this process leads.
        if self.replica is not None:
            self._on_stop("replica", self.replica.stop)
            await self.replica.start()
        else:
            self._on_stop(None, self.controller.stop)
            await self.controller.start()
        self.proxy = ProxyServer(s, self.view, self.metrics)
        self._on_stop("proxy", self.proxy.stop)
        self.binding = ("proxy.listen", s.proxy.listen)
        await self.proxy.start(port=self._ports["proxy"])
        self.binding = None
        self.admin.proxy_listening = True
        self.admin.ejected = self.proxy.health.report
        self.admin.static_apps = lambda: [
            v for a in self.settings.apps if a.static and (v := self.view.apps.get(a.name))
        ]
        _log.info(
            "started",
            version=__version__,
            proxy_port=self.proxy.port,
            admin=self.admin.address,
            apps=[a.name for a in s.apps],
        )

    async def stop(self) -> None:
        """Stop in order (see the module docstring): the proxy, the controller's loops, the
        view, the admin server, the client, the emulator. A part whose stop fails is logged
        and the rest still stop; its error is raised at the end (the last one, with any
        earlier one as its context). Cancelled (a second SIGTERM), the part stopping then
        is cut short and the others still stop, also when that comes while the reload
        under way ends (the proxy's stop is cut short then). Idempotent."""
        self._stopping = True  # no reload from now on (request_reload)
        if self.admin is not None:
            self.admin.set_draining()
        if self._reloading is not None:
            self._reloading.cancel()
            try:
                await asyncio.gather(self._reloading, return_exceptions=True)
            except asyncio.CancelledError:
                # Cut short (a second SIGTERM) while the reload ended: the parts must still
                # stop, as when the cut comes during the proxy's drain. The cancellation
                # goes on to the first part's stop (the proxy's: it answers held requests
                # 503 and waits for nothing else); without it, nothing but the emulator
                # (_force_close) was stopped.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                    task.cancel()
        try:
            await self._parts.aclose()
        finally:
            self._stopped.set()

    _Part = Literal["emulator", "client", "admin", "replica", "proxy"]

    def _on_stop(self, attr: _Part | None, stop: Callable[[], Awaitable[object]]) -> None:
        """Push a part's stop; ``attr``, the attribute that holds the part, is cleared once
        it ran."""

        async def run() -> None:
            try:
                await stop()
            except asyncio.CancelledError:
                # Cut short (a second SIGTERM): the part stays, for _force_close to finish.
                raise
            except Exception as exc:
                _log.error("stop_failed", part=attr or stop.__qualname__, error=repr(exc))
                if attr is not None:
                    setattr(self, attr, None)
                raise
            if attr is not None:
                setattr(self, attr, None)

        self._parts.push_async_callback(run)

    @property
    def speaks_for_config(self) -> bool:
        """Whether it logs what concerns the configuration file (its load, a reload's
        outcome, the warnings of its content): the workers of ``run --workers`` each load
        the same file, and every such line came once per worker. The one the supervisor
        names (:data:`SPEAKER_ENV`); worker 0 without its file or when it cannot be read.
        What concerns the process alone (``started``, ``config_reload_crashed``, ...)
        every worker logs."""
        if self.speaker is not None:
            with contextlib.suppress(OSError, ValueError):
                return int(self.speaker.read_text(encoding="ascii")) == self.worker
        return self.worker == 0

    # --- reload -------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Load the file again and apply it; False (and nothing changes) if it is invalid."""
        try:
            known = self.listen_hosts.known if self.listen_hosts is not None else None
            new, path = load_settings(
                self.config_path, overrides=self.overrides, resolve=known, flags=self.flags
            )
        except ConfigError as exc:
            return self._rejected(exc.problems)
        if self.without_api and _scaled(new):
            # Started without a Machines API, which a reload cannot add (fly.* needs a
            # restart): an app to scale would fail every call.
            problem = _no_api_url(path, new)
            if new.fly.api_url is not None:
                problem = f"{path}: fly.api_url was set after the start: restart to scale apps"
            return self._rejected([problem])
        # Likewise the client's token: started without one (static apps alone), an app to
        # scale would get a 401 on every call.
        tokenless = no_token_problem(path, new.model_copy(update={"fly": self.settings.fly}))
        if tokenless is not None:
            if new.fly.token is not None:
                tokenless = f"{path}: fly.token was set after the start: restart to scale apps"
            return self._rejected([tokenless])
        old = self.settings
        fixed = [k for k in _RESTART_ONLY if getattr(old, k) != getattr(new, k)]
        if old.proxy.listen != new.proxy.listen:
            fixed.append("proxy.listen")
        if fixed and self.speaks_for_config:
            _log.warning("config_reload_needs_restart", sections=fixed)
        for secret in new.secrets():
            redactor().add(secret)
        # What needs a restart is kept as it runs, so that the next reload compares the
        # file with what runs: a file set back to it was said to need a restart.
        new = new.model_copy(
            update={
                **{k: getattr(old, k) for k in _RESTART_ONLY},
                "proxy": new.proxy.model_copy(update={"listen": old.proxy.listen}),
            }
        )
        self.settings = new
        self._declare_apps(new)
        # The proxy first: requests held for an app that left are answered at once, before
        # the controller drops the app's view (a gate asking for it then would recreate it).
        if self.proxy is not None:
            self.proxy.update_settings(new)
        if self.controller is not None:
            await self.controller.update_settings(new)
        if self.admin is not None:
            # The loop's pace is reloaded (control.*): the stalled-loop limit with it. Kept
            # from the start, a raised idle_poll_s (or tick_s) made every slow poll of a
            # sleeping app a stalled loop: /readyz?control=1 failed, and the critical
            # AutoscalerControlLoopStalled alert, which reads the limit, fired.
            self.admin.max_tick_age_s = _stalled_after_s(new)
            self.metrics.control_max_tick_age.set(self.admin.max_tick_age_s)
        self.metrics.config_reloads.labels(result="success").inc()
        if self.speaks_for_config:
            _log.info("config_reloaded", path=str(path), apps=[a.name for a in new.apps])
        self._warn_unreachable(new)
        if self.emulator is not None:
            self._warn_lacking(new)
        if not new.apps and self.speaks_for_config:
            _log.warning(
                "no_apps",
                path=str(path),
                hint="every request is answered 404 and nothing is scaled until a reload"
                " lists apps again; a restart on this file is refused",
            )
        return True

    def _rejected(self, problems: list[str]) -> Literal[False]:
        """A reload refused: counted, and said by the process that speaks for the file
        (:attr:`speaks_for_config`); False, for ``reload`` to return."""
        self.metrics.config_reloads.labels(result="error").inc()
        if self.speaks_for_config:
            _log.error("config_reload_rejected", problems=problems)
        return False

    def _warn_unreachable(self, settings: Settings) -> None:
        """:func:`warn_unreachable`, if this process speaks for the configuration (each
        worker of ``run --workers`` loads the same file: the warning came N times per start
        and reload)."""
        if self.speaks_for_config:
            warn_unreachable(settings)

    def _warn_lacking(self, settings: Settings) -> None:
        """Say which apps to scale the embedded emulator does not have (every call for them
        a 404): tick_failed lines said so, each 5 s, but not why nor what to do."""
        lacking = settings.apps_the_emulator_lacks()
        if lacking:
            _log.warning(
                "emulator_apps_missing",
                apps=lacking,
                hint="not in emulator.apps: the embedded emulator has no such app, so no"
                " request to it is served; add them there (with their machines)",
            )

    def _warn_fly_autoscaling(self, app: str, machines: list[Machine]) -> None:
        """Warn, once per app, when its machines have Fly's own autostop/autostart on (from
        the control loop's first list of the app: no call of its own)."""
        if app in self._autostop_checked:
            return
        self._autostop_checked.add(app)
        warning = fight_warning(app, machines)
        if warning:
            _log.warning("fly_autoscaling_on", app=app, problem=warning)

    def _declare_apps(self, settings: Settings) -> None:
        """Every app's series with known label values, at 0 (apps a reload adds too)."""
        for app in settings.apps:
            self.metrics.declare_app(app.name, scaled=not app.static)

    def request_reload(self) -> None:
        """SIGHUP: one reload at a time. A signal during a reload may come after that
        reload read the file (a second edit, saved while the first applies): it is
        answered by one more reload once this one is done, however many came meanwhile.
        During the stop, none: it would apply the file to parts half stopped, from a task
        that the stop (which cancelled the reload under way) no longer stops."""
        if self._stopping:
            _log.warning("config_reload_ignored", reason="the service is stopping")
            return
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reloads())
        else:
            self._reload_again = True

    async def _reloads(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception:
                # A bug, not a bad file: say so and count it; the next SIGHUP tries again.
                self.metrics.config_reloads.labels(result="error").inc()
                _log.exception("config_reload_crashed")
            if not self._reload_again:
                return

    # --- the whole run ------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop gracefully. SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        hup_during_start: list[bool] = []
        signals = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set}
        signals[signal.SIGHUP] = lambda: hup_during_start.append(True)
        signals[signal.SIGUSR2] = _no_rolling_restart
        for sig, handler in signals.items():
            loop.add_signal_handler(sig, handler)
        # Held back until now by `autoscaler run` (cli._run) or the worker supervisor: a
        # SIGHUP that came meanwhile is delivered here, to the handler above. A SIGTERM or
        # SIGINT is taken off instead (the loop would hand it on a turn later, to the
        # handler that cuts the graceful stop short): nothing starts, the stop runs.
        early_stop = _take_pending(STOP_SIGNALS)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        try:
            if not early_stop:
                await self.start()
                # A reload during the start would apply to the parts built so far and not
                # to those built after it from the file as it was read before: one reload.
                loop.add_signal_handler(signal.SIGHUP, self.request_reload)
                if hup_during_start:
                    self.request_reload()
                await stop.wait()
            _log.info("stopping")
            # A second SIGTERM/SIGINT during the graceful stop ends it at once.
            stopping = asyncio.ensure_future(self.stop())
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            if stopping.cancelled():
                _log.warning("stopped_at_once")
                await self._force_close()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        _log.info("stopped")

    async def _force_close(self) -> None:
        """After an interrupted graceful stop: close what is left without waiting. The
        embedded emulator's machines are real processes: killed here, also when the
        interrupted stop was the emulator's own (its close is idempotent)."""
        if self.emulator is not None:
            try:
                await self.emulator.close()
            except Exception as exc:
                _log.error("stop_failed", part="emulator", error=repr(exc))
                raise
            self.emulator = None

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _take_pending(signals: frozenset[int]) -> bool:
    """Whether one of ``signals`` is pending (held back by the mask), each taken off so
    that unblocking them delivers nothing."""
    pending = signal.sigpending() & signals
    for sig in pending:
        signal.sigtimedwait({sig}, 0)
    return bool(pending)


def _stalled_after_s(settings: Settings) -> float:
    """The admin server's stalled-loop limit for ``settings``' control loop."""
    c = settings.control
    return stalled_after_s(c.tick_s, c.idle_poll_s, c.tick_jitter)


def _no_rolling_restart() -> None:
    """SIGUSR2 restarts the workers of ``run --workers`` (its supervisor's signal); sent to
    one process instead, its default action would kill it."""
    _log.warning(
        "rolling_restart_ignored",
        reason="SIGUSR2 restarts workers one at a time: send it to the run --workers supervisor",
    )


def load_or_report(
    config: str | None,
    overrides: Mapping[str, Any] | None,
    hosts: ListenHosts,
    flags: Mapping[str, str] | None = None,
) -> tuple[Settings, Path] | None:
    """The settings and the file they came from, or None once every problem is logged.
    ``hosts`` resolves the listen hosts' names, and keeps their addresses for the caller;
    ``flags`` names the flag of each key path of ``overrides`` (load_settings)."""
    try:
        # The listen addresses' host names resolved: a clash through a name, or a name that
        # does not resolve, is said here, before anything starts (not as a failed bind).
        return load_settings(config, overrides=overrides, resolve=hosts, flags=flags)
    except ConfigError as exc:
        for line in exc.problems:
            _log.error("config_invalid", problem=line)
        return None


def run(
    config: str | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    emulator: bool = False,
    flags: Mapping[str, str] | None = None,
) -> int:
    """``autoscaler run``: 0 after a clean stop, 2 when the configuration is invalid.

    The embedded emulator plays the Machines API only when asked for (``emulator``, the
    --emulator flag, or ``fly.api_url: embedded``): a production config that forgot
    ``fly.api_url`` must not quietly scale fake machines. ``flags`` names the flag that
    set each key path of ``overrides``, for its problems (load_settings).
    """
    worker = os.environ.get(WORKER_ENV)
    if worker is None:
        return _run(config, overrides, flags, emulator, 0, None)
    speaker = os.environ.get(SPEAKER_ENV)
    # Under run --workers, every line says whose it is (they share one output).
    with process_keys(worker=int(worker)):
        return _run(
            config, overrides, flags, emulator, int(worker), Path(speaker) if speaker else None
        )


def _run(
    config: str | None,
    overrides: Mapping[str, Any] | None,
    flags: Mapping[str, str] | None,
    emulator: bool,
    worker: int,
    speaker: Path | None,
) -> int:
    if emulator:
        overrides = {**(overrides or {}), "fly": {"api_url": EMBEDDED}}
    hosts = ListenHosts(resolve_listen_host)
    loaded = load_or_report(config, overrides, hosts, flags)
    if loaded is None:
        return CONFIG_REFUSED
    settings, path = loaded
    problem = start_problem(path, settings)
    if problem is not None:
        _log.error("config_invalid", problem=problem)
        return CONFIG_REFUSED
    # Without fly.api_url only static apps can run: nothing to scale, no API to call.
    without_api = settings.fly.api_url is None
    service = Service(
        settings,
        config,
        overrides=overrides,
        flags=flags,
        without_api=without_api,
        listen_hosts=hosts,
        worker=worker,
        speaker=speaker,
    )
    service.freeze_heap = True
    if service.speaks_for_config:
        _log.info("config_loaded", path=str(path))
    try:
        run_event_loop(service.run())
    except StateFileError as exc:  # emulator.state_file
        _log.error("config_invalid", problem=str(exc))
        return CONFIG_REFUSED
    except OSError as exc:
        # After a complete start, the error is a part's stop's: its stop_failed line said
        # it, and a start_failed line would send the reader after a port.
        if not service.started:
            _log.error("start_failed", error=str(exc), **_start_failure(service, exc))
            if service.binding is not None:
                return LISTEN_REFUSED
        return 1
    return 0


def _start_failure(service: Service, exc: OSError) -> dict[str, str | None]:
    """The listen key whose server could not start, and what to do: the OS's error names
    an address alone (``error while attempting to bind on address ('127.0.0.1', 8080)``),
    and up to three servers bind (the proxy, the admin server, an embedded emulator)."""
    if service.binding is None:
        return {"key": None, "address": None, "hint": None}
    key, address = service.binding
    if exc.errno == errno.EADDRINUSE:
        hint = f"another process listens on {address}: stop it, or set {key} to a free port"
    else:
        hint = f"set {key} to an address of this host that this user may listen on"
    return {"key": key, "address": address, "hint": hint}


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, on uvloop when it is installed (the ``fast`` extra, which the
    Docker image has), so that production runs on the loop the proxy benchmark uses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

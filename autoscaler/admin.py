"""The admin server: ``/metrics``, ``/healthz``, ``/readyz`` and ``/status``.

``/readyz`` is the data path's readiness (what a load balancer asks): it fails only while
shutting down or before the proxy knows any machine. ``/readyz?control=1`` adds the control
plane's health (the loop ticks, the Machines API answers and takes the token), which the gauge
``autoscaler_control_healthy`` also shows; an API outage fails only that one.

It reads the controller through two narrow Protocols (``StatusProvider`` and the shapes of
what it returns) so that this module never depends on the controller's concrete class; a
fake beside the tests satisfies them too.

Access: every endpoint only reads (GET); there is nothing to act on. With ``admin.token``
set, ``/status`` needs ``Authorization: Bearer <token>``, and so does a request of any
other method (refused before routing, which would answer 405); ``/metrics`` and the health
endpoints stay open unless ``admin.protect_metrics`` is set (the settings refuse it without
a token). The token is compared in constant time and never echoed.

Times: the controller stamps events on its own clock (monotonic by default). ``/status``
reports ages in seconds (``*_age_s``) computed on the same injected clock, so a caller never
has to know which clock that was; the last-tick metric is converted to Unix time because
alert rules compare it with PromQL's ``time()``.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from autoscaler import __version__
from autoscaler.aio import dual_stack_socket
from autoscaler.config import AdminSettings, parse_host_port
from autoscaler.logs import Redactor, get_logger
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import STARTED

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths anyone may read unless ``protect_metrics`` is set.
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REALM = 'Bearer realm="autoscaler-admin"'

log = get_logger("autoscaler.admin")


# --- what the admin server needs of the controller ---------------------------------------


class MachineStatusLike(Protocol):
    """One machine as ``/status`` shows it."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def cordoned(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def last_used(self) -> float | None: ...
    @property
    def failures(self) -> int: ...
    @property
    def next_retry_at(self) -> float | None: ...
    @property
    def left_alone(self) -> bool: ...
    @property
    def failing(self) -> int: ...
    @property
    def hung(self) -> bool: ...
    @property
    def hung_restarts(self) -> int: ...
    @property
    def host_unreachable(self) -> bool: ...
    @property
    def sick_since(self) -> float | None: ...
    @property
    def checks_passed_on_recheck(self) -> tuple[str, ...]: ...
    @property
    def checks_critical_unrouted(self) -> tuple[str, ...]: ...


class AppStatusLike(Protocol):
    """One app's control state (the controller's ``AppStatus``)."""

    @property
    def app(self) -> str: ...
    @property
    def desired(self) -> int: ...
    @property
    def panic(self) -> bool: ...
    @property
    def last_reason(self) -> str: ...
    @property
    def last_decision_at(self) -> float | None: ...
    @property
    def last_tick_at(self) -> float | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def machines(self) -> Sequence[MachineStatusLike]: ...
    @property
    def leased_by_others(self) -> Sequence[str]: ...


class AppHealthLike(Protocol):
    """What readiness and control health read of an app (the controller's ``AppHealth``):
    cheap, for probes and scrapes."""

    @property
    def last_tick_at(self) -> float | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def api_error(self) -> str | None: ...
    @property
    def api_refused(self) -> bool: ...
    @property
    def machines_known(self) -> bool: ...


class BackendLike(Protocol):
    """A static app's backend as the proxy routes it (``autoscaler.control.view.Upstream``)."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def last_used(self) -> float | None: ...


class StaticAppLike(Protocol):
    """A static app as the proxy knows it (``autoscaler.control.view.AppView``): no loop
    runs for it, so the controller's status has nothing of it."""

    @property
    def name(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def last_request_at(self) -> float | None: ...
    @property
    def upstreams(self) -> Mapping[str, BackendLike]: ...


class ClusterStatus(Protocol):
    """This replica in cluster mode (``autoscaler.control.replica.Replica``)."""

    @property
    def leading(self) -> bool: ...
    @property
    def view_known(self) -> bool: ...
    def decider_problems(self) -> list[str]: ...
    def status_document(self) -> dict[str, Any]: ...


class StatusProvider(Protocol):
    """What ``/status``, ``/readyz`` and the last-tick metric read (the ``Controller``)."""

    def status(self) -> Sequence[AppStatusLike]: ...
    def health(self) -> Sequence[AppHealthLike]: ...
    @property
    def last_tick_at(self) -> float | None: ...


# --- the server ----------------------------------------------------------------------------


class AdminServer:
    """The admin HTTP server. ``provider`` is None when no control loop runs (static apps)."""

    def __init__(
        self,
        settings: AdminSettings,
        metrics: Metrics,
        provider: StatusProvider | None = None,
        *,
        tick_s: float = 1.0,
        max_tick_age_s: float | None = None,
        secrets: Iterable[str] = (),
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.provider = provider
        # A loop that misses several ticks in a row is stuck, not slow: readiness fails.
        self.max_tick_age_s = max_tick_age_s if max_tick_age_s is not None else max(5.0, 5 * tick_s)
        self.clock = clock
        self.wall_clock = wall_clock
        self.draining = False
        self.proxy_listening: bool | None = None
        """False from the start until the proxy's port is bound (``autoscaler run`` starts
        the admin server first); None when no proxy is part of the process (tests)."""
        token = settings.token.get_secret_value() if settings.token else ""
        self._token = token.encode() if token else None
        # Defence in depth: nothing the controller reports may carry a secret out.
        self._redactor = Redactor([*secrets, token])
        self._runner: web.AppRunner | None = None
        self.cluster: ClusterStatus | None = None
        """Set in cluster mode: a follower's control loop does not run, by design."""
        self.metrics.control_last_tick.set_function(self._last_tick_unix)
        self.metrics.control_max_tick_age.set(self.max_tick_age_s)
        self.metrics.control_healthy.set_function(lambda: 0.0 if self.control_problems() else 1.0)
        # The machines the proxy took out of rotation (``ProxyServer.health.report``).
        self.ejected: Callable[[], list[dict[str, object]]] | None = None
        self.static_apps: Callable[[], Sequence[StaticAppLike]] | None = None
        """The static apps' views, as the proxy routes them (set by the service): without
        them ``/status`` left out apps the proxy serves, which looked missing."""

    # --- lifecycle ---------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(self._no_store)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen on ``admin.listen`` (``host``/``port`` override it; port 0 picks one)."""
        listen = parse_host_port(self.settings.listen, listen=True)
        host = host if host is not None else listen.host
        port = port if port is not None else listen.port
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        # [::] takes IPv4 too (Fly's checks, a published port): aiohttp's TCPSite binds
        # it IPv6 only, as create_server does.
        sock = dual_stack_socket(host, port)
        site = (
            web.TCPSite(self._runner, host, port)
            if sock is None
            else web.SockSite(self._runner, sock)
        )
        try:
            await site.start()
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        log.info("admin_listening", address=self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; after ``start``."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("admin server is not running")
        addr = self._runner.addresses[0]
        return str(addr[0]), int(addr[1])

    def set_draining(self) -> None:
        """Shutting down: ``/readyz`` fails so load balancers stop sending traffic."""
        self.draining = True

    # --- access --------------------------------------------------------------------------

    def _needs_token(self, request: web.Request) -> bool:
        if self._token is None:
            return False
        if self.settings.protect_metrics:
            return True
        return request.method not in SAFE_METHODS or request.path not in OPEN_PATHS

    def _authorized(self, request: web.Request) -> bool:
        assert self._token is not None  # _needs_token said a token is configured
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # aiohttp decodes header bytes that are not UTF-8 with surrogateescape: encoding
        # them back the same way gives the bytes sent (strict encoding raised, a 500).
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._needs_token(request) and not self._authorized(request):
            return web.json_response(
                {"error": "unauthorized: send Authorization: Bearer <admin.token>"},
                status=401,
                headers={"WWW-Authenticate": REALM},
            )
        return await handler(request)

    @staticmethod
    async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
        # Every answer is the state of this moment: no cache between here and a probe or
        # a dashboard may serve it later (a stale "ready", an old /status).
        response.headers["Cache-Control"] = "no-store"

    # --- endpoints -----------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.exported)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        control = _flag(request.query.getall("control", []))
        if control is None:
            return web.json_response(
                {"error": "control: expected 1 or 0 (true/false, yes/no, on/off)"}, status=400
            )
        problems = self.readiness_problems()
        if control:
            problems = problems + self.control_problems()
        if problems:
            # Problems quote API errors: the same redaction as /status (readiness is open).
            problems = self._redactor.scrub(problems)
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def _status(self, request: web.Request) -> web.Response:
        text = json.dumps(self._redactor.scrub(self.status_document()))
        return web.Response(text=text, content_type="application/json")

    # --- what the endpoints say ----------------------------------------------------------

    def readiness_problems(self, apps: Sequence[AppHealthLike] | None = None) -> list[str]:
        """Empty when the data path is ready: not shutting down, the proxy's port is bound,
        and the proxy knows where to route. The control plane's health is not part of it
        (``control_problems``): an API outage must not take the proxy out of a load balancer
        while started machines serve. Config is loaded by construction (settings were
        validated). ``apps``: the provider's health when the caller has it already."""
        if self.draining:
            return ["shutting down"]
        if self.proxy_listening is False:
            return ["the proxy is not listening yet"]
        if self.cluster is not None and not self.cluster.leading:
            if self.cluster.view_known:
                return []
            return ["no fleet view from the cluster's leader yet"]
        if apps is None:
            apps = self.provider.health() if self.provider is not None else []
        # Before any app's machines were read (a start with the API out of reach) the proxy
        # can only hold requests; once read, it routes on what it knows through outages.
        if apps and not any(a.last_tick_at is not None or a.machines_known for a in apps):
            return ["no app's machines are known yet (the Machines API has not answered)"]
        return []

    def control_problems(self, apps: Sequence[AppHealthLike] | None = None) -> list[str]:
        """Empty while the control plane decides on fresh data (``/readyz?control=1`` and
        ``autoscaler_control_healthy``): the loop ticks, and the Machines API answers."""
        if self.provider is None:
            return []
        if self.cluster is not None and not self.cluster.leading:
            # A follower decides nothing (the leader's loop is the one that ticks), but it
            # can tell when nobody does.
            return self.cluster.decider_problems()
        if apps is None:
            apps = self.provider.health()
        if not apps:
            return []  # only static apps: no loop runs, so none has to tick
        problems = []
        last = self.provider.last_tick_at
        if last is None:
            problems.append("control loop has not ticked yet")
        else:
            age = self.clock() - last
            if age > self.max_tick_age_s:
                problems.append(
                    f"control loop last ticked {age:.1f}s ago (limit {self.max_tick_age_s:g}s)"
                )
        failing = [a for a in apps if a.api_error]
        # One app's error may be its own (a bad app name); every app failing means the
        # Machines API itself is out of reach, or refuses the token (401, 403) for all of
        # them: that is no network trouble, and waiting will not end it. An action's error
        # that the API did not give (a boot that ended failed), or a refusal it answered (a
        # machine's state or config), says nothing of the API.
        if len(failing) == len(apps):
            unreached = [a for a in failing if not a.api_refused]
            if unreached:
                problems.append(f"Machines API unreachable: {unreached[0].api_error}")
            else:
                problems.append(
                    "Machines API refuses the token (fly.token: wrong, expired or revoked,"
                    f" or without permission on these apps): {failing[0].api_error}"
                )
        return problems

    def status_document(self) -> dict[str, Any]:
        now = self.clock()
        # Asked once: the controller builds every machine's status anew on each call (a
        # third of the document's time, with 1,000 apps); readiness reads the cheap health.
        apps = self.provider.status() if self.provider is not None else []
        health = self.provider.health() if self.provider is not None else []
        last_tick = self.provider.last_tick_at if self.provider is not None else None
        control = self.control_problems(health)
        return {
            "version": __version__,
            "ready": not self.readiness_problems(health),
            "control_healthy": not control,
            "control_problems": control,
            # A loop runs only for apps to scale: the controller is there for static apps
            # too (a reload may add scaled ones), but nothing of theirs ticks.
            "control_loop": bool(health),
            "last_tick_age_s": _age(now, last_tick),
            "apps": [_app_document(a, now) for a in apps],
            "static_apps": [
                _static_document(a, now)
                for a in (self.static_apps() if self.static_apps is not None else [])
            ],
            "ejected": self.ejected() if self.ejected is not None else [],
            **({"cluster": self.cluster.status_document()} if self.cluster is not None else {}),
        }

    def _last_tick_unix(self) -> float:
        # NaN when no control loop runs (or it has no app to scale): "stale" comparisons
        # are then false, so the not-ticking alert stays quiet for static-only deployments.
        # 0 before the first tick: a loop that never ticks looks infinitely stale.
        if self.provider is None or not self.provider.health():
            return math.nan
        if self.cluster is not None and not self.cluster.leading:
            return math.nan  # a follower's loop does not run: not "stale", absent
        last = self.provider.last_tick_at
        if last is None:
            return 0.0
        return self.wall_clock() - (self.clock() - last)


_TRUE = frozenset({"", "1", "true", "yes", "on"})  # "" : a bare ?control
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(values: Sequence[str]) -> bool | None:
    """A query flag given at most once: absent False, a bare ``?control`` True; None when
    it is neither a yes nor a no (``?control=no`` turned the checks on, ``?control`` off)."""
    if not values:
        return False
    if len(values) > 1:
        return None
    value = values[0].strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)


def _app_document(status: AppStatusLike, now: float) -> dict[str, Any]:
    machines = [
        {
            "id": m.id,
            "state": m.state,
            "cordoned": m.cordoned,
            "in_flight": m.in_flight,
            "last_used_age_s": _age(now, m.last_used),
            "failures": m.failures,
            "next_retry_in_s": (
                None if m.next_retry_at is None else round(max(0.0, m.next_retry_at - now), 3)
            ),
            "left_alone": m.left_alone,
            "failing": m.failing,
            "hung": m.hung,
            "hung_restarts": m.hung_restarts,
            "host_unreachable": m.host_unreachable,
            "checks_critical_for_s": _age(now, m.sick_since),
            "checks_passed_on_recheck": list(m.checks_passed_on_recheck),
            "checks_critical_unrouted": list(m.checks_critical_unrouted),
        }
        for m in status.machines
    ]
    return {
        "app": status.app,
        "static": False,
        "desired": status.desired,
        "started": sum(1 for m in status.machines if m.state == STARTED),
        "panic": status.panic,
        "last_reason": status.last_reason,
        "last_decision_age_s": _age(now, status.last_decision_at),
        "last_tick_age_s": _age(now, status.last_tick_at),
        "last_error": status.last_error,
        "leased_by_others": list(status.leased_by_others),
        "machines": machines,
    }


def _static_document(view: StaticAppLike, now: float) -> dict[str, Any]:
    """A static app: what the proxy knows of it (its backends are its ``machines``)."""
    return {
        "app": view.name,
        "static": True,
        "in_flight": view.in_flight,
        "queued": view.queued,
        "last_request_age_s": _age(now, view.last_request_at),
        "machines": [
            {
                "id": up.id,
                "state": up.state,
                "in_flight": up.in_flight,
                "last_used_age_s": _age(now, up.last_used),
            }
            for up in view.upstreams.values()
        ],
    }

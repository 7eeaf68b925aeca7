"""The data path: routes, admits, forwards and accounts each request.

One request's life: route by Host (404 when no app; an OPTIONS or TRACE with
``Max-Forwards: 0`` is answered here, see ``_answer_last_hop``), take a slot through the
app's :class:`Gate` (at once, or after waiting in its FIFO while machines wake or free up;
503 when the queue is full, 504 after ``wake_timeout_s``), forward to the machine with
streamed bodies (sending it again only when that cannot repeat a side effect), relay the
response, give the slot back, then one metric update and one log line.

The client side is :mod:`autoscaler.proxy.h1` (HTTP/1.1 on llhttp), the machine side
:mod:`autoscaler.proxy.upstream` (a keep-alive pool per machine) and, for WebSockets,
:mod:`autoscaler.proxy.tunnel`. Heads cross as bytes (:mod:`autoscaler.proxy.forward`):
no request or response objects are built on the way.
"""

from __future__ import annotations

import asyncio
import functools
import random
from http import HTTPStatus

from autoscaler.config import AppConfig, ProxySettings, Settings, authority, parse_host_port
from autoscaler.control.view import FleetView, MachineInfo, Upstream
from autoscaler.logs import get_logger
from autoscaler.metrics import NO_WAKE, PRE_ROUTING, WAKE_FAILED, Metrics, ProxyErrorReason
from autoscaler.proxy import forward, health, revive, tunnel, upstream
from autoscaler.proxy.accounting import (
    Failure,
    RequestContext,
    RequestIds,
    log_access,
    remaining,
)
from autoscaler.proxy.body import Body, BufferBudget
from autoscaler.proxy.gate import (
    AppRemoved,
    Gate,
    HoldTimeout,
    NoSuchApp,
    QueueFull,
    ShuttingDown,
    wake_label,
)
from autoscaler.proxy.h1 import ClientGone, H1Server, Request
from autoscaler.proxy.routing import Router
from autoscaler.scaling.fleet import STARTED

_log = get_logger("autoscaler.proxy")

# RFC 9110 9.2.2's idempotent methods: sent again once when their connection was lost before
# any answer, if they have no body (_forward). PUT and DELETE too, as nginx's
# proxy_next_upstream does and as upstream.send already does after a lost pooled
# connection: a second identical one leaves the state the first asked for (a DELETE that
# had gone through may answer 404 the second time: the client asked for it gone, it is).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# A request that never reached its machine goes to one other machine at once (the first
# attempt and one retry); see _next_attempt for what happens after that. A replay
# (_replays, once) has a move of its own besides: an attempt refused before it does not
# use it up.
MAX_ATTEMPTS = 2
# How often the Fly checks of the fleet view are read (health.Health.sweep) and idle
# WebSockets looked for (connection_idle_s).
SWEEP_S = 1.0
# On stop(), held requests are answered 503 this long before the deadline cuts the rest.
SHED_BEFORE_S = 0.5
# A stop cut short (a second SIGTERM) still answers held requests 503, waiting at most this
# long for their answers to be written (a loop turn or so: nothing else is waited for).
SHED_AT_ONCE_S = 0.1
_EMPTY_STATUS = frozenset({204, 304})


class ProxyServer:
    """The reverse proxy. ``start()``, ``stop()``, and ``update_settings()`` on reload."""

    def __init__(
        self,
        settings: Settings,
        view: FleetView,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - not crypto
        self.port = 0
        self._settings = settings
        self._router = Router(())
        self._trust = forward.Trust(())
        self._gates: dict[str, Gate] = {}
        self._pool: upstream.Pool | None = None
        self._server: H1Server | None = None
        self._tunnels: set[tunnel.Tunnel] = set()
        # Responses being relayed, by machine: a drain ends them (end_long_lived).
        self._streams: dict[str, dict[Body, bool]] = {}
        """Machine -> its answers whose bodies are still coming, each with whether it is a
        chunked event stream (``text/event-stream``: it never ends by itself)."""
        self._stats = metrics.proxy
        metrics.proxy.in_flight = self._in_flight
        self._ids = RequestIds(random.SystemRandom().getrandbits(64))
        self._closing = False
        self.health = health.Health(
            view, metrics, settings.proxy.eject_after, settings.proxy.eject_base_s
        )
        self._reviver = revive.Reviver(view, self.health, settings.proxy.connect_timeout_s)
        self._sweeper: asyncio.Task[None] | None = None
        # Every body byte held, request and response, against proxy.max_buffer_bytes.
        self._budget = BufferBudget(settings.proxy.max_buffer_bytes)
        self.update_settings(settings)

    # --- configuration ------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def update_settings(self, settings: Settings) -> None:
        """Apply a reloaded configuration; requests in flight and held ones carry on.

        Every knob of ``proxy`` but ``listen`` takes effect at once. Limits apply to what
        comes next (a new connection, the next head, the next wait), not to what was
        admitted under the old ones; a smaller ``pool_size`` keeps fewer idle upstream
        connections from then on.
        """
        old = {app.name: app for app in self._settings.apps} if self._gates else {}
        self._settings = settings
        proxy = settings.proxy
        self._knobs = _Knobs(proxy)
        self.health.configure(proxy.eject_after, proxy.eject_base_s)
        self._reviver.connect_timeout_s = proxy.connect_timeout_s
        if self._server is not None:
            self._server.configure(
                proxy.connection_limit, proxy.max_header_bytes, proxy.client_timeout_s
            )
        self._budget.limit = proxy.max_buffer_bytes
        if self._pool is not None:
            self._pool.size = proxy.pool_size
            self._pool.connect_timeout_s = proxy.connect_timeout_s
        self._router = Router(settings.apps, settings.proxy.default_app)
        self._trust = forward.Trust(settings.proxy.trusted_proxies)
        names = set()
        for app in settings.apps:
            names.add(app.name)
            gate = self._gates.get(app.name)
            if gate is None:
                self._gates[app.name] = Gate(app, self.view, self.metrics, self.rng)
            else:
                gate.config = app
                gate.view.notify()  # a raised hard_limit may let held requests go now
            if app.static:
                self.view.app(app.name).set_machines(_static_machines(app))
            elif app.name in old and old[app.name].static:
                self.view.app(app.name).set_machines(())  # the controller takes over
        for name in list(self._gates):
            if name not in names:
                # Held requests get a 503 at once; those in flight finish and give their
                # slots back to the view they took them from (Upstream.owner).
                gate = self._gates.pop(name)
                gate.shed(AppRemoved)  # its pump ends with its queue
                self.metrics.forget_app(name)
                if gate.config.static:
                    self.view.remove_app(name)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen on ``proxy.listen`` (or ``host``/``port``; port 0 picks a free one)."""
        proxy = self._settings.proxy
        listen = parse_host_port(proxy.listen, listen=True)
        host = listen.host if host is None else host
        port = listen.port if port is None else port
        # Kept, not looked up per request: on Python 3.11 every get_running_loop() is a
        # getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._pool = upstream.Pool(proxy.pool_size, proxy.connect_timeout_s, self._budget)
        self._server = H1Server(
            self.handle,
            self.error_page,
            max_connections=proxy.connection_limit,
            max_header_bytes=proxy.max_header_bytes,
            client_timeout_s=proxy.client_timeout_s,
        )
        self._server.budget = self._budget
        self.port = await self._server.start(host, port, reuse_port=proxy.reuse_port)
        self.view.set_closer(self.end_long_lived)
        self._sweeper = self._loop.create_task(self._sweep(), name="proxy:sweep")
        _log.info("proxy_listening", host=host, port=self.port)

    async def _sweep(self) -> None:
        """Once a second: machines whose Fly checks changed (``health``), and WebSockets
        gone idle (``_idle_tunnels``)."""
        while True:
            self.health.sweep()
            self._idle_tunnels()
            await asyncio.sleep(SWEEP_S)

    @property
    def accepting(self) -> bool:
        """Whether new client connections are accepted (false once stopping)."""
        return self._server is not None and self._server.accepting

    async def stop(self) -> None:
        """Stop accepting, let requests finish until ``shutdown_timeout_s``, then close.
        Cancelled meanwhile (a second SIGTERM), it answers the held requests first, and
        those still connecting to their machines."""
        self._closing = True
        self.view.set_closer(None)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for open_tunnel in list(self._tunnels):
            # Open WebSockets last indefinitely: tell them to reconnect elsewhere.
            open_tunnel.going_away()
        for streams in list(self._streams.values()):
            for body, endless in list(streams.items()):
                if endless:  # an event stream, likewise: ended cleanly, its client reconnects
                    body.end_early()
        if self._server is not None:
            # Held requests were never sent anywhere: just before the deadline cuts the
            # connections still busy, they get a 503 that says to retry, not a cut.
            deadline_s = self._settings.proxy.shutdown_timeout_s
            shed = self._loop.call_later(max(0.0, deadline_s - SHED_BEFORE_S), self._shed)
            try:
                await self._server.stop(deadline_s)
            except asyncio.CancelledError:
                # Cut short (a second SIGTERM: the service stops at once, and the process
                # exits with the connections still open). Held requests still get their
                # 503 first, not a dropped connection, and so do those still connecting to
                # their machines (sent nowhere yet: their connects are given up, and none
                # is made from then on); those at a machine are cut.
                answering = [task for gate in self._gates.values() for task in gate.shed()]
                if self._pool is not None:
                    answering += self._pool.halt()  # after the shed: they find it (503)
                if answering:
                    await asyncio.wait(answering, timeout=SHED_AT_ONCE_S)
                raise
            finally:
                shed.cancel()
            self._server = None
        for gate in self._gates.values():
            await gate.close()
        await self._reviver.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _shed(self) -> None:
        """Just before the graceful stop's deadline: held requests get their 503, and so do
        those still connecting to their machines (sent nowhere yet either: their connects
        are given up, and none is made from then on), rather than a cut connection. A held
        request with a slot free for it now goes instead (``Gate.shed``'s ``hand_out``)."""
        for gate in self._gates.values():
            gate.shed(hand_out=True)
        if self._pool is not None:
            self._pool.halt()  # after the shed: _next_attempt finds it (503)

    # --- one request --------------------------------------------------------------

    async def handle(self, request: Request) -> None:
        """Answer one request; the connection calls this for each, in order."""
        loop = self._loop
        ctx = RequestContext(loop.time(), self._request_id(request.request_id))
        counted = True
        try:
            app = self._router.route(request.host, request.target)
            if app is None:
                raise Failure(404, "no app is configured for this host")
            ctx.app = app.name
            method = request.method
            if (method == "OPTIONS" or method == "TRACE") and forward.last_hop(request):
                self._answer_last_hop(request, ctx)
                return
            await self._serve(request, app, ctx)
        except Failure as failure:
            ctx.status = failure.status
            ctx.proxy_error = failure.cause
            _log.warning(
                "proxy_error",
                request_id=ctx.request_id,
                app=ctx.app,
                status=failure.status,
                reason=failure.message,
            )
            self._write_error(request, failure, ctx)
        except (asyncio.CancelledError, ClientGone):
            ctx.status = 499  # the client went away (nginx's convention; logged and counted)
            raise
        except Exception:
            # A bug. Answered 500 here if nothing was sent yet, under the request's own id
            # (the connection's answer, error_page, would make a new one nobody logged for
            # this request), and counted once under the request's app (_answer_bug): the
            # proxy's own fault, as its proxy_errors_total reason says (internal); its line
            # says 500. After the head, the client got the machine's status: counted so,
            # here. The connection logs the traceback (proxy_handler_failed) and closes.
            if not request.conn.response_started:
                ctx.status = 500
                counted = False
                self._answer_bug(request, ctx)
            raise
        finally:
            self._account(request, ctx, loop.time(), counted)

    async def _serve(self, request: Request, app: AppConfig, ctx: RequestContext) -> None:
        # A request that reaches this point during a stop was received before it (its
        # bytes were read, its turn came after): it is served like those in flight, within
        # the drain. No new one follows on its connection, which closes after the answer.
        limit = app.max_body_bytes
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise Failure(413, f"request body over {limit} bytes")
        gate = self._gates[app.name]
        ctx.deadline = ctx.arrived + app.wake_timeout_s
        up = gate.try_acquire(held=ctx)
        if up is None:
            up, ctx.wake = await self._wait(gate, app, ctx)
        ctx.up = up
        ctx.slot = True
        if self.health.records:
            ctx.probe = self.health.took(app.name, up)
        try:
            await self._forward(request, app, gate, ctx)
        finally:
            _give_back(gate, ctx, self.health)

    async def _wait(
        self, gate: Gate, app: AppConfig, ctx: RequestContext, *, sent_back: bool = False
    ) -> tuple[Upstream, str]:
        """Hold the request in its app's queue until a machine is free for it (or a wake
        brings one up); its answer when it cannot wait (the queue full, the app gone from
        the Machines API, a stop or a reload shedding it) or waited till its deadline.

        ``sent_back`` is a request its machine refused (``_next_attempt``): it waits in
        the place its arrival gives it (``Gate._readmit``). Refused for a full queue, or
        for the app's absence, it gets what any request gets: nothing was sent, and the
        machines may only be busy (it got 502 "no machine reachable", paging as a proxy
        error, for a queue others filled). Its deadline is the one case answered apart: a
        502 "no machine of this app is reachable", not the 504 of a wait. A machine
        refused it, and none listened since: that is what a static app's dead backend
        looks like (it has no wake, and no alert but AutoscalerProxyErrors, which a
        wake_timeout would not page), and a scaled app's machine that the API calls
        started but that does not listen within ``wake_timeout_s`` (docs/policy.md)."""
        rejections = self.metrics.queue_rejections
        arrived = ctx.arrived if sent_back else None
        try:
            return await gate.acquire(remaining(ctx.deadline), ctx, arrived=arrived)
        except (ShuttingDown, AppRemoved) as shed:
            # (Its own name: compiled, one name is one type across a function's handlers.)
            raise _shed(shed) from None
        except QueueFull:
            rejections.labels(app=app.name, reason="queue_full").inc()
            raise Failure(
                503, "too many requests waiting", {"Retry-After": "1"}, "queue_full"
            ) from None
        except NoSuchApp:
            ctx.wake = WAKE_FAILED
            raise Failure(
                502, f"the Machines API has no app {app.name}", cause="app_not_found"
            ) from None
        except HoldTimeout as exc:
            if sent_back:
                raise _unreachable() from None
            rejections.labels(app=app.name, reason="wake_timeout").inc()
            if exc.waking:
                ctx.wake = WAKE_FAILED  # not "none": a wake was needed, and none came up
            what = "for a machine to wake" if exc.waking else "for a free machine"
            message = f"timed out after {app.wake_timeout_s:g}s waiting {what}"
            raise Failure(504, message, cause="wake_timeout") from None

    async def _next_attempt(
        self,
        ctx: RequestContext,
        gate: Gate,
        app: AppConfig,
        tried: list[Upstream],
        jump: bool,
    ) -> Upstream:
        """Another machine for a request that never reached the one it was given (no
        connection, or one closed before a byte of the request was written): safe to send
        again whatever the method. The one other request sent again comes here too: an
        idempotent one with no body whose connection was lost, or cut as its machine goes
        down, before any answer (once; ``_replays``).

        With ``jump`` (its first connect that failed, ``MAX_ATTEMPTS``, or its replay,
        whatever failed before it) it goes at once to a machine it has not tried: at most
        three in all, so a loss after a refusal still reaches a third machine. When there
        is none, or it was a later refusal, the request waits in the queue like any
        other, until its deadline, in the place its arrival gives it: ahead of those that
        came after it (it waited behind them), and not refused for a queue they filled
        (the latest of them leaves instead: ``Gate._readmit``); refused for one filled by
        those that came before it, it is answered as ``_wait`` answers any (503, to
        retry), and only its deadline is told apart there. A machine the API calls
        started may still be booting its server, and a static app's backend that died
        may be restarted (Fly's restart policy); either answers once it listens, and the
        watch of refused machines (``revive``) puts it back in rotation then. A static app
        asks no wake: its request waits for a backend alone, as those arriving just after
        it do (the machine out of rotation), where a 502 at once failed only the one that
        found it down; it gets the 502 when none listens within ``wake_timeout_s`` (a dead
        backend costs its client that long: docs/policy.md).
        """
        up = ctx.up
        assert up is not None
        tried.append(up)
        _give_back(gate, ctx, self.health)
        ctx.up = None
        why = gate.shed_with
        if why is not None:
            # A reload removed the app meanwhile, or the proxy stops (past the graceful
            # stop's shed, or cut short: nobody sheds again, and the process exits):
            # nothing was sent, so it is answered as its held requests were, not sent on.
            # A removed app's gate would look its view up by name and make it again, for
            # nobody (an in-flight series back for good, a wake nobody makes).
            raise _shed(why())
        up = gate.try_acquire(tuple(tried), jump=True, held=ctx) if jump else None
        if up is None:
            if remaining(ctx.deadline) <= 0:
                raise _unreachable()
            # A machine booting or restarting refused us: wait for it (or a wake). A wake
            # asked for it then names the request (its answer, or as the client leaves:
            # it was logged as needing none); else the first wait's name stands (a wake
            # it waited for before: the refusal was the machine that wake brought up).
            pending = ctx.wake_pending
            up, wake = await self._wait(gate, app, ctx, sent_back=True)
            if wake != NO_WAKE or ctx.wake_pending is not pending:
                ctx.wake = wake
        ctx.up = up
        ctx.slot = True
        if self.health.records:
            ctx.probe = self.health.took(app.name, up)
        return up

    def _address(self, app: AppConfig, up: Upstream) -> tuple[int, str]:
        """The machine's port for this app (``apps[].port`` overrides), and its authority."""
        if app.port is None or app.static or up.port == app.port:
            return up.port, up.authority
        return app.port, authority(up.host, app.port)

    def _failed_connect(self, app: AppConfig, up: Upstream, ctx: RequestContext) -> None:
        """Nothing was sent: skip this machine for a while; the retry is always safe.

        The refusals count towards its ejection, unless the controller started it within
        the app's ``wake_timeout_s``: a machine still booting refuses until its server
        listens, and held requests wait for it (the short skip applies all the same). An
        ejection's probe refused so ends with no verdict before the skip, which then
        holds: the probe's end would put the machine back at once (its hold-out was the
        probe's), and each request in turn would try it, back to back, while it boots."""
        view = up.owner or self.view.app(app.name)  # (not made again: the app may be gone)
        started = up.started_at
        counted = app.static or started is None or view.clock() - started >= app.wake_timeout_s
        if ctx.probe and not counted:
            ctx.probe = False
            self.health.abandoned(app.name, up)
        view.skip(up, self._knobs.unhealthy_backoff_s)
        view.notify()
        _log.info("machine_unreachable", app=app.name, machine=up.id)
        if counted:
            self.health.failed(app.name, up, health.CONNECT)
        self._reviver.refused(app.name, up, self._address(app, up)[0])

    def _lost_connection(self, app: AppConfig, up: Upstream) -> None:
        """The machine closed or reset a connection before its answer was whole. Its
        process may have died, and then a request sent to it before the kernel closes its
        listening socket would be lost too (with a body, with no safe retry): the machine's idle
        connections are dropped and, while the app has another routable machine, it gets
        no request for ``unhealthy_backoff_s`` (nginx's default marks a server down for
        10 s after one such failure). The last routable machine keeps its traffic: a
        live one that dropped a connection must not hold every request of its app."""
        pool = self._pool
        if pool is not None:
            pool.forget(self._address(app, up)[1])
        view = up.owner or self.view.app(app.name)  # (not made again: the app may be gone)
        if any(u is not up for u in view.routable()):
            view.skip(up, self._knobs.unhealthy_backoff_s)
            view.notify()

    async def _forward(
        self, request: Request, app: AppConfig, gate: Gate, ctx: RequestContext
    ) -> None:
        """Send the request to the machine (another one when a replay is safe), then relay
        the answer, or open the tunnel after a WebSocket handshake's 101."""
        knobs = self._knobs
        pool = self._pool
        if pool is None:
            raise Failure(503, "proxy is not running", cause="stopping")
        websocket = request.upgrade == "websocket"
        # The client's Expect: 100-continue goes on to the machine, whose 100 (or final
        # answer) decides whether the body goes (an HTTP/1.0 request's was ignored, h1).
        expect = request.expect_continue
        head: bytes | None = None  # made for the first attempt (again if Expect goes)
        method = request.method
        # The machine's 1xx answers (Early Hints...): an HTTP/1.0 client knows none.
        interim = forward.Interim(request.conn) if request.version == "1.1" else None
        body: forward.BodyStream | None = None
        tried: list[Upstream] = []
        up = ctx.up
        verdicts = self.health
        exchange: upstream.Exchange | None
        # Idempotent with no body: may be sent again once after its connection was lost
        # (see the ConnectionLost case below).
        replayable = method in IDEMPOTENT and request.body is None
        # Attempts that never reached their machine: the first goes on at once to another
        # (MAX_ATTEMPTS), as does the replay, whatever came before it.
        refused = 0
        jump = False
        while True:
            assert up is not None
            if expect and (
                up.http10 if up.http10 is not None else up.owner is not None and up.owner.http10
            ):
                # Its server answered HTTP/1.0 and sends no 100 (or, not heard from yet,
                # its app's last answer did: the same image): the client would wait
                # CONTINUE_WAIT_S for one, every time. RFC 9110 10.1.1 lets a proxy that
                # believes so send its own 100 at once, and no Expect on (nor to a machine
                # tried after it: the client sends its body now).
                request.conn.write_interim(forward.CONTINUE)
                expect = False
                head = None
            if head is None:
                head = forward.request_head(
                    request,
                    ctx.request_id,
                    self._trust,
                    up_host_header(app, ctx.up),
                    websocket=websocket,
                    expect=expect,
                )
            if request.body is not None:
                body = forward.BodyStream(
                    request,
                    app.max_body_bytes,
                    knobs.client_timeout_s,
                    self._loop.create_future() if expect else None,
                )
            port, authority = self._address(app, up)
            try:
                exchange = await upstream.send(
                    pool,
                    up.host,
                    port,
                    authority,
                    method,
                    head,
                    None if body is None else body.chunks(),
                    chunked=body is not None and request.content_length is None,
                    replayable=replayable,
                    max_field_size=knobs.max_field_size,
                    head_timeout=knobs.upstream_timeout_s,
                    upgrade=websocket,
                    on_interim=interim,
                    machine=up.id,
                    continued=None if body is None else body.continued,
                    # A probe of a machine on trial: its connection made is the verdict
                    # (an ejection's probe waits for its answer too: health's).
                    connected=functools.partial(gate.probed, up, ctx, not ctx.probe)
                    if ctx.trial
                    else None,
                )
                if ctx.trial:  # (it went on a pooled connection: the answer is the verdict)
                    gate.probed(up, ctx, not ctx.probe)
            except upstream.ConnectFailed:
                # Nothing reached the machine (no body byte was read either: the body is
                # read only once connected), so any method may go elsewhere. (Awaited
                # after the handler: the compiled build must not await inside one.)
                self._failed_connect(app, up, ctx)
                refused += 1
                jump = refused < MAX_ATTEMPTS
                exchange = None
            except upstream.Abandoned:
                # The proxy gave its connection up (its machine goes down: the drain's
                # deadline; or the proxy stops at once, and _next_attempt answers 503):
                # nothing was sent, so it goes on as a request whose connect failed, with
                # no verdict on the machine.
                refused += 1
                jump = refused < MAX_ATTEMPTS
                exchange = None
            except TimeoutError:
                # Not the machine's fault if its client's slowness held it back: its
                # body, or 1xx answers the client took too slowly (reading paused).
                if (body is None or not body.timed_out) and (
                    interim is None or interim.held is None
                ):
                    verdicts.failed(app.name, up, health.TIMEOUT)
                raise Failure(
                    504, "the machine did not answer in time", cause="machine_timeout"
                ) from None
            except upstream.CutOff as cut:
                # Its machine's drain ran out of time before it answered, and the machine
                # goes down now (end_long_lived): not a 504 after upstream_timeout_s. No
                # verdict on the machine: the proxy gave up, not the machine. A request
                # that may be sent again (_replays) is, as after a lost connection: to
                # another machine, or held for one (the one going down is out of routing);
                # any other gets a 502 at once (the machine may have acted on it). (Its own
                # name: the compiled build types a name by its first except clause.)
                if not self._replays(ctx, app, up, cut, replayable, interim):
                    raise Failure(
                        502, "the machine was drained before it answered", cause="drained"
                    ) from None
                replayable = False
                jump = True
                exchange = None
            except upstream.UpstreamError as exc:
                if body is not None:
                    body.raise_for_client()
                # Some of the request was written: the machine may have acted on it.
                lost = isinstance(exc, upstream.ConnectionLost)
                if lost:
                    self._lost_connection(app, up)
                verdicts.failed(app.name, up, health.RESET if lost else health.BAD_RESPONSE)
                if lost:
                    self._reviver.lost(app.name, up, port)
                # ...but a lost one may be sent again (_replays): its machine the app's
                # last, it is held for it (a process that died: the replay's connect is
                # refused, and the request waits for its restart or a wake, up to its
                # wake_timeout_s, a static app's as any other).
                if not (lost and self._replays(ctx, app, up, exc, replayable, interim)):
                    raise Failure(
                        502, "the machine failed to answer", cause="machine_error"
                    ) from None
                replayable = False
                jump = True
                exchange = None
            finally:
                if interim is not None:
                    interim.release()  # its final head came (or none will): read it again
            if exchange is None:
                up = await self._next_attempt(ctx, gate, app, tried, jump)
                continue
            # Its server's version, as its answers say: an HTTP/1.0 one gets no Expect,
            # nor does a machine of its app not heard from yet (AppView.http10).
            http10 = exchange.version == "1.0"
            up.http10 = http10
            if up.owner is not None:
                up.owner.http10 = http10
            if websocket and exchange.status == 101:
                if verdicts.records:
                    verdicts.succeeded(app.name, up)
                await self._tunnel(request, exchange, gate, ctx)
            else:  # a refused handshake too: its answer (401, 426...) is the client's
                await self._relay(request, exchange, app, gate, ctx, body)
            return

    def _replays(
        self,
        ctx: RequestContext,
        app: AppConfig,
        up: Upstream,
        exc: upstream.UpstreamError,
        replayable: bool,
        interim: forward.Interim | None,
    ) -> bool:
        """Whether a request sent to a machine that gave no answer (its connection lost, or
        cut as the machine goes down) is sent again, and if so says so. Only an idempotent
        one with no body (``replayable``; RFC 9110 9.2.2, as nginx's proxy_next_upstream
        error) of which the client has heard nothing yet (no 1xx), and once: not after a
        replay (``replayable`` is then False), nor after ``upstream.send`` sent it again
        already, when a pooled connection was lost (LostAgain, CutOffAgain). The caller
        goes on through ``_next_attempt``, as for a request whose connect failed."""
        if (
            not replayable
            or isinstance(exc, (upstream.LostAgain, upstream.CutOffAgain))
            or (interim is not None and interim.relayed)
        ):
            return False
        _log.info("request_replayed", request_id=ctx.request_id, app=app.name, machine=up.id)
        return True

    async def _relay(
        self,
        request: Request,
        exchange: upstream.Exchange,
        app: AppConfig,
        gate: Gate,
        ctx: RequestContext,
        body: forward.BodyStream | None = None,
    ) -> None:
        """Relay the machine's answer. The slot is given back as soon as the machine has
        sent all of it (in our buffers or the client's socket): a slow reader is no work
        for the machine. ``body``: the request's, still being sent while this relays
        (a machine may answer before it read it all)."""
        conn = request.conn
        content = exchange.body
        streams: dict[Body, bool] | None = None
        verdicts = self.health
        up = ctx.up
        assert up is not None
        if exchange.status >= 500:
            verdicts.failed(app.name, up, health.SERVER_ERROR)
        elif verdicts.records:
            verdicts.succeeded(app.name, up)
        try:
            with_body = not exchange.head_only and exchange.status not in _EMPTY_STATUS
            head = forward.response_head(
                exchange.status,
                exchange.reason,
                exchange.headers,
                upstream_version=exchange.version,
                request_id=ctx.request_id,
                wake=(
                    (ctx.wake if ctx.wake_pending is None else wake_label(ctx))
                    if self._knobs.wake_header
                    else None
                ),
                client_version=request.version,
                keep_alive=conn.keeps_alive(request),
                with_body=with_body,
            )
            ctx.status = exchange.status
            if head.close:
                request.keep_alive = False  # e.g. an HTTP/1.0 client reading to the end
            if not content.done:
                # A stream, perhaps long-lived: a drain of its machine may end it. Only a
                # chunked event stream can end cleanly early; any other body still coming
                # (a Content-Length, one read to the close) is cut at the drain's deadline.
                streams = self._streams.setdefault(up.id, {})
                endless = streams[content] = head.chunked and _event_stream(exchange.headers)
                up.long_lived += 1  # the policy's scale-downs take it last (until finally)
                if up.cut_off or (endless and (self._closing or up.ending)):
                    # Its head came after stop() or its machine's drain ended the others
                    # (after the drain's deadline, any answer: the machine goes down).
                    content.end_early()
            if content.done:
                # A small answer came whole: head and body in one write.
                _give_back(gate, ctx, verdicts)
                ctx.headers_at = self._loop.time()
                data = content.take()
                if head.chunked:
                    data = _chunk(data) + b"0\r\n\r\n" if data else b"0\r\n\r\n"
                conn.write(head.data + data)
            else:
                conn.write(head.data)
                ctx.headers_at = self._loop.time()
                # The slot goes back when the machine's last byte arrives, even while
                # this waits for the client to take what came before it.
                content.on_eof = lambda: _give_back(gate, ctx, verdicts)
                stall = self._knobs.upstream_timeout_s
                try:
                    while True:
                        async with asyncio.timeout(stall):
                            chunk = await content.read()
                        if not chunk:
                            break
                        conn.write(_chunk(chunk) if head.chunked else chunk)
                        await conn.drain()
                except (upstream.UpstreamError, TimeoutError) as exc:
                    # The machine broke off mid-body, or sent nothing more for
                    # upstream_timeout_s: the client must not take the truncated body for
                    # a whole one, so its connection is dropped.
                    if body is not None and body.failed:
                        # No: the client's upload failed (too large, too slow, gone) and
                        # the proxy cut the machine's connection off. Not the machine's
                        # fault: no ejection, no restart counted against it.
                        conn.abort()
                        return
                    stalled = isinstance(exc, TimeoutError)
                    _log.warning(
                        "upstream_body_error",
                        request_id=ctx.request_id,
                        app=app.name,
                        reason="stalled" if stalled else "broken",
                    )
                    if isinstance(exc, upstream.ConnectionLost):
                        self._lost_connection(app, up)
                    verdicts.failed(app.name, up, health.TIMEOUT if stalled else health.RESET)
                    if not stalled:
                        self._reviver.lost(app.name, up, self._address(app, up)[0])
                    conn.abort()
                    return
                _give_back(gate, ctx, verdicts)
                if content.cut and streams is not None and not streams.get(content, False):
                    # A download cut at the drain's deadline: not whole, so not ended as
                    # if it were (an event stream ends cleanly: its client reconnects).
                    conn.abort()
                    return
                if head.chunked:
                    conn.write(b"0\r\n\r\n")
            if conn.writing_paused:  # the next request waits until the client took this
                await conn.drain()
        finally:
            if streams is not None:
                up.long_lived -= 1
                streams.pop(content, None)
                if not streams:
                    self._streams.pop(up.id, None)
            exchange.release()

    async def _tunnel(
        self, request: Request, exchange: upstream.Exchange, gate: Gate, ctx: RequestContext
    ) -> None:
        up = ctx.up
        assert up is not None
        machine = exchange.detach()
        response = forward.response_head(
            101,
            exchange.reason or "Switching Protocols",
            exchange.headers,
            upstream_version=exchange.version,
            request_id=ctx.request_id,
            wake=wake_label(ctx) if self._knobs.wake_header else None,
            client_version=request.version,
            keep_alive=False,
            with_body=False,
            websocket=True,
        )
        request.conn.write(response.data)
        ctx.status = 101
        ctx.headers_at = self._loop.time()
        relay = tunnel.Tunnel(request.conn, machine, up.id)
        relay.app = gate.name

        def dormant() -> None:
            # Idle for connection_idle_s: its slot no longer counts as load.
            if ctx.slot:
                ctx.slot = False
                gate.done(up)

        def active() -> None:
            # Data frames again after an idle spell: the app is in use, the slot is taken back
            # (past hard_limit if need be: the connection is open already).
            if not ctx.slot:
                (up.owner or gate.view).begin(up)
                ctx.slot = True

        relay.on_dormant = dormant
        relay.on_active = active
        self._tunnels.add(relay)
        up.long_lived += 1  # idle, it gives its slot back; a drain would still end it
        if self._closing or up.ending:
            # A handshake under way when stop() or the machine's drain began: 1001 at once.
            relay.going_away()
        try:
            await relay.run()
        finally:
            self._tunnels.discard(relay)
            up.long_lived -= 1

    def _idle_tunnels(self) -> None:
        """WebSockets with no data frame either way for ``connection_idle_s`` (pings and
        pongs do not count) give their slot back, so an app whose only load is idle
        WebSockets can go to sleep (its drain then closes them with 1001); their next data
        frame takes the slot again."""
        now = self._loop.time()
        for relay in list(self._tunnels):
            gate = self._gates.get(relay.app)
            if relay.dormant or gate is None or relay.on_dormant is None:
                continue
            if now - relay.last_active >= gate.config.connection_idle_s:
                relay.dormant = True
                relay.on_dormant()

    def end_long_lived(self, app: str, machine_id: str, everything: bool = False) -> int:
        """A drain of ``machine_id`` is about to suspend or stop it: what would never end by
        itself ends now, WebSockets to it with a close frame 1001 (going away) at a frame
        boundary (one whose closing handshake is under way, by that handshake's end),
        event streams from it at a chunk boundary. Other streamed answers (a download) may
        end within the drain's time; with ``everything`` (it is up) those still coming from
        the machine are cut, their clients' connections dropped (one the machine sent whole
        is relayed to its end), and requests sent there whose answers have not begun
        (the machine slow to answer) are answered 502 at once, their connections to the
        machine closed; requests whose connections to it are still being made (nothing
        sent) go on at once as if their connects had failed (``_next_attempt``). Their
        slots come back as they end. A WebSocket or event stream whose handshake or head
        comes later (its request was sent before) ends as soon as it begins, until the
        machine is routable again (``Upstream.ending``); after ``everything``, so does any
        answer whose body is still to come when its head arrives (it came as the cut ran),
        a download cut as above (``Upstream.cut_off``: one that came whole with its head
        is served). The number ended (or sent elsewhere)."""
        view = self.view.apps.get(app)
        up = view.upstreams.get(machine_id) if view is not None else None
        if up is not None and (up.cordoned or up.state != STARTED):
            # Out of routing (a drain shows its cordon first): what begins there from now
            # on ends at once, until it routes again; past the drain's deadline, any
            # answer whose body is still to come (the machine is about to go down).
            up.ending = True
            if everything:
                up.cut_off = True
        ended = 0
        for relay in list(self._tunnels):
            if relay.machine_id == machine_id and relay.app == app:
                relay.going_away()
                ended += 1
        for body, endless in list(self._streams.get(machine_id, {}).items()):
            if body.done:
                # The machine sent all of it (the proxy relays the rest to a slow client):
                # nothing more to come from the machine, nothing to cut.
                continue
            if endless or everything:
                body.end_early()
                ended += 1
        pool = self._pool
        if everything and up is not None and pool is not None:
            # Still waiting for their answers' heads: they would wait for upstream_timeout_s
            # (then 504) with the machine suspended under them. Their 502s go out at once.
            # Those still connecting would be sent once connected, then wait the same: they
            # go elsewhere now. Found by the machine, not by its address: a reload's
            # apps[].port (or the API) may have moved that since they were sent.
            ended += pool.cut(machine_id)
        if ended:
            _log.info("long_lived_ended", app=app, machine=machine_id, connections=ended)
        return ended

    # --- errors and accounting ----------------------------------------------------

    def _request_id(self, given: str | None) -> str:
        """The client's X-Request-Id when it is sane, else a fresh one."""
        if given and len(given) <= 128 and given.isascii() and given.isprintable():
            return given
        return self._ids.next()

    def _answer_last_hop(self, request: Request, ctx: RequestContext) -> None:
        """An OPTIONS or TRACE request with ``Max-Forwards: 0`` is this proxy's to answer
        (RFC 9110 7.6.2): it goes to no machine, and wakes none. OPTIONS gets a 200 with
        no Allow (what the app allows is the app's to say: an OPTIONS with a higher count
        reaches it). TRACE gets a 405, as nginx answers every TRACE, rather than the
        request reflected: that would echo the client's credentials (Cookie,
        Authorization) back in a body, what cross-site tracing reads; its Allow names the
        one method answered here."""
        if request.method == "TRACE":
            raise Failure(405, "TRACE with Max-Forwards: 0 is not answered", {"Allow": "OPTIONS"})
        ctx.status = 200
        self._write_own(request, ctx, 200, "", None)

    def _answer_bug(self, request: Request, ctx: RequestContext) -> None:
        """The 500 of a bug in the handler, before anything was sent: under the request's
        id and app, unlike the connection's own answer (``error_page``), which knows
        neither. Counted under that app too (app "" if the bug came before routing), with
        the proxy error ``internal``: AutoscalerHigh5xxRatio takes the proxy's errors out
        of the app's 5xx, and AutoscalerProxyErrors reports them against the app whose
        requests failed. The connection closes after it."""
        message = "internal proxy error"
        _log.error(
            "proxy_error", request_id=ctx.request_id, app=ctx.app, status=500, reason=message
        )
        self._stats.answered(ctx.app, 500, NO_WAKE, error="internal")
        request.keep_alive = False  # the connection closes after a bug: its answer says so
        self._write_own(request, ctx, 500, message, None)

    def _write_error(self, request: Request, failure: Failure, ctx: RequestContext) -> None:
        self._write_own(request, ctx, failure.status, failure.message, failure.headers)

    def _write_own(
        self,
        request: Request,
        ctx: RequestContext,
        status: int,
        message: str,
        extra: dict[str, str] | None,
    ) -> None:
        """An answer of the proxy's own (``forward.error_response``)."""
        conn = request.conn
        if conn.response_started:
            conn.abort()  # mid-response: the client must not take a cut body for whole
            return
        headers = {"X-Request-Id": ctx.request_id}
        if extra:
            headers.update(extra)
        if self._knobs.wake_header and ctx.app:
            headers["Fly-Autoscaler-Wake"] = wake_label(ctx)
        conn.write(
            forward.error_response(
                status,
                _reason(status),
                message,
                headers,
                close=not conn.keeps_alive(request),
                version=request.version,
                with_body=request.method != "HEAD",
            )
        )

    def _account(self, request: Request, ctx: RequestContext, now: float, count: bool) -> None:
        """The request's count and line (``count`` False: the line only, its 500 counted
        by ``error_page``)."""
        until = ctx.headers_at if ctx.headers_at is not None else now
        if count:
            # (The call only when its wake's answer may still be to come: a call a request
            # costs the interpreted build a thousand instructions or so.)
            wake = ctx.wake if ctx.wake_pending is None else wake_label(ctx)
            self._stats.answered(ctx.app, ctx.status, wake, until - ctx.arrived, ctx.proxy_error)
        if self._knobs.access_log:
            raw = request.target
            query = raw.find("?")
            # After the response went out (this runs once the handler is done).
            log_access(
                ctx.request_id,
                ctx.app,
                request.method,
                raw if query == -1 else raw[:query],  # queries may carry secrets
                ctx.status,
                # To the microsecond, without round(), which formats the float in decimal.
                int((now - ctx.arrived) * 1_000_000 + 0.5) / 1000,
                ctx.up.id if ctx.up is not None else None,
                ctx.wake,
            )

    def _in_flight(self) -> list[tuple[str, int]]:
        """Requests in flight per app, for the metric (the fleet view counts them)."""
        return [(name, view.in_flight) for name, view in self.view.apps.items()]

    def error_page(self, status: int, message: str) -> bytes:
        """The answer to a request refused before it was parsed whole (400, 414, 431, 505
        for an HTTP version other than 1.0 and 1.1: warnings, the client's doing), or to
        a bug in the handler (500: an error); the connection closes after it."""
        request_id = self._request_id(None)
        if status == 500:  # ours; a 505 is the client's request line
            _log.error("proxy_error", request_id=request_id, status=status, reason=message)
        else:
            _log.warning("proxy_error", request_id=request_id, status=status, reason=message)
        # A 5xx here is the proxy's own too: a bug, or a request that needs what the proxy
        # does not do (501, 505). Counted as such, or it would pass for an app's 5xx.
        error: ProxyErrorReason | None = None
        if status >= 500:
            error = "internal" if status == 500 else "unsupported"
        self._stats.answered(PRE_ROUTING, status, NO_WAKE, error=error)
        return forward.error_response(
            status, _reason(status), message, {"X-Request-Id": request_id}, close=True
        )


def _unreachable() -> Failure:
    """The answer to a request no machine of its app took the connection of."""
    return Failure(502, "no machine of this app is reachable", cause="unreachable")


def _shed(exc: QueueFull) -> Failure:
    """The answer to a held request shed by a stop or by its app's removal."""
    if isinstance(exc, ShuttingDown):
        return Failure(503, "proxy is shutting down", {"Retry-After": "1"}, "stopping")
    return Failure(
        503, "the app was removed from the configuration", {"Retry-After": "1"}, "app_removed"
    )


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer is a server-sent event stream (it never ends by itself)."""
    for key, value in headers:
        if key.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class _Knobs:
    """The ``proxy`` settings the data path reads (most on every request), as plain
    attributes: every read of a pydantic model's attribute passes its ``__getattr__`` hook,
    a few hundred instructions. Rebuilt by ``update_settings``."""

    __slots__ = (
        "access_log",
        "client_timeout_s",
        "max_field_size",
        "unhealthy_backoff_s",
        "upstream_timeout_s",
        "wake_header",
    )

    def __init__(self, proxy: ProxySettings) -> None:
        self.access_log = proxy.access_log
        self.wake_header = proxy.wake_header
        self.client_timeout_s = proxy.client_timeout_s
        self.upstream_timeout_s = proxy.upstream_timeout_s
        self.unhealthy_backoff_s = proxy.unhealthy_backoff_s
        # A machine's header lines may be as long as a client's, and never under 8 KiB.
        self.max_field_size = max(8190, proxy.max_header_bytes)


def _give_back(gate: Gate, ctx: RequestContext, verdicts: health.Health) -> None:
    """Return the request's slot, once (the machine sent its whole answer, or the request
    ended). ``_next_attempt`` may have moved it to another machine, or to none, so
    ``ctx.up`` is read here: in ``_serve`` the type checker still takes it for the machine
    assigned there, and the compiled build would check that at run time. A probe that
    ends without a verdict lets the next request probe (a machine on trial too: its
    probe's connect failed, or was never made)."""
    up = ctx.up
    if up is not None and ctx.slot:
        ctx.slot = False
        if ctx.trial:  # a machine's probe that never connected: the next one probes it
            gate.probed(up, ctx, False)
        gate.done(up)
        if ctx.probe:
            ctx.probe = False
            verdicts.abandoned(gate.name, up)


def up_host_header(app: AppConfig, up: Upstream | None) -> str:
    """Host for a request that came without one: the app's first host name, else the
    machine's address."""
    if app.hosts and not app.hosts[0].startswith("*."):
        return app.hosts[0]
    return up.authority if up is not None else app.name


def _static_machines(app: AppConfig) -> list[MachineInfo]:
    out = []
    for backend in app.backends:
        hp = parse_host_port(backend)
        out.append(
            MachineInfo(id=backend, host=hp.host, port=hp.port, state=STARTED, cordoned=False)
        )
    return out

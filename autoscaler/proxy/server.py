"""The data path: an aiohttp server that routes, admits, forwards and accounts each request.

One request's life: route by Host (404 when no app), take a slot through the app's
:class:`Gate` (at once, or after waiting in its FIFO while machines wake or free up; 503 when
the queue is full, 504 after ``wake_timeout_s``), forward to the machine with streamed
bodies (retrying elsewhere only when that cannot repeat a side effect), relay the response,
give the slot back, then one metric update and one log line.

aiohttp's low-level server is used rather than ``web.Application``: there is one handler
and no routing table to consult, and its protocol class is subclassed so that errors found
while parsing (a header over the limit, conflicting Content-Length and Transfer-Encoding)
get the same short bodies, request ids and log lines as the proxy's own errors.
"""

from __future__ import annotations

import asyncio
import random

from aiohttp import (
    ClientConnectionError,
    ClientError,
    ClientSession,
    ClientWSTimeout,
    DummyCookieJar,
    TCPConnector,
    WSServerHandshakeError,
    web,
)
from aiohttp.client_exceptions import ClientConnectorError, ConnectionTimeoutError
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from yarl import URL

from autoscaler.config import AppConfig, Settings, parse_host_port
from autoscaler.control.view import FleetView, MachineInfo, Upstream
from autoscaler.logs import get_logger
from autoscaler.metrics import Metrics
from autoscaler.proxy import forward, upstream
from autoscaler.proxy.accounting import (
    Failure,
    MetricChildren,
    RequestContext,
    access_line,
    remaining,
)
from autoscaler.proxy.gate import NO_WAKE, Gate, HoldTimeout, QueueFull
from autoscaler.proxy.listener import Listener
from autoscaler.proxy.routing import Router
from autoscaler.scaling.fleet import STARTED

_log = get_logger("autoscaler.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MAX_ATTEMPTS = 3
_EMPTY_STATUS = frozenset({204, 304})
# aiohttp's client (used for the WebSocket handshake) would otherwise add these to requests
# that lack them; Accept-Encoding: gzip would even change what the machine sends back.
_SKIP_AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


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
        self._session: ClientSession | None = None  # WebSockets only
        self._pool: upstream.Pool | None = None
        self._runner: web.ServerRunner | None = None
        self._websockets: set[web.WebSocketResponse] = set()
        self._children = MetricChildren(metrics)
        self._ids = random.Random()  # noqa: S311 - request ids need uniqueness, not secrecy
        self._closing = False
        self.update_settings(settings)

    # --- configuration ------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def update_settings(self, settings: Settings) -> None:
        """Apply a reloaded configuration; requests in flight and held ones carry on.

        Knobs of ``proxy`` that size the upstream pool or the listener (``listen``,
        ``pool_size``, ``max_connections``, header limits) take effect on restart.
        """
        old = {app.name: app for app in self._settings.apps} if self._gates else {}
        self._settings = settings
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
                gate = self._gates.pop(name)
                if gate.config.static:
                    self.view.remove_app(name)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen on ``proxy.listen`` (or ``host``/``port``; port 0 picks a free one)."""
        proxy = self._settings.proxy
        listen = parse_host_port(proxy.listen)
        host = listen.host if host is None else host
        port = listen.port if port is None else port
        self._session = ClientSession(
            connector=TCPConnector(
                limit=0,
                limit_per_host=proxy.pool_size,
                use_dns_cache=True,
                keepalive_timeout=30.0,
            ),
            cookie_jar=DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            trust_env=False,
            requote_redirect_url=False,
        )
        self._pool = upstream.Pool(proxy.pool_size, proxy.connect_timeout_s)
        server = Listener(
            self.handle,
            self.protocol_error,
            max_connections=proxy.max_connections,
            handler_cancellation=True,  # a client that goes away cancels its handler
            access_log=None,
            max_line_size=proxy.max_header_bytes,
            max_field_size=proxy.max_header_bytes,
            keepalive_timeout=proxy.client_timeout_s,
            # After an early answer (408, 413) aiohttp reads the rest of the body for up to
            # lingering_time (10 s) however slowly it comes: a client silent that long must
            # not outlive client_timeout_s (a slow-body slowloris holds the socket).
            lingering_time=min(10.0, proxy.client_timeout_s),
            auto_decompress=False,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=proxy.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        _log.info("proxy_listening", host=host, port=self.port)

    async def stop(self) -> None:
        """Stop accepting, let requests finish until ``shutdown_timeout_s``, then close."""
        self._closing = True
        for ws in list(self._websockets):
            # Open WebSockets last indefinitely: tell them to reconnect elsewhere.
            await ws.close(code=1001, message=b"proxy shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for gate in self._gates.values():
            await gate.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- one request --------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        ctx = RequestContext(loop.time(), self._request_id(request.headers.get("X-Request-Id")))
        app = self._router.route(request.host, request.raw_path)
        try:
            if app is None:
                raise Failure(404, "no app is configured for this host")
            ctx.app = app.name
            response = await self._serve(request, app, ctx)
            ctx.status = response.status
            return response
        except Failure as failure:
            ctx.status = failure.status
            _log.warning(
                "proxy_error",
                request_id=ctx.request_id,
                app=ctx.app,
                status=failure.status,
                reason=failure.message,
            )
            return self._error_response(failure, ctx)
        except asyncio.CancelledError:
            ctx.status = 499  # the client went away (nginx's convention; log only)
            raise
        finally:
            self._account(request, ctx, loop.time())

    async def _serve(
        self, request: web.BaseRequest, app: AppConfig, ctx: RequestContext
    ) -> web.StreamResponse:
        if self._closing:
            raise Failure(503, "proxy is shutting down", {"Retry-After": "1"})
        limit = app.max_body_bytes
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise Failure(413, f"request body over {limit} bytes")
        gate = self._gates[app.name]
        ctx.deadline = ctx.arrived + app.wake_timeout_s
        up = gate.try_acquire()
        if up is None:
            up, ctx.wake = await self._wait(gate, app, ctx)
        ctx.up = up
        inflight = self._children.inflight(app.name)
        inflight.inc()
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, app, gate, ctx)
            return await self._http(request, app, gate, ctx)
        finally:
            inflight.dec()
            if ctx.up is not None:
                gate.done(ctx.up)

    async def _wait(self, gate: Gate, app: AppConfig, ctx: RequestContext) -> tuple[Upstream, str]:
        rejections = self.metrics.queue_rejections
        try:
            return await gate.acquire(remaining(ctx.deadline))
        except QueueFull:
            rejections.labels(app=app.name, reason="queue_full").inc()
            raise Failure(503, "too many requests waiting", {"Retry-After": "1"}) from None
        except HoldTimeout as exc:
            rejections.labels(app=app.name, reason="wake_timeout").inc()
            what = "for a machine to wake" if exc.waking else "for a free machine"
            raise Failure(504, f"timed out after {app.wake_timeout_s:g}s waiting {what}") from None

    async def _next_attempt(
        self,
        ctx: RequestContext,
        gate: Gate,
        app: AppConfig,
        tried: list[Upstream],
        nothing_sent: bool,
    ) -> Upstream:
        """Another machine for a request that failed where a replay is safe.

        Up to MAX_ATTEMPTS machines are tried at once. Past that, a request that never got
        through to a machine (connection refused) of an app the controller manages waits
        in the queue like any other, until its deadline: a machine the API calls started
        may still be booting its server, and will answer once it listens.
        """
        up = ctx.up
        assert up is not None
        tried.append(up)
        ctx.up = None
        gate.done(up)
        up = gate.try_acquire(tuple(tried), jump=True) if len(tried) < MAX_ATTEMPTS else None
        if up is None:
            if not nothing_sent or app.static or remaining(ctx.deadline) <= 0:
                raise Failure(502, "no machine of this app is reachable")
            try:  # a machine still booting refused us: wait for it (or a wake) as others do
                up, _ = await gate.acquire(remaining(ctx.deadline))
            except (QueueFull, HoldTimeout):
                raise Failure(502, "no machine of this app is reachable") from None
        ctx.up = up
        return up

    def _url(self, app: AppConfig, up: Upstream, raw_path: str) -> URL:
        authority = up.authority
        if app.port is not None and not app.static and up.port != app.port:
            host = up.host
            authority = f"[{host}]:{app.port}" if ":" in host else f"{host}:{app.port}"
        return URL(f"http://{authority}{raw_path}", encoded=True)

    def _failed_connect(self, app: AppConfig, up: Upstream) -> bool:
        """Nothing was sent: skip this machine for a while; the retry is always safe."""
        view = self.view.app(app.name)
        view.mark_unhealthy(up, self._settings.proxy.unhealthy_backoff_s)
        view.notify()
        _log.info("machine_unreachable", app=app.name, machine=up.id)
        return True

    async def _http(
        self, request: web.BaseRequest, app: AppConfig, gate: Gate, ctx: RequestContext
    ) -> web.StreamResponse:
        proxy = self._settings.proxy
        pool = self._pool
        if pool is None:
            raise Failure(503, "proxy is not running")
        headers = forward.request_headers(request, ctx.request_id, self._trust)
        if "Host" not in headers:  # an HTTP/1.0 client; HTTP/1.1 upstream needs one
            headers["Host"] = up_host_header(app, ctx.up)
        method = request.method
        has_body = request.body_exists
        expect = (
            has_body
            and request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        )
        body: forward.BodyStream | None = None
        tried: list[Upstream] = []
        up = ctx.up
        while True:
            assert up is not None
            data = None
            if has_body:
                body = forward.BodyStream(
                    request,
                    app.max_body_bytes,
                    proxy.client_timeout_s,
                    expect,
                    upstream_timeout=proxy.upstream_timeout_s,
                )
                data = body.chunks()
            try:
                # Headers are due upstream_timeout_s after the body's end (a slow upload is
                # the client's time, bounded by client_timeout_s per read).
                async with asyncio.timeout(None if has_body else proxy.upstream_timeout_s) as tm:
                    if body is not None:
                        body.on_done = tm
                    port = up.port if app.port is None or app.static else app.port
                    exchange = await upstream.send(
                        pool,
                        up.host,
                        port,
                        up.authority if port == up.port else _authority(up.host, port),
                        method,
                        request.raw_path,
                        headers,
                        data,
                        replayable=method in IDEMPOTENT and not has_body,
                        max_field_size=max(8190, proxy.max_header_bytes),
                    )
            except ConnectionTimeoutError:
                retry = nothing_sent = self._failed_connect(app, up)
            except TimeoutError:
                raise Failure(504, "the machine did not answer in time") from None
            except ClientError as exc:
                nothing_sent = False
                if body is not None and body.too_large:
                    raise Failure(413, f"request body over {app.max_body_bytes} bytes") from None
                if body is not None and body.timed_out:
                    raise Failure(408, "the client sent its body too slowly") from None
                if isinstance(exc, ClientConnectorError):
                    retry = nothing_sent = self._failed_connect(app, up)
                elif isinstance(exc, ClientConnectionError):
                    # Reset or closed before any response byte: a replay is safe only if
                    # the method is idempotent and no body byte was consumed.
                    retry = method in IDEMPOTENT and (body is None or not body.started)
                else:
                    retry = False
                if not retry:
                    raise Failure(502, "the machine failed to answer") from None
            else:
                return await self._relay(request, exchange, app, ctx)
            if body is not None and body.started:
                raise Failure(502, "no machine of this app is reachable")
            up = await self._next_attempt(ctx, gate, app, tried, nothing_sent)

    async def _relay(
        self,
        request: web.BaseRequest,
        exchange: upstream.Exchange,
        app: AppConfig,
        ctx: RequestContext,
    ) -> web.StreamResponse:
        proxy = self._settings.proxy
        message, content = exchange.message, exchange.payload
        assert message is not None
        assert content is not None
        try:
            v = message.version
            headers = forward.response_headers(
                message.raw_headers,
                ctx.request_id,
                ctx.wake if proxy.wake_header else None,
                f"{v.major}.{v.minor}",
            )
            with_body = request.method != "HEAD" and message.code not in _EMPTY_STATUS
            if with_body and content.is_eof():
                # The whole body came with the head (a small response): aiohttp then sends
                # head and body in one write, a system call saved per request.
                ctx.headers_at = asyncio.get_running_loop().time()
                return web.Response(
                    status=message.code,
                    reason=message.reason,
                    headers=headers,
                    body=content.read_nowait(),
                )
            resp = web.StreamResponse(status=message.code, reason=message.reason, headers=headers)
            await resp.prepare(request)
            ctx.headers_at = asyncio.get_running_loop().time()
            if with_body:
                try:
                    while True:
                        chunk = await content.readany()
                        if not chunk:
                            break
                        await resp.write(chunk)
                except ClientError:
                    # The machine broke off mid-body: the client must not take the
                    # truncated body for a whole one, so its connection is dropped.
                    _log.warning("upstream_body_error", request_id=ctx.request_id, app=app.name)
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
            await resp.write_eof()
            return resp
        finally:
            exchange.release()

    async def _websocket(
        self, request: web.BaseRequest, app: AppConfig, gate: Gate, ctx: RequestContext
    ) -> web.StreamResponse:
        session = self._session
        if session is None:
            raise Failure(503, "proxy is not running")
        proxy = self._settings.proxy
        headers = forward.request_headers(request, ctx.request_id, self._trust, websocket=True)
        offered = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",")
            if p.strip()
        ]
        tried: list[Upstream] = []
        up = ctx.up
        while True:
            assert up is not None
            try:
                async with asyncio.timeout(proxy.upstream_timeout_s):
                    upstream_ws = await session.ws_connect(
                        self._url(app, up, request.raw_path),
                        headers=headers,
                        protocols=offered,
                        autoclose=False,
                        autoping=True,
                        max_msg_size=forward.WS_MAX_MESSAGE,
                        timeout=ClientWSTimeout(ws_close=10.0),
                        compress=0,
                    )
                break
            except WSServerHandshakeError as exc:
                raise Failure(502, f"the machine refused the WebSocket ({exc.status})") from None
            except ConnectionTimeoutError:
                nothing_sent = self._failed_connect(app, up)
            except TimeoutError:
                raise Failure(504, "the machine did not answer in time") from None
            except ClientConnectorError:
                nothing_sent = self._failed_connect(app, up)
            except ClientConnectionError:
                nothing_sent = False  # a handshake has no body: replaying it is safe
            except ClientError:
                raise Failure(502, "the machine failed to answer") from None
            up = await self._next_attempt(ctx, gate, app, tried, nothing_sent)
        client_ws = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoclose=False,
            autoping=True,
            max_msg_size=forward.WS_MAX_MESSAGE,
            compress=False,
        )
        if proxy.wake_header:
            client_ws.headers["Fly-Autoscaler-Wake"] = ctx.wake
        client_ws.headers["X-Request-Id"] = ctx.request_id
        try:
            await client_ws.prepare(request)
        except BaseException:
            await upstream_ws.close()
            raise
        ctx.headers_at = asyncio.get_running_loop().time()
        self._websockets.add(client_ws)
        try:
            await forward.relay_websocket(client_ws, upstream_ws)
        finally:
            self._websockets.discard(client_ws)
        return client_ws

    # --- errors and accounting ----------------------------------------------------

    def _request_id(self, given: str | None) -> str:
        """The client's X-Request-Id when it is sane, else a fresh random one.

        Ids need to be unique, not unguessable: 128 bits from a PRNG cost a microsecond
        where uuid4 reads the kernel's entropy pool on every request.
        """
        if given and len(given) <= 128 and given.isascii() and given.isprintable():
            return given
        return f"{self._ids.getrandbits(128):032x}"

    def _error_response(self, failure: Failure, ctx: RequestContext) -> web.Response:
        resp = web.Response(status=failure.status, text=failure.message + "\n")
        resp.headers["X-Request-Id"] = ctx.request_id
        if failure.headers:
            resp.headers.update(failure.headers)
        if self._settings.proxy.wake_header and ctx.app:
            resp.headers["Fly-Autoscaler-Wake"] = ctx.wake
        if failure.status in (408, 413):
            resp.force_close()  # the rest of the body is not worth waiting for
        return resp

    def _account(self, request: web.BaseRequest, ctx: RequestContext, now: float) -> None:
        children = self._children
        children.requests(ctx.app, ctx.status, ctx.wake).inc()
        until = ctx.headers_at if ctx.headers_at is not None else now
        children.duration(ctx.app).observe(until - ctx.arrived)
        if self._settings.proxy.access_log:
            raw = request.raw_path
            query = raw.find("?")
            # Rendering a log line costs as much as proxying a small request. A small
            # response is written only after this handler returns, so the line is emitted
            # on the loop's next turn: after the response, off the request's latency.
            asyncio.get_running_loop().call_soon(
                access_line,
                ctx.request_id,
                ctx.app,
                request.method,
                raw if query == -1 else raw[:query],  # queries may carry secrets
                ctx.status,
                round((now - ctx.arrived) * 1000, 3),
                ctx.up.id if ctx.up is not None else None,
                ctx.wake,
            )

    def protocol_error(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> web.Response:
        """A request aiohttp could not parse, or a bug in the handler (500)."""
        request_id = self._request_id(None)
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc.message)
        ):
            status, message = 431, "request header fields too large"
        elif status == 400:
            message = "bad request"
            if isinstance(exc, HttpProcessingError) and exc.message:
                message = f"bad request: {str(exc.message)[:120]}"
        elif status == 500:
            message = "internal proxy error"
        else:
            message = "error"
        if status >= 500:
            _log.error(
                "proxy_error", request_id=request_id, status=status, reason=message, exc_info=exc
            )
        else:
            _log.warning("proxy_error", request_id=request_id, status=status, reason=message)
        self.metrics.requests.labels(app="", code=str(status), wake=NO_WAKE).inc()
        resp = web.Response(status=status, text=message + "\n")
        resp.headers["X-Request-Id"] = request_id
        resp.force_close()
        return resp


def up_host_header(app: AppConfig, up: Upstream | None) -> str:
    """Host for a request that came without one: the app's first host name, else the
    machine's address."""
    if app.hosts and not app.hosts[0].startswith("*."):
        return app.hosts[0]
    return up.authority if up is not None else app.name


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _static_machines(app: AppConfig) -> list[MachineInfo]:
    out = []
    for backend in app.backends:
        hp = parse_host_port(backend)
        out.append(
            MachineInfo(id=backend, host=hp.host, port=hp.port, state=STARTED, cordoned=False)
        )
    return out

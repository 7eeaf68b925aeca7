"""`autoscaler status`: fetch the admin server's ``/status`` and print it as a table.

The admin address and token come from the settings (file, then ``AUTOSCALER_ADMIN__*``
variables), so the command reads the same configuration as the server it asks; ``--admin``
overrides the address. The token is only ever sent in the Authorization header.

``--watch`` asks again every second. On a terminal it draws the demo's live view
(:mod:`autoscaler.tui`: machines as rows, request rate and latency as sparklines from
``/metrics``) redrawn in place until Ctrl-C; elsewhere it prints the table (or, with
``--json``, one JSON document per line) every second.

Whatever the admin server does (refuse, answer 401, answer HTML or a document of another
shape, stall, send without end, close mid-answer) the command prints one line on stderr and
exits 1 (2 for a configuration problem); an answer must be whole within the timeout and at
most ``MAX_ANSWER_BYTES`` long. ``--watch`` shows such a line and asks again.
"""

from __future__ import annotations

import contextvars
import http.client
import io
import json
import math
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.text import Text

from autoscaler import tui
from autoscaler.aio import local_host
from autoscaler.config import ConfigError, load_settings, parse_host_port
from autoscaler.tui import ago

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2

MAX_ANSWER_BYTES = 64 << 20
"""The largest answer read (``/status`` of 1,000 apps of 5 machines is about 2 MB)."""


class StatusError(Exception):
    """The admin server could not be asked, or refused; the message says which."""


def admin_url(listen: str) -> str:
    """The base URL for an ``admin.listen`` value or a ``--admin`` argument."""
    text = listen.strip().rstrip("/")
    if text.startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port  # a port that is no number raises here
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or not parts.hostname
            or (port is not None and not 0 < port < 65536)
            or parts.query
            or parts.fragment
            or any(c.isspace() or ord(c) < 32 for c in text)
        ):
            raise ValueError(f"expected http(s)://host[:port][/path] or host:port, got {listen!r}")
        # The URL of /status itself (as the demo shows it) was asked for /status/status: 404.
        return text.removesuffix("/status") if parts.path.endswith("/status") else text
    address = parse_host_port(text, listen=True)
    if address.port == 0:  # admin.listen's "a free port": which one, only its start said
        raise ValueError(
            f"port 0 is a free port picked when the admin server starts, got {listen!r}:"
            " give --admin the address its admin_listening line logged"
        )
    host = local_host(address.host)  # a server bound to every address: on loopback
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


# --- a client with a deadline ------------------------------------------------------------
# Not httpx: its timeouts are per phase and per read (a server that sends a byte a second,
# in the head or the body, meets none of them), so a whole-answer deadline would need an
# event loop or a thread around it, and its exceptions mapped again; and it would add its
# import (httpx, httpcore, h11: about a fifth more import time, -X importtime) to every
# `autoscaler status` (and only autoscaler.fly.client imports httpx: test_architecture).

_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("deadline", default=math.inf)
"""When (``time.monotonic``) the answer being read must be whole: a socket's own timeout
is per read, so a server that sends a byte at a time would never run into it."""


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, none of them waiting past ``_DEADLINE``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open until closed
        self._deadline = _DEADLINE.get()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(min(left, self._sock.gettimeout() or left))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain file over the socket: ours reads under the deadline
        self.fp = io.BufferedReader(_DeadlineReader(sock))


class _Connection(http.client.HTTPConnection):
    response_class = _DeadlineResponse


class _TLSConnection(http.client.HTTPSConnection):
    response_class = _DeadlineResponse


class _Handler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Connection, req)


class _TLSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TLSConnection, req, context=self._context)  # type: ignore[attr-defined]


# Never through HTTP_PROXY/http_proxy (as autoscaler.aio.urlopen_direct): urlopen would send
# the request, with its Authorization header, to whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Handler, _TLSHandler)


def _get(base_url: str, path: str, token: str | None, timeout_s: float, accept: str) -> bytes:
    """The body of a 2xx answer to GET ``path``: whole within ``timeout_s`` and at most
    ``MAX_ANSWER_BYTES`` long. Any other outcome (no connection, an
    error status, no answer in time, a larger one, one that is not HTTP or is cut short) is
    a StatusError that says which in one line."""
    url = base_url.rstrip("/") + path
    if not url.startswith(("http://", "https://")):
        raise StatusError(f"expected an http:// or https:// admin URL, got {base_url!r}")
    limit = MAX_ANSWER_BYTES
    request = urllib.request.Request(url, headers={"Accept": accept})  # noqa: S310 - scheme checked above
    if token:
        # Not passed on by a redirect: another host must never see the token.
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    deadline = _DEADLINE.set(time.monotonic() + timeout_s)
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            body: bytes = resp.read(limit + 1)
            if len(body) <= limit and resp.length:
                # Content-Length promised more (a read of so many bytes does not say so).
                raise http.client.IncompleteRead(body, resp.length)
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code == 401:
            # A token that was sent and refused is not one that is missing.
            hint = (
                " (the admin token sent was refused: not the server's admin.token)"
                if token
                else " (set admin.token or AUTOSCALER_ADMIN__TOKEN)"
            )
        elif exc.code == 404:
            # Every admin server has /status and /metrics: another server answered (the
            # proxy's port, given for the admin's, answers 404 to a host it does not route).
            hint = (
                f" (nothing at {path}: this may not be the autoscaler's admin server, which"
                " listens on admin.listen; the proxy's port answers 404)"
            )
        raise StatusError(f"{url}: HTTP {exc.code}{hint}") from None
    except urllib.error.URLError as exc:  # connecting, or sending the request
        hint = ""
        if isinstance(exc.reason, ConnectionRefusedError):
            # Nothing listens there: a user new to it learns where else to ask, and why.
            hint = (
                " (is `autoscaler run` running? name its admin server with --admin, or its"
                " config with --config)"
            )
        raise StatusError(f"{url}: cannot connect: {exc.reason}{hint}") from None
    except TimeoutError:
        raise StatusError(f"{url}: no complete answer within {timeout_s:g}s") from None
    except http.client.IncompleteRead as exc:
        missing = f" ({exc.expected} bytes missing)" if exc.expected else ""
        raise StatusError(f"{url}: answer cut short{missing}") from None
    except http.client.HTTPException as exc:
        # A status line that is not HTTP, a head too long, a bad chunk. Only the
        # exception's name: its text quotes what the server sent.
        raise StatusError(f"{url}: not a valid HTTP answer ({type(exc).__name__})") from None
    except OSError as exc:
        raise StatusError(f"{url}: connection lost: {exc}") from None
    finally:
        _DEADLINE.reset(deadline)
    if len(body) > limit:
        raise StatusError(f"{url}: answer larger than {limit} bytes")
    return body


def fetch_status(base_url: str, token: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    url = base_url.rstrip("/") + "/status"
    body = _get(base_url, "/status", token, timeout_s, "application/json")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise StatusError(
            f"{url}: expected JSON, got {body[:80]!r} (this may not be the autoscaler's"
            " admin server, which listens on admin.listen)"
        ) from None
    if not isinstance(doc, dict):
        raise StatusError(f"{url}: expected a JSON object, got {type(doc).__name__}")
    return doc


def fetch_traffic(
    base_url: str, token: str | None, timeout_s: float = 5.0
) -> dict[str, tui.Traffic]:
    """Per app, the figures of ``/metrics`` the live view shows."""
    body = _get(base_url, "/metrics", token, timeout_s, "text/plain")
    try:
        return tui.traffic_by_app(text_string_to_metric_families(body.decode("utf-8")))
    except ValueError as exc:
        raise StatusError(f"{base_url}/metrics: not the Prometheus text format: {exc}") from None


def _yes(value: object) -> str:
    return "yes" if value else "no"


def columns(rows: list[list[str]], indent: str = "") -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell (two spaces apart)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _cluster_lines(cluster: dict[str, Any]) -> list[str]:
    """Cluster mode: who leads, and each replica's load and the age of its last report."""
    if cluster.get("leading"):
        role = "the leader"
    elif cluster.get("may_lead") is False:
        role = "a proxy-only follower (cluster.lead: false)"
    else:
        role = "a follower"
    lines = [
        "",
        f"cluster: this replica {cluster.get('replica')} is {role};"
        f" leader {cluster.get('leader') or 'none'}",
        f"redis {'ok' if cluster.get('redis_ok', True) else 'UNREACHABLE'};"
        f" view pushes applied {cluster.get('view_pushes_applied', 0)};"
        f" self-wakes {cluster.get('self_wakes', 0)};"
        f" actions fenced {cluster.get('actions_fenced', 0)}",
    ]
    rows = [["REPLICA", "LEADER", "REPORTED", "IN FLIGHT", "HELD"]]
    for r in cluster.get("replicas") or []:
        apps = (r.get("apps") or {}).values()
        rows.append(
            [
                str(r["id"]),
                _yes(bool(r.get("leader"))),
                ago(r.get("report_age_s")),
                str(sum(a.get("in_flight", 0) for a in apps)),
                str(sum(a.get("held", 0) for a in apps)),
            ]
        )
    return lines + columns(rows, indent="  ")


def render(doc: dict[str, Any]) -> list[str]:
    """The status document as lines of text: one block per app, one row per machine (a
    static app's backends are its machines)."""
    ready = "ready" if doc.get("ready") else "NOT READY"
    if doc.get("cluster") and not doc["cluster"].get("leading"):
        loop = "a follower (the cluster's leader decides)"
    elif doc.get("control_loop"):
        loop = f"control loop ticked {ago(doc.get('last_tick_age_s'))}"
    else:
        loop = "no control loop (no app to scale)"
    lines = [f"autoscaler {doc.get('version', '?')}: {ready}, {loop}"]
    lines += [f"  {line}" for line in tui.control_lines(doc)]
    if doc.get("cluster"):
        lines += _cluster_lines(doc["cluster"])
    apps = doc.get("apps") or []
    if not apps:
        lines.append("no scaled apps")
    for app in apps:
        lines.append("")
        lines.append(
            f"{app['app']}: desired {app['desired']}, started {app['started']}, "
            f"panic {_yes(app['panic'])}, decided {ago(app.get('last_decision_age_s'))}"
        )
        if app.get("last_reason"):
            lines.append(f"  why: {app['last_reason']}")
        if app.get("last_error"):
            lines.append(f"  last error: {app['last_error']}")
        if app.get("leased_by_others"):
            leased = ", ".join(app["leased_by_others"])
            lines.append(f"  skipped, leased by another holder: {leased}")
        machines = app.get("machines") or []
        if not machines:
            lines.append("  (no machines)")
            continue
        rows = [["MACHINE", "STATE", "CORDONED", "IN FLIGHT", "LAST USED", "NOTE"]]
        for m in machines:
            rows.append(
                [
                    str(m["id"]),
                    str(m["state"]),
                    _yes(m["cordoned"]),
                    str(m["in_flight"]),
                    ago(m.get("last_used_age_s")),
                    tui.machine_note(m),
                ]
            )
        lines += columns(rows, indent="  ")
    for app in doc.get("static_apps") or []:
        lines.append("")
        lines.append(
            f"{app['app']}: static (routed to its backends, not scaled), in flight"
            f" {app['in_flight']}, held {app['queued']},"
            f" last request {ago(app.get('last_request_age_s'))}"
        )
        rows = [["BACKEND", "STATE", "IN FLIGHT", "LAST USED"]]
        for m in app.get("machines") or []:
            rows.append(
                [str(m["id"]), str(m["state"]), str(m["in_flight"]), ago(m.get("last_used_age_s"))]
            )
        lines += columns(rows, indent="  ")
    ejected = doc.get("ejected") or []
    if ejected:
        lines.append("")
        lines.append("machines out of rotation (the proxy's passive health):")
        rows = [["APP", "MACHINE", "REASON", "EJECTIONS", "BACK IN"]]
        for e in ejected:
            left = e.get("remaining_s")
            if e.get("probing"):
                back = "probing"
            elif e.get("held"):
                back = "after its restart"
            elif left is None:
                back = "when its checks pass"
            else:
                back = f"{left:g}s"
            rows.append(
                [str(e["app"]), str(e["machine"]), str(e["reason"]), str(e["ejections"]), back]
            )
        lines += columns(rows, indent="  ")
    return lines


_SHAPE_ERRORS = (KeyError, TypeError, AttributeError, ValueError)
"""What drawing a JSON object that is not a status document raises (a key missing, a list
where an object goes, a string where a number does)."""


def _shape_error(url: str, exc: Exception) -> StatusError:
    return StatusError(
        f"{url.rstrip('/')}/status: not a status document this client can show"
        f" ({type(exc).__name__}: {exc})"
    )


def _lines(url: str, doc: dict[str, Any]) -> list[str]:
    try:
        return render(doc)
    except _SHAPE_ERRORS as exc:
        raise _shape_error(url, exc) from None


def run_status(
    admin: str | None,
    config: str | None,
    *,
    as_json: bool = False,
    watch: bool = False,
    timeout_s: float = 5.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if admin is not None and not admin.strip():
        # It fell back to admin.listen: another server than the one named may have answered.
        print(
            "autoscaler status: --admin: empty: give the admin server's URL or host:port, or"
            " leave --admin out to ask admin.listen",
            file=err,
        )
        return EXIT_CONFIG
    try:
        # It listens on nothing: a file whose servers would clash still names admin.listen.
        settings, _ = load_settings(config, serving=False)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=err)
        return EXIT_CONFIG
    token = settings.admin.token.get_secret_value() if settings.admin.token else None
    try:
        url = admin_url(admin if admin is not None else settings.admin.listen)
    except ValueError as exc:
        where = "--admin" if admin is not None else "admin.listen"
        print(f"autoscaler status: {where}: {exc}", file=err)
        return EXIT_CONFIG
    try:
        doc = fetch_status(url, token, timeout_s)
    except (StatusError, ValueError) as exc:
        print(f"autoscaler status: {exc}", file=err)
        return EXIT_UNREACHABLE
    if watch:
        return watch_status(url, token, doc, as_json=as_json, timeout_s=timeout_s, out=out)
    if as_json:
        print(json.dumps(doc, indent=2), file=out)
        return EXIT_OK
    try:
        lines = _lines(url, doc)
    except StatusError as exc:
        print(f"autoscaler status: {exc}", file=err)
        return EXIT_UNREACHABLE
    for line in lines:
        print(line, file=out)
    return EXIT_OK


def _footer(problem: str, hint: Text) -> list[Text]:
    return [Text(problem, style="red"), hint] if problem else [hint]


def watch_status(
    url: str,
    token: str | None,
    first: dict[str, Any],
    *,
    as_json: bool = False,
    timeout_s: float = 5.0,
    out: TextIO,
    interval_s: float = 1.0,
    frames: int | None = None,
    terminal: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Ask every ``interval_s`` and redraw until Ctrl-C (or ``frames`` draws: tests).

    An admin server that stops answering does not end the watch: the last status stays on
    screen with the error under it, and the next answer replaces both.
    """
    live_view = (out.isatty() if terminal is None else terminal) and not as_json
    history = tui.History()
    doc: dict[str, Any] | None = first
    shown: dict[str, Any] | None = None
    drawn = 0
    live: Live | None = None
    if live_view:
        console = Console(file=out, force_terminal=True) if terminal else Console(file=out)
        live = Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False)
        live.start()
    try:
        while True:
            problem = ""
            if drawn:
                try:
                    doc = fetch_status(url, token, timeout_s)
                except StatusError as exc:
                    problem = str(exc)
            if live is not None:
                try:
                    history.add(time.monotonic(), fetch_traffic(url, token, timeout_s))
                except StatusError as exc:
                    problem = problem or str(exc)
                hint = Text(f"{url}  every {interval_s:g} s  Ctrl-C to stop", style="dim")
                try:
                    screen = tui.view(doc, history, footer=_footer(problem, hint))
                    shown = doc
                except _SHAPE_ERRORS as exc:  # the last status that could be drawn stays
                    problem = problem or str(_shape_error(url, exc))
                    screen = tui.view(shown, history, footer=_footer(problem, hint))
                live.update(screen, refresh=True)
            elif not problem and as_json:
                print(json.dumps(doc), file=out, flush=True)
            elif not problem and doc is not None:
                try:
                    print("\n".join(_lines(url, doc)) + "\n", file=out, flush=True)
                except StatusError as exc:
                    problem = str(exc)
            if problem and live is None:
                print(f"autoscaler status: {problem}", file=out, flush=True)
            drawn += 1
            if frames is not None and drawn >= frames:
                return EXIT_OK
            sleep(interval_s)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if live is not None:
            live.stop()

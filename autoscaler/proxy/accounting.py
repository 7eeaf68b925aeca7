"""Per-request bookkeeping of the proxy: context, error outcome, metrics and the log line."""

from __future__ import annotations

import asyncio
import math
from json.encoder import encode_basestring_ascii

from autoscaler.control.view import Upstream
from autoscaler.logs import EventLine, get_logger, json_writer, line_end, now_iso, redactor
from autoscaler.metrics import NO_WAKE, ProxyErrorReason

_log = get_logger("autoscaler.proxy")
_REDACTOR = redactor()


class Failure(Exception):
    """A request that ends in an error response from the proxy itself. A 5xx names its
    ``cause`` (autoscaler_proxy_errors_total's reason): the app's own 5xx are told apart
    from the proxy's by it."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        cause: ProxyErrorReason | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.cause = cause


class RequestContext:
    """What one request's accounting needs, filled in as it goes.

    A plain class: the compiled build makes its constructor native, where a dataclass's
    ``__init__`` is generated (and interpreted) at run time.
    """

    __slots__ = (
        "app",
        "arrived",
        "deadline",
        "headers_at",
        "probe",
        "proxy_error",
        "request_id",
        "slot",
        "status",
        "trial",
        "up",
        "wake",
        "wake_pending",
    )

    def __init__(self, arrived: float, request_id: str) -> None:
        self.arrived = arrived
        self.request_id = request_id
        self.app = ""
        self.status = 0
        self.proxy_error: ProxyErrorReason | None = None  # a 5xx of the proxy's own: why
        self.wake = NO_WAKE
        # The wake it waited for when handed its machine, until its answer names it
        # (gate.wake_label).
        self.wake_pending: asyncio.Task[str] | None = None
        self.up: Upstream | None = None
        self.slot = False  # holds a slot on ``up`` (until the machine sent its whole answer)
        self.probe = False  # the first request to ``up`` after an ejection (see health)
        # The probe of ``up`` on trial, until it connected (``Gate.probed``, see gate).
        self.trial = False
        self.deadline = 0.0
        self.headers_at: float | None = None


# The last three hex digits of a request id's count.
_LAST_DIGITS = tuple("%03x" % n for n in range(4096))  # noqa: UP031


class RequestIds:
    """Fresh request ids: 64 random bits per proxy, then a count, in 32 hex digits.

    Ids need to be unique, not unguessable: a random prefix and a count cost a fraction of
    uuid4, which reads the kernel's entropy pool on every request. The count's last three
    digits come from a table, the rest is formatted once per 4096 ids: formatting every id
    cost about 2k instructions (and an f-string with ``:016x`` more: mypyc makes it a
    ``str.format()`` call).
    """

    __slots__ = ("_block", "_count", "_prefix")

    def __init__(self, prefix: int) -> None:
        self._prefix = "%016x" % prefix  # noqa: UP031
        self._count = 0
        self._block = self._prefix + "0" * 13  # the ids up to 4095

    def next(self) -> str:
        self._count += 1
        count = self._count
        low = count & 0xFFF
        if low == 0:
            self._block = self._prefix + "%013x" % (count >> 12)
        return self._block + _LAST_DIGITS[low]


def remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


# One line per request, written without structlog's processor chain (see EventLine).
access_line = EventLine(
    "autoscaler.proxy",
    "request",
    ("request_id", "app", "method", "path", "status", "duration_ms", "machine", "wake"),
)
_PARTS = access_line.parts
# JSON strings of the values that repeat (app, method, machine, wake), as
# encode_basestring_ascii writes them; bounded, and only ever a cache.
_QUOTED: dict[str, str] = {}
_QUOTED_MAX = 4096


def _quoted(text: str) -> str:
    got = _QUOTED.get(text)
    if got is None:
        got = encode_basestring_ascii(text)
        if len(_QUOTED) < _QUOTED_MAX:
            _QUOTED[text] = got
    return got


def log_access(
    request_id: str,
    app: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    machine: str | None,
    wake: str,
) -> None:
    """Write the request's line: ``access_line`` with its values' types known, so that
    the compiled build renders it without the interpreter (about a quarter of a small
    request's cost otherwise). The same text, byte for byte (tests compare them)."""
    writer = json_writer()
    if writer is None or not math.isfinite(duration_ms):
        access_line(request_id, app, method, path, status, duration_ms, machine, wake)
        return
    p = _PARTS
    # One join: mypyc turns an f-string this long into a str.format() call.
    line = "".join(
        (
            p[0], encode_basestring_ascii(request_id),
            p[1], _quoted(app),
            p[2], _quoted(method),
            p[3], encode_basestring_ascii(path),
            p[4], str(status),
            p[5], repr(duration_ms),
            p[6], "null" if machine is None else _quoted(machine),
            p[7], _quoted(wake),
            p[8], now_iso(),
            line_end(),
        )
    )  # fmt: skip
    writer.msg(_REDACTOR.scrub_text(line))

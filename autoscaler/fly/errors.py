"""One exception tree for the Machines API, and the one function that maps a response to it.

::

    FlyError(status, message, request_id)        every failure of the client
    ├── BadRequest          400, 422             the request was wrong; retrying will not help
    ├── Unauthorized        401, 403             token missing, wrong or without permission
    ├── NotFound            404                  no such app, machine, volume or metadata key
    ├── Conflict            409, 412             lease held by another / machine in the wrong state
    │   └── LeaseHeld       409                  the machine's lease is held by another holder
    ├── RateLimited         429                  .retry_after: seconds from Retry-After, or None
    │                                            (status None: the client's own limit, in a tick)
    ├── ServerError         5xx                  Fly's side failed; transient
    ├── WaitTimeout         408, own deadline    the machine did not reach the state in time
    ├── RequestTimeout      408 of another call  Fly gave up on the request; transient
    └── TransportError      status None          connect or read failure; .sent says whether
                                                 the request may have reached the server

Bodies come in two shapes: the seed's ``{"error": "...", "status": 404}`` and the real API's
``{"error": "...", "status": "insufficient_capacity"}`` (or ``message`` instead of
``error``, or no JSON at all). ``error_from_response`` reads them all; a string status is
kept as ``code``. A message is one line of at most 500 characters; an HTML page (a proxy's
or load balancer's 502) is summed up by its title, or else its first text, never its
markup.

The token never reaches these objects: messages come from response bodies and transport
errors, and ``error_from_response``/``TransportError`` scrub any secret they are given.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_MAX_MESSAGE = 500  # a long error body must not become a 50 kB exception text
_MAX_PAGE_TEXT = 200  # what an HTML error page is summed up by (its title, or first text)
_MAX_PAGE_READ = 65536  # characters of an error body looked at for a message
_MAX_FIELD = 128  # a request id or a string code: short words, whatever a server sends
REQUEST_ID_HEADER = "fly-request-id"
WAIT_OPERATION = "wait_for_machine_state"  # whose 408 means "not there yet"


class FlyError(Exception):
    """A failed Machines API call: HTTP status (None for transport), message, request id."""

    def __init__(
        self,
        status: int | None,
        message: str,
        request_id: str | None = None,
        *,
        code: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.request_id = request_id
        self.code = code  # the real API's string status ("insufficient_capacity"), if any
        self.operation = operation

    def __str__(self) -> str:
        parts: list[str] = []
        if self.operation:
            parts.append(f"{self.operation}:")
        if self.status is not None:
            parts.append(f"HTTP {self.status}:")
        parts.append(self.message)
        if self.code:
            parts.append(f"(code {self.code})")
        if self.request_id:
            parts.append(f"[request {self.request_id}]")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, "
            f"request_id={self.request_id!r})"
        )

    @property
    def transient(self) -> bool:
        """Worth retrying for an idempotent call (429, 5xx, transport)."""
        return False


class BadRequest(FlyError):
    pass


class Unauthorized(FlyError):
    pass


class NotFound(FlyError):
    pass


class Conflict(FlyError):
    pass


class LeaseHeld(Conflict):
    """409: someone else (a ``fly deploy``, another tool) holds the machine's lease, so
    the call needs that holder's nonce. A Conflict, so code that treats every conflict
    alike still does; code that must not fight a lease holder catches this first."""


class RateLimited(FlyError):
    def __init__(
        self,
        status: int | None,
        message: str,
        request_id: str | None = None,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(status, message, request_id, code=code, operation=operation)
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return True


class ServerError(FlyError):
    @property
    def transient(self) -> bool:
        return True


class WaitTimeout(FlyError):
    pass


class TransportError(FlyError):
    """Connect or read failure. ``sent`` is False only when the request surely never left."""

    def __init__(
        self,
        message: str,
        *,
        sent: bool = True,
        retryable: bool = True,
        operation: str | None = None,
    ) -> None:
        super().__init__(None, message, None, operation=operation)
        self.sent = sent
        self._retryable = retryable

    @property
    def transient(self) -> bool:
        return self._retryable


def may_have_landed(error: FlyError) -> bool:
    """Whether a call that failed with ``error`` may have been carried out all the same:
    it was sent, and no answer of the API's refused it (a connection lost after the
    request left, a 5xx or 408 of Fly's edge, which may answer for a machine that acted).
    A 429 refused it, and a call never sent (a connect failure, fencing) did nothing."""
    if isinstance(error, TransportError):
        return error.sent
    return error.transient and not isinstance(error, RateLimited)


class RequestTimeout(FlyError):
    """408 to a call other than ``/wait`` (where it means "not yet"): Fly's edge gave up on
    the request. Transient, as flyctl treats it: a safe call is tried again."""

    @property
    def transient(self) -> bool:
        return True


# 429 (RateLimited, with its Retry-After) and 5xx (ServerError) are handled apart; a 408
# is WaitTimeout from /wait, RequestTimeout from anything else.
_CLASS_BY_STATUS: Mapping[int, type[FlyError]] = {
    400: BadRequest,
    422: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    408: WaitTimeout,
    409: LeaseHeld,
    412: Conflict,
}


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def _field(value: str | None, secrets: Iterable[str]) -> str | None:
    """A request id or code as the server sent it, scrubbed, on one line, bounded."""
    if not value:
        return None
    return _one_line(scrub(value, secrets))[:_MAX_FIELD] or None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# One tag (or what starts like one, up to its ">" or the end) or one run of text: a scan
# in one pass, whatever the markup (html.parser takes quadratic time on some broken pages:
# 20 s for 60 kB of unclosed attributes).
_PIECE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)?[^>]*>?|[^<]+")


def _page_text(page: str) -> tuple[str, str]:
    """An HTML page's title and its visible text (no script, style or markup), each on
    one line."""
    title: list[str] = []
    text: list[str] = []
    skipping: str | None = None  # inside a script or style element
    in_title = False
    for piece in _PIECE.finditer(page):
        if not piece.group(0).startswith("<"):
            if skipping is None:
                (title if in_title else text).append(piece.group(0))
            continue
        closing, name = piece.group(1), (piece.group(2) or "").lower()
        if name in ("script", "style"):
            if not closing:
                skipping = name
            elif skipping == name:
                skipping = None
        elif name == "title":
            in_title = not closing
            if closing and title:
                break  # the title is what a page is summed up by
        elif skipping is None:
            (title if in_title else text).append(" ")
    return _one_line(html.unescape("".join(title))), _one_line(html.unescape("".join(text)))


# White space, control characters and the invisible ones that reorder or hide text.
_BLANKS = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+")


def _one_line(text: str) -> str:
    """``text`` on one line: control characters and runs of white space become one space."""
    return _BLANKS.sub(" ", text).strip()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(text: str, content_type: str, secrets: tuple[str, ...]) -> str:
    """An error body's text as a message, scrubbed: an HTML page (a proxy's 502, a login
    page) as its title or else its first text, never its markup; anything else on one
    line. Scrubbed before it is cut, so that no piece of a secret is left."""
    text = scrub(text, secrets)[:_MAX_PAGE_READ]
    if not _is_html(text, content_type):
        return _cut(scrub(_one_line(text), secrets), _MAX_MESSAGE)
    title, body = _page_text(text)
    found = title or body
    found = _cut(scrub(found, secrets), _MAX_PAGE_TEXT)
    return f"HTML page: {found}" if found else "HTML page with no text"


def _is_html(text: str, content_type: str) -> bool:
    """Whether an error body is markup: said so, or a page that starts like one."""
    if "html" in content_type.lower():
        return True
    start = text.lstrip()[:15].lower()
    return start.startswith(("<!doctype", "<html", "<head", "<body", "<title", "<?xml"))


def _body_fields(
    body: bytes, content_type: str = "", secrets: tuple[str, ...] = ()
) -> tuple[str | None, str | None]:
    """(message, string code) from any of the known error body shapes; the message
    scrubbed of ``secrets`` and bounded, the code as sent."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it can go
        data = None
    if isinstance(data, str):
        return _summary(data, "", secrets) or None, None
    if not isinstance(data, dict):
        text = body.decode("utf-8", "replace") if body else ""
        return _summary(text, content_type, secrets) or None, None
    message = data.get("error") or data.get("message")
    # The seed's status repeats the HTTP status (an int, or digits); only the real API's
    # string status ("insufficient_capacity") says more, and is kept as the code.
    status = data.get("status")
    code = status if isinstance(status, str) and status and not status.isdigit() else None
    if message is None:
        return None, code
    return _summary(str(message), "", secrets) or None, code


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    operation: str | None = None,
    secrets: Iterable[str] = (),
    now: datetime | None = None,
) -> FlyError:
    """The exception for a non-2xx response. The one place statuses become exception types.

    ``headers`` must be case-insensitive (httpx.Headers is) or use lower-case keys.
    """
    secrets = tuple(secrets)
    # Scrubbed before it is read too: markup or a line break inside an echoed token
    # would split it past the scrub of the message.
    text = scrub(body.decode("utf-8", "replace"), secrets).encode() if secrets and body else body
    message, code = _body_fields(text, headers.get("content-type") or "", secrets)
    message = message or f"HTTP {status}"
    # The request id and the code are the server's words too, and go into str() and the
    # log line beside the message: a server (or a proxy) that echoes the Authorization
    # header in them must not put the token there.
    code = _field(code, secrets)
    request_id = _field(headers.get(REQUEST_ID_HEADER) or headers.get("x-request-id"), secrets)
    kw: dict[str, str | None] = {"code": code, "operation": operation}
    if status == 429:
        retry_after = parse_retry_after(headers.get("retry-after"), now)
        return RateLimited(status, message, request_id, retry_after=retry_after, **kw)
    if status == 408 and operation != WAIT_OPERATION:
        return RequestTimeout(status, message, request_id, **kw)
    cls = _CLASS_BY_STATUS.get(status) or (ServerError if status >= 500 else FlyError)
    return cls(status, message, request_id, **kw)

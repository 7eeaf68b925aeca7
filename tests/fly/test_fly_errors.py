"""The mapping from responses to the exception tree, for every status and body shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
    error_from_response,
    parse_retry_after,
)

H = httpx.Headers


def test_a_408_from_wait_means_not_yet() -> None:
    err = error_from_response(408, b"{}", H({}), operation="wait_for_machine_state")
    assert type(err) is WaitTimeout
    assert not err.transient
    assert error_from_response(408, b"{}", H({}), operation="get_machine").transient


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Unauthorized),
        (404, NotFound),
        (408, RequestTimeout),  # from /wait: WaitTimeout (below)
        (409, LeaseHeld),
        (412, Conflict),
        (422, BadRequest),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (418, FlyError),
    ],
)
def test_status_maps_to_class(status: int, cls: type[FlyError]) -> None:
    err = error_from_response(status, b'{"error": "nope"}', H({"fly-request-id": "r-1"}))
    assert type(err) is cls
    assert err.status == status
    assert err.message == "nope"
    assert err.request_id == "r-1"
    assert "r-1" in str(err)
    assert "nope" in str(err)


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({"error": "machine not found", "status": 404}, "machine not found", None),
        (
            {"error": "no room", "status": "insufficient_capacity"},
            "no room",
            "insufficient_capacity",
        ),
        ({"message": "name taken", "status": "name_taken"}, "name taken", "name_taken"),
        ({"message": "bare message"}, "bare message", None),
        ({"error": "string digits", "status": "404"}, "string digits", None),
        ({}, "HTTP 404", None),
        ("just a string", "just a string", None),
    ],
)
def test_body_shapes(body: object, message: str, code: str | None) -> None:
    err = error_from_response(404, json.dumps(body).encode(), H())
    assert isinstance(err, NotFound)
    assert err.message == message
    assert err.code == code


def test_non_json_and_empty_bodies() -> None:
    err = error_from_response(502, b"Bad gateway\r\n  try again\x1b[31m", H())
    assert isinstance(err, ServerError)
    assert err.message == "Bad gateway try again [31m"  # one line, no control characters
    assert error_from_response(500, b"", H()).message == "HTTP 500"
    assert len(error_from_response(500, b"x" * 100_000, H()).message) <= 500


NGINX_502 = b"""<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (NGINX_502, "text/html", "HTML page: 502 Bad Gateway"),
        (NGINX_502, "", "HTML page: 502 Bad Gateway"),  # no content type: it looks like one
        (
            b"<!DOCTYPE html><html><head><style>p{color:red}</style>"
            b"<script>var x = '<b>';</script></head><body><div><p>Upstream &amp; proxy"
            b"\n\n   timed out</p></div></body></html>",
            "text/html; charset=utf-8",
            "HTML page: Upstream & proxy timed out",
        ),
        (b"<html><body></body></html>", "text/html", "HTML page with no text"),
        (b'"<html><title>quoted</title></html>"', "application/json", "HTML page: quoted"),
        (b'{"error": "<html><title>in json</title></html>"}', "", "HTML page: in json"),
    ],
)
def test_an_html_error_page_is_summed_up_not_echoed(
    body: bytes, content_type: str, message: str
) -> None:
    """A proxy's or load balancer's error page (nginx's 502) became the exception's
    message markup and all, and with it every log line of the call's failure."""
    err = error_from_response(502, body, H({"content-type": content_type}))
    assert isinstance(err, ServerError)
    assert err.message == message
    assert str(err) == f"HTTP 502: {message}"


def test_a_huge_html_page_is_summed_up_in_a_bounded_message() -> None:
    title = "T" * 1000
    page = f"<html><head><title>{title}</title></head><body>{'<p>x</p>' * 100_000}</body></html>"
    err = error_from_response(503, page.encode(), H({"content-type": "text/html"}))
    assert err.message.startswith("HTML page: TTT")
    assert len(err.message) <= 250
    assert "<" not in err.message


def test_integer_status_in_the_body_does_not_override_http_status() -> None:
    err = error_from_response(409, b'{"error": "lease held", "status": 500}', H())
    assert isinstance(err, Conflict)
    assert err.status == 409


def test_retry_after_seconds_and_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    err = error_from_response(429, b"", H({"Retry-After": "7"}))
    assert isinstance(err, RateLimited)
    assert err.retry_after == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:05 GMT", now) == 5.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None
    # A number too large for C: unreadable, not an OverflowError out of the 429's handling.
    assert parse_retry_after("Thu, 01 Jan 99999999999999999999 00:00:00 GMT", now) is None
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:00 +99999999999999999999", now) is None
    huge = error_from_response(429, b"", H({"Retry-After": "Thu, 99999999999999999999 Jan 2026"}))
    assert isinstance(huge, RateLimited)
    assert huge.retry_after is None
    no_header = error_from_response(429, b"", H())
    assert isinstance(no_header, RateLimited)
    assert no_header.retry_after is None


def test_transient_flags() -> None:
    assert error_from_response(429, b"", H()).transient
    assert error_from_response(503, b"", H()).transient
    assert not error_from_response(404, b"", H()).transient
    assert not error_from_response(412, b"", H()).transient
    assert TransportError("ConnectError").transient
    assert not TransportError("UnsupportedProtocol", retryable=False).transient
    assert TransportError("x", sent=False).sent is False


def test_messages_are_scrubbed_of_secrets() -> None:
    err = error_from_response(
        401, b'{"error": "bad token Bearer s3cr3t-tok"}', H(), secrets=["s3cr3t-tok"]
    )
    assert "s3cr3t-tok" not in str(err)
    assert "s3cr3t-tok" not in repr(err)
    assert "[REDACTED]" in err.message


def test_repr_and_str() -> None:
    err = error_from_response(404, b'{"error": "gone"}', H(), operation="get_machine")
    assert repr(err) == "NotFound(status=404, message='gone', request_id=None)"
    assert str(err) == "get_machine: HTTP 404: gone"


async def test_a_body_nested_too_deep_for_the_json_parser_is_an_error_not_a_crash() -> None:
    """json.loads raises RecursionError (not ValueError) on deeply nested arrays: a
    broken proxy's body made an error answer, or a 2xx one, crash the call with it."""
    from flyfakes import Script, make_client

    deep = b"[" * 100_000 + b"]" * 100_000
    err = error_from_response(502, deep, H())
    assert isinstance(err, ServerError)
    assert len(err.message) <= 500
    for reply in (httpx.Response(502, content=deep), httpx.Response(200, content=deep)):
        async with make_client(Script([reply]), max_retries=0) as api:
            with pytest.raises(FlyError):
                await api.list_machines("web")

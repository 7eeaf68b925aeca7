"""Logging: JSON lines off a terminal, and secrets redacted wherever they would appear."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import httpx
import pytest
from structlog.testing import capture_logs

from autoscaler import logs
from autoscaler.proxy.accounting import log_access


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    logs.configure(level="debug", fmt="auto", secrets=["tok-abcdef123456"], stream=out)
    return out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_json_lines_when_not_a_terminal(stream: io.StringIO) -> None:
    logs.get_logger("t").info("decision", app="web", desired=3)
    (entry,) = lines(stream)
    assert entry["event"] == "decision"
    assert entry["app"] == "web"
    assert entry["desired"] == 3
    assert entry["level"] == "info"
    assert "timestamp" in entry


def test_token_redacted_everywhere(stream: io.StringIO) -> None:
    log = logs.get_logger("t")
    log.info("api", url="https://x/?t=tok-abcdef123456", headers={"Authorization": "Bearer x"})
    log.warning("failed: Bearer tok-abcdef123456 rejected", nested=["a", ("tok-abcdef123456",)])
    logging.getLogger("aiohttp.client").error("stdlib says tok-abcdef123456")
    try:
        raise RuntimeError("boom tok-abcdef123456")
    except RuntimeError:
        log.exception("crash")
    text = stream.getvalue()
    assert "tok-abcdef123456" not in text
    assert text.count(logs.REDACTED) >= 5
    assert len(lines(stream)) == 4


def test_secret_keys_redacted_even_when_unknown(stream: io.StringIO) -> None:
    logs.get_logger("t").info("login", token="never-registered", password="pw")
    (entry,) = lines(stream)
    assert entry["token"] == logs.REDACTED
    assert entry["password"] == logs.REDACTED


def test_level_filters(stream: io.StringIO) -> None:
    logs.configure(level="warning", fmt="json", stream=stream)
    logs.get_logger("t").info("hidden")
    logs.get_logger("t").warning("shown")
    assert [e["event"] for e in lines(stream)] == ["shown"]


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure(level="loud", stream=io.StringIO())


def test_a_closed_stream_never_raises_into_the_caller() -> None:
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    out.close()
    logs.get_logger("t").info("after close")  # must not raise
    logging.getLogger("lib").warning("stdlib too")


_STAMP = re.compile(r'"timestamp": "[0-9T:.-]+Z"')
_KEYS = ("request_id", "app", "status", "duration_ms", "machine", "ok", "extra")
_VALUES = [
    ("abc", "web", 200, 1.25, None, True, 7),
    ('q"uote\\back\nline', "ünï€😀", -1, 0.0, "m-1", False, float("nan")),
    ("x", "y", 10**30, float("inf"), "m", None, "sk/tok-abcdef123456/z"),
]


@pytest.mark.parametrize("values", _VALUES)
def test_event_line_writes_what_structlog_would(stream: io.StringIO, values: tuple) -> None:
    line = logs.EventLine("autoscaler.test", "request", _KEYS)
    line(*values)
    logs.get_logger("autoscaler.test").info("request", **dict(zip(_KEYS, values, strict=True)))
    fast, slow = (_STAMP.sub("T", text) for text in stream.getvalue().splitlines())
    assert fast == slow
    assert "tok-abcdef123456" not in fast


def test_event_line_takes_percent_signs_anywhere(stream: io.StringIO) -> None:
    # The line is a %-template: what it holds as text must stay text.
    keys = ("100%", "a%sb", "%(x)s")
    values = ("%s", "50%", "%(y)d")
    line = logs.EventLine("autoscaler.te%st", "req%uest", keys)
    line(*values)
    logs.get_logger("autoscaler.te%st").info("req%uest", **dict(zip(keys, values, strict=True)))
    written = stream.getvalue().splitlines()
    fast, slow = (_STAMP.sub("T", text) for text in written)
    assert fast == slow
    assert json.loads(written[0])["a%sb"] == "50%"


def test_event_line_goes_through_structlog_when_its_chain_is_not_in_force(
    stream: io.StringIO,
) -> None:
    line = logs.EventLine("autoscaler.test", "request", ("app", "detail"))
    with capture_logs() as captured:
        line("web", "plain")
    (event,) = captured
    assert event["app"] == "web"
    assert event["event"] == "request"
    assert event["log_level"] == "info"
    line("web", {"token": "never-registered"})  # a container: redacted by the chain
    (entry,) = lines(stream)
    assert entry["detail"] == {"token": logs.REDACTED}
    logs.configure(level="warning", fmt="json", stream=stream)
    line("web", "below the level")
    assert len(lines(stream)) == 1


def test_event_line_refuses_keys_it_could_not_write_as_the_chain_does() -> None:
    with pytest.raises(ValueError, match="secret"):
        logs.EventLine("autoscaler.test", "request", ("app", "token"))
    for keys in [(), ("app", "level"), ("timestamp",)]:
        with pytest.raises(ValueError, match="needs keys"):
            logs.EventLine("autoscaler.test", "request", keys)


_ACCESS_VALUES = [
    ("0123abcd", "web", "GET", "/", 200, 0.412, None, "none"),
    ('q"uote\\', "ünï€😀", "PATCH", "/p/ünï?x/tok-abcdef123456", 599, 1234.5, "m-1", "start"),
    ("", "", "", "", 0, 0.0, "", "resume"),
    ("id", "web", "GET", "/", 502, float("nan"), "m", "none"),  # the generic path's case
]


@pytest.mark.parametrize("values", _ACCESS_VALUES)
def test_the_access_line_writes_what_structlog_would(stream: io.StringIO, values: tuple) -> None:
    log_access(*values)  # compiled in the compiled build: each build is tested
    keys = ("request_id", "app", "method", "path", "status", "duration_ms", "machine", "wake")
    logs.get_logger("autoscaler.proxy").info("request", **dict(zip(keys, values, strict=True)))
    fast, slow = (_STAMP.sub("T", text) for text in stream.getvalue().splitlines())
    assert fast == slow
    assert "tok-abcdef123456" not in fast


def test_the_access_line_goes_through_structlog_when_its_chain_is_not_in_force(
    stream: io.StringIO,
) -> None:
    with capture_logs() as captured:
        log_access("id", "web", "GET", "/", 200, 1.5, None, "none")
    (event,) = captured
    assert event["event"] == "request"
    assert event["duration_ms"] == 1.5
    seen: list[object] = []

    def spy(logger: object, name: str, event: dict[str, object]) -> dict[str, object]:
        seen.append(event["event"])
        return event

    chain = logs.structlog.get_config()["processors"]
    chain.insert(0, spy)  # edited in place, as capture_logs() does
    try:
        log_access("id", "web", "GET", "/", 200, 1.5, None, "none")
    finally:
        chain.remove(spy)
    assert seen == ["request"]
    assert len(lines(stream)) == 1  # the chain wrote it, once
    logs.configure(level="warning", fmt="json", stream=stream)
    log_access("id", "web", "GET", "/", 200, 1.5, None, "none")
    assert len(lines(stream)) == 1  # below the level: nothing


def test_process_keys_end_every_line_the_fast_ones_too(stream: io.StringIO) -> None:
    """A worker of `run --workers` binds its index: ours, the standard library's and the
    per-request lines (rendered without the chain) end with it, as the chain writes it."""
    keys = ("request_id", "app", "method", "path", "status", "duration_ms", "machine", "wake")
    values = ("id", "web", "GET", "/", 502, 1.5, None, "none")
    line = logs.EventLine("autoscaler.test", "request", ("app", "status"))
    with logs.process_keys(worker=1):
        log_access(*values)
        logs.get_logger("autoscaler.proxy").info("request", **dict(zip(keys, values, strict=True)))
        line("web", 200)
        logs.get_logger("autoscaler.test").info("request", app="web", status=200)
        logging.getLogger("aiohttp.server").warning("stdlib")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logs.get_logger("t").exception("crash")
    logs.get_logger("t").info("after")
    written = stream.getvalue().splitlines()
    for fast, slow in (written[0:2], written[2:4]):
        assert _STAMP.sub("T", fast) == _STAMP.sub("T", slow)
    entries = lines(stream)
    assert [list(entry)[-1] for entry in entries[:-1]] == ["worker"] * 6
    assert [entry["worker"] for entry in entries[:-1]] == [1] * 6
    assert "worker" not in entries[-1]  # left: the lines are as before
    with pytest.raises(ValueError, match="needs keys"):
        logs.EventLine("autoscaler.test", "request", ("app", "worker"))


def test_a_registered_secret_is_redacted_whatever_its_length() -> None:
    # Secrets under 4 characters were skipped (so as not to redact ordinary words), and so
    # left in lines and /status. A Redactor of its own: the process-wide one would take
    # "Q7" out of every later test's lines.
    redactor = logs.Redactor(["Q7", 'x"y'])
    assert redactor.scrub_text("token Q7 sent") == f"token {logs.REDACTED} sent"
    assert redactor.scrub({"error": ["rejected Q7"]}) == {"error": [f"rejected {logs.REDACTED}"]}
    line = json.dumps({"event": 'bad x"y'})  # the secret as a JSON line carries it
    assert redactor.redact_rendered(None, "info", line) == '{"event": "bad [REDACTED]"}'


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_is_redacted_inside_a_repr_of_an_httpx_error(fmt: str) -> None:
    """A token (here the admin's, which may hold any printable character) in an httpx
    exception's message, logged as the message, as the exception object and with its
    traceback. A console line writes values as Python reprs, and a JSON line an object's
    repr: a backslash in the token came out doubled there, and the token whole."""
    secret = 'adm1n\\"t0ken-with-a-backslash'
    out = io.StringIO()
    logs.configure(level="debug", fmt=fmt, secrets=[secret], stream=out)
    log = logs.get_logger("t")
    try:
        raise httpx.ConnectError(f"refused: Authorization: Bearer {secret}")
    except httpx.ConnectError as exc:
        log.warning("api_failed", error=str(exc))
        log.warning("api_failed", error=exc)
        log.warning("api_failed", errors=[exc])
        log.exception("api_crashed")
        logging.getLogger("httpx").error("stdlib: %r", exc)
    text = out.getvalue()
    assert "t0ken-with-a-backslash" not in text
    assert text.count(logs.REDACTED) >= 5


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_a_request_an_aiohttp_server_cannot_parse_is_no_error_line(level: str) -> None:
    """The admin server (and the emulator) answer it 400, and aiohttp logged it at error
    level with a traceback: a port scanner, or a client's oversized header, filled the log
    with errors that alert on nothing of ours. One debug line now, without traceback."""
    from aiohttp import web

    out = io.StringIO()
    logs.configure(level=level, fmt="json", stream=out)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for head in (b"GET * HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"Host: a\r\n\r\n")
            assert (await reader.read())[:12] == b"HTTP/1.0 400"
            writer.close()
            await writer.wait_closed()
        # An error of the server's own still is one, with its traceback.
        logging.getLogger("aiohttp.server").error("boom", exc_info=ValueError("ours"))
    finally:
        await runner.cleanup()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "Traceback" not in out.getvalue().replace('"exception": "Traceback', "")
    parse_errors = [e for e in entries if e["event"].startswith("Error handling request")]
    assert [e["level"] for e in parse_errors] == (["debug", "debug"] if level == "debug" else [])
    assert all("400" in e["event"] and "exception" not in e for e in parse_errors)
    (boom,) = [e for e in entries if e["event"] == "boom"]
    assert boom["level"] == "error"
    assert "ValueError: ours" in boom["exception"]

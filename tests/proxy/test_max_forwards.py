"""Max-Forwards on OPTIONS and TRACE (RFC 9110 7.6.2): at 0 the proxy answers itself and
forwards nothing (OPTIONS: 200 with no Allow; TRACE: 405, never reflected), otherwise the
machine gets the count less one. Other methods' Max-Forwards goes on untouched."""

from __future__ import annotations

from typing import Any

from .conftest import Backend, StartProxy
from .helpers import connect, proxy_for, read_response, seen_app


def max_forwards(record: dict[str, Any]) -> list[str]:
    return [value for key, value in record["headers"] if key == "max-forwards"]


async def test_options_and_trace_with_max_forwards_0_are_answered_by_the_proxy(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        writer.write(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 200
        assert body == b""
        assert "allow" not in headers
        assert headers["x-request-id"]
        writer.write(
            b"TRACE /x HTTP/1.1\r\nHost: a.test\r\nmax-forwards:  0 \r\nCookie: id=s3cr3t\r\n\r\n"
        )
        status, headers, body = await read_response(reader)
        assert status == 405
        assert headers["allow"] == ["OPTIONS"]
        assert b"s3cr3t" not in body  # not reflected
        # The connection stays usable, and the machine saw neither request.
        writer.write(b"GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
    assert [record["path"] for record in seen] == ["/after"]


async def test_a_higher_count_goes_on_one_less_and_other_methods_untouched(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    sent = [
        b"OPTIONS /o HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 3\r\n\r\n",
        b"TRACE /t HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 1\r\n\r\n",
        b"GET /g HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\n\r\n",
        b"OPTIONS /bad HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: x\r\n\r\n",
    ]
    async with connect(port) as (reader, writer):
        for request in sent:
            writer.write(request)
            status, _, _ = await read_response(reader)
            assert status == 200
    assert [(record["path"], max_forwards(record)) for record in seen] == [
        ("/o", ["2"]),
        ("/t", ["0"]),
        ("/g", ["0"]),
        ("/bad", ["x"]),  # not a count: as it came
    ]

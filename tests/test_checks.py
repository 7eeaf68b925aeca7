"""One run of a Fly machine check (autoscaler/checks.py), against a server on loopback.

The emulator's checks and the controller's runs of them (control/recheck.py) are covered
end to end elsewhere; here, what those cannot reach: an IPv6 address, as Fly's private
ones are.
"""

from __future__ import annotations

import socket

import pytest
from testkit import canned_http

from autoscaler.checks import check_spec, run_check


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_http_check_of_an_ipv6_address_sends_a_bracketed_host() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with canned_http("::1", ok) as (port, heads):
        spec = check_spec("web", {"type": "http", "path": "/healthz"}, port)
        status, output = await run_check(spec, "::1")
    assert status == "passing", output
    assert f"Host: [::1]:{port}\r\n".encode() in heads[0]
    assert f"http://[::1]:{port}/healthz" in output

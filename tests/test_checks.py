"""One run of a Fly machine check (autoscaler/checks.py), against a server on loopback.

The emulator's checks and the controller's runs of them (control/recheck.py) are covered
end to end elsewhere; here, what those cannot reach: an IPv6 address, as Fly's private
ones are, and https checks (the demo app speaks plain HTTP).
"""

from __future__ import annotations

import ssl

import pytest
import trustme
from testkit import NEEDS_IPV6_LOOPBACK, canned_http

from autoscaler.checks import check_spec, run_check


@NEEDS_IPV6_LOOPBACK
async def test_an_http_check_of_an_ipv6_address_sends_a_bracketed_host() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with canned_http("::1", ok) as (port, heads):
        spec = check_spec("web", {"type": "http", "path": "/healthz"}, port)
        status, output = await run_check(spec, "::1")
    assert status == "passing", output
    assert f"Host: [::1]:{port}\r\n".encode() in heads[0]
    assert f"http://[::1]:{port}/healthz" in output


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
HTTPS = {"type": "http", "path": "/healthz", "protocol": "https"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def serving_as(ca: trustme.CA, name: str) -> ssl.SSLContext:
    """A server's TLS context with a certificate for ``name`` that ``ca`` signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_an_https_check_verifies_the_certificate_unless_told_not_to(ca: trustme.CA) -> None:
    async with canned_http("127.0.0.1", OK, serving_as(ca, "app.internal")) as (port, heads):

        async def run(**fields: object) -> tuple[str, str]:
            spec = check_spec("web", {**HTTPS, **fields}, port)
            return await run_check(spec, "127.0.0.1", trust=trusting(ca))

        status, output = await run(tls_server_name="app.internal")
        assert status == "passing", output
        assert f"GET https://127.0.0.1:{port}/healthz: 200 OK" in output
        # The certificate names app.internal, not the address the check connects to.
        status, output = await run()
        assert status == "critical"
        assert "certificate" in output.lower(), output
        # Signed by a CA that the system does not trust.
        spec = check_spec("web", {**HTTPS, "tls_server_name": "app.internal"}, port)
        status, output = await run_check(spec, "127.0.0.1")
        assert status == "critical"
        assert "certificate" in output.lower(), output
        # tls_skip_verify: any certificate will do.
        skip = check_spec("web", {**HTTPS, "tls_skip_verify": True}, port)
        status, output = await run_check(skip, "127.0.0.1")
        assert status == "passing", output
    assert all(head.startswith(b"GET /healthz HTTP/1.1\r\n") for head in heads)
    assert len(heads) == 2  # the two that passed; the others ended in the handshake


async def test_an_https_check_of_an_app_that_speaks_plain_http_is_critical() -> None:
    async with canned_http("127.0.0.1", OK) as (port, _):
        # This server waits for a request head that a TLS hello never ends: the check
        # times out (a real server answers 400, and the handshake fails at once).
        spec = check_spec("web", {**HTTPS, "tls_skip_verify": True, "timeout": "300ms"}, port)
        status, output = await run_check(spec, "127.0.0.1")
    assert status == "critical", output

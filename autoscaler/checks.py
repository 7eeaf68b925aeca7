"""Fly machine health checks: what a check is (from a machine's config) and one run of it.

The emulator runs them on its machines as Fly does (emulator/checks.py); the controller
runs a started machine's critical checks itself while Fly's verdict may predate its app's
start-up (control/recheck.py). An HTTP check sends one request (``GET`` unless configured)
with ``Connection: close`` and passes on a 2xx or 3xx status, over TLS when its protocol is
``https`` (the certificate verified against the system's CAs and ``tls_server_name``, or
the address, unless ``tls_skip_verify``); a TCP check passes when the port accepts a
connection. A refused connection, a failed handshake, a timeout (a hung or frozen process
still accepts TCP but never answers) or another status is critical.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from autoscaler.config import authority, parse_duration

# Fly's examples for a machine check (spec fly.MachineCheck): interval 15s, timeout 2s,
# grace period 1s.
DEFAULT_INTERVAL_S = 15.0
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_GRACE_S = 1.0
_READ_LIMIT = 64 * 1024


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: str  # http or tcp
    port: int
    path: str
    method: str
    protocol: str
    headers: tuple[tuple[str, str], ...]
    interval_s: float
    timeout_s: float
    grace_s: float
    tls_skip_verify: bool = False
    tls_server_name: str | None = None

    @property
    def runnable(self) -> bool:
        """A check this module can run (TCP, or HTTP over plain TCP or TLS)."""
        return self.kind == "tcp" or (self.kind == "http" and self.protocol in ("http", "https"))


def _seconds(value: object, default: float) -> float:
    if value is None:
        return default
    try:
        parsed = parse_duration(value)
    except ValueError:  # validated on create; a hand-edited state file may still hold one
        return default
    return float(parsed) if isinstance(parsed, int | float) else default


def _headers(raw: object) -> tuple[tuple[str, str], ...]:
    """fly.MachineHTTPHeader items: ``{"name": ..., "values": [...]}``."""
    out: list[tuple[str, str]] = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            for value in item.get("values") or []:
                out.append((item["name"], str(value)))
    return tuple(out)


def check_spec(name: str, check: Mapping[str, object], default_port: int) -> CheckSpec:
    """One check of a machine config (``config.checks[name]``, as JSON)."""
    port = check.get("port")
    return CheckSpec(
        name=name,
        kind=str(check.get("type") or "tcp"),
        port=port if isinstance(port, int) and port > 0 else default_port,
        path=str(check.get("path") or "/"),
        method=str(check.get("method") or "GET").upper(),
        protocol=str(check.get("protocol") or "http"),
        headers=_headers(check.get("headers")),
        interval_s=_seconds(check.get("interval"), DEFAULT_INTERVAL_S),
        timeout_s=_seconds(check.get("timeout"), DEFAULT_TIMEOUT_S),
        grace_s=_seconds(check.get("grace_period"), DEFAULT_GRACE_S),
        tls_skip_verify=check.get("tls_skip_verify") is True,
        tls_server_name=str(check["tls_server_name"]) if check.get("tls_server_name") else None,
    )


@functools.cache
def _system_trust() -> ssl.SSLContext:
    """The system's CAs, loaded once (a context reads the whole CA bundle)."""
    return ssl.create_default_context()


@functools.cache
def _no_verification() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tls(spec: CheckSpec, trust: ssl.SSLContext | None) -> ssl.SSLContext:
    """The TLS context of an https check: ``trust`` (the system's CAs if None), or one that
    verifies nothing with ``tls_skip_verify``."""
    if spec.tls_skip_verify:
        return _no_verification()
    return trust or _system_trust()


async def _http(
    spec: CheckSpec, host: str, agent: str, trust: ssl.SSLContext | None
) -> tuple[str, str]:
    where = authority(host, spec.port)  # Fly's private addresses are IPv6: bracketed
    url = f"{spec.protocol}://{where}{spec.path}"
    if spec.protocol == "https":
        reader, writer = await asyncio.open_connection(
            host, spec.port, ssl=_tls(spec, trust), server_hostname=spec.tls_server_name or host
        )
    elif spec.protocol == "http":
        reader, writer = await asyncio.open_connection(host, spec.port)
    else:
        return "warning", f"{spec.protocol} checks are not run here ({url})"
    try:
        lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {where}"]
        lines += [f"{k}: {v}" for k, v in spec.headers]
        lines += [f"User-Agent: {agent}", "Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").strip()
        body = b""
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            body = await reader.read(_READ_LIMIT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return "critical", f"{spec.method} {url}: invalid response {status_line!r}"
    code = int(parts[1])
    text = " ".join(parts[1:])
    output = f"{spec.method} {url}: {text} Output: {body.decode('utf-8', 'replace')[:200]!r}"
    return ("passing" if 200 <= code < 400 else "critical"), output


async def _tcp(spec: CheckSpec, host: str) -> tuple[str, str]:
    _, writer = await asyncio.open_connection(host, spec.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "passing", f"TCP connect {authority(host, spec.port)}: Success"


async def run_check(
    spec: CheckSpec,
    host: str,
    agent: str = "autoscaler health check",
    trust: ssl.SSLContext | None = None,
) -> tuple[str, str]:
    """(status, output) of one run of a check against ``host``; ``trust``: the TLS context
    that verifies an https check's certificate (default: the system's CAs)."""
    address = authority(host, spec.port)  # Fly's private addresses are IPv6: bracketed
    try:
        async with asyncio.timeout(spec.timeout_s):  # wait_for can drop a cancel on 3.11
            if spec.kind == "http":
                return await _http(spec, host, agent, trust)
            return await _tcp(spec, host)
    except TimeoutError:
        where = f"{address}{spec.path if spec.kind == 'http' else ''}"
        return "critical", f"{spec.kind} check of {where} timed out after {spec.timeout_s:g}s"
    except OSError as exc:
        return "critical", f"{spec.kind} check of {address}: {exc.strerror or exc}"
    except Exception as exc:  # a garbled answer (too long, cut short): the check fails
        return "critical", f"{spec.kind} check of {address}: {exc!r}"

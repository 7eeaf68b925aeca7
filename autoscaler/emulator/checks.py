"""Machine health checks: ``config.checks`` run against the machine's process while it is
started, reported in the machine JSON as the real API does (``checks``: name, status
passing/warning/critical, output, updated_at).

One task per started machine runs all its checks (each on its own interval, after the
grace period); it is cancelled when the machine leaves ``started`` (stop, suspend, destroy,
a crash) and when the emulator closes. Checks talk to the process directly, as Fly's do:
an HTTP check sends one ``GET`` (or the configured method) with ``Connection: close`` and
passes on a 2xx or 3xx status; a TCP check passes when the port accepts a connection. A
refused connection, a timeout (a hung or frozen process still accepts TCP but never
answers) or another status is critical.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoscaler.config import parse_duration
from autoscaler.emulator.model import CheckResult, Machine, internal_port_of, now_rfc3339

# Fly's examples for a machine check (spec fly.MachineCheck): interval 15s, timeout 2s,
# grace period 1s; the emulator uses them as defaults.
DEFAULT_INTERVAL_S = 15.0
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_GRACE_S = 1.0
# The check the built-in demo image gets when its config has none (Fly's example grace of
# 1 s covers the `fly` profile's listen_s, the app's start-up after `started`).
DEMO_CHECK_NAME = "healthz"
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


def specs_of(config: dict[str, Any], demo: bool) -> list[CheckSpec]:
    """The checks of a (validated) machine config; the demo app's /healthz check when the
    machine runs the built-in image and its config has none."""
    port = internal_port_of(config)
    checks: dict[str, Any] = config.get("checks") or {}
    if not checks and demo:
        checks = {DEMO_CHECK_NAME: {"type": "http", "path": "/healthz"}}
    specs = []
    for name, check in sorted(checks.items()):
        specs.append(
            CheckSpec(
                name=name,
                kind=str(check.get("type") or "tcp"),
                port=int(check.get("port") or port),
                path=str(check.get("path") or "/"),
                method=str(check.get("method") or "GET").upper(),
                protocol=str(check.get("protocol") or "http"),
                headers=_headers(check.get("headers")),
                interval_s=_seconds(check.get("interval"), DEFAULT_INTERVAL_S),
                timeout_s=_seconds(check.get("timeout"), DEFAULT_TIMEOUT_S),
                grace_s=_seconds(check.get("grace_period"), DEFAULT_GRACE_S),
            )
        )
    return specs


async def _http(spec: CheckSpec, host: str) -> tuple[str, str]:
    url = f"http://{host}:{spec.port}{spec.path}"
    if spec.protocol != "http":
        return "warning", f"{spec.protocol} checks are not run by the emulator ({url})"
    reader, writer = await asyncio.open_connection(host, spec.port)
    try:
        lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {host}:{spec.port}"]
        lines += [f"{k}: {v}" for k, v in spec.headers]
        lines += ["User-Agent: autoscaler-emulator health check", "Connection: close", "", ""]
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
    return "passing", f"TCP connect {host}:{spec.port}: Success"


async def run_check(spec: CheckSpec, host: str) -> tuple[str, str]:
    """(status, output) of one run of a check against ``host``."""
    probe = _http if spec.kind == "http" else _tcp
    try:
        async with asyncio.timeout(spec.timeout_s):  # wait_for can drop a cancel on 3.11
            return await probe(spec, host)
    except TimeoutError:
        where = f"{host}:{spec.port}{spec.path if spec.kind == 'http' else ''}"
        return "critical", f"{spec.kind} check of {where} timed out after {spec.timeout_s:g}s"
    except OSError as exc:
        return "critical", f"{spec.kind} check of {host}:{spec.port}: {exc.strerror or exc}"
    except Exception as exc:  # a garbled answer (too long, cut short): the check fails
        return "critical", f"{spec.kind} check of {host}:{spec.port}: {exc!r}"


class HealthChecks:
    """The check tasks of every started machine, and their results on the machines."""

    def __init__(self, is_demo: Callable[[Machine], bool], on_change: Callable[[], None]):
        self._is_demo = is_demo
        self._on_change = on_change
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def running(self) -> list[str]:
        """Ids of the machines whose checks run now."""
        return [mid for mid, task in self._tasks.items() if not task.done()]

    def sync(self, m: Machine) -> None:
        """Follow the machine's state: checks run while it is started, and only then."""
        task = self._tasks.get(m.id)
        if m.state == "started" and not self._closed:
            if task is None or task.done():
                specs = specs_of(m.config, self._is_demo(m))
                self._reset(m, specs, "waiting for the first check")
                if specs:
                    self._tasks[m.id] = asyncio.ensure_future(self._run(m, specs))
            return
        if task is not None:
            task.cancel()
            del self._tasks[m.id]
        if m.checks:
            self._reset(m, specs_of(m.config, self._is_demo(m)), f"the machine is {m.state}")

    def _reset(self, m: Machine, specs: list[CheckSpec], why: str) -> None:
        """Before a first result, a check shows ``warning`` (neither passing nor failing)."""
        stamp = now_rfc3339()
        m.checks = {s.name: CheckResult(s.name, "warning", why, stamp) for s in specs}

    async def _run(self, m: Machine, specs: list[CheckSpec]) -> None:
        await asyncio.gather(*(self._loop(m, spec) for spec in specs))

    async def _loop(self, m: Machine, spec: CheckSpec) -> None:
        await asyncio.sleep(spec.grace_s)
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            status, output = await run_check(spec, m.private_ip)
            previous = m.checks.get(spec.name)
            m.checks[spec.name] = CheckResult(spec.name, status, output, now_rfc3339())
            if previous is None or previous.status != status:
                m.touch()  # a waiter on the machine sees the change
                self._on_change()
            await asyncio.sleep(max(0.0, spec.interval_s - (loop.time() - began)))

    async def close(self) -> None:
        """Cancel every check task and wait for them: nothing outlives the emulator."""
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

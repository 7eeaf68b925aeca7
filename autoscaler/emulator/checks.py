"""Machine health checks: ``config.checks`` run against the machine's process while it is
started, reported in the machine JSON as the real API does (``checks``: name, status
passing/warning/critical, output, updated_at).

One task per started machine runs all its checks (each on its own interval, after the
grace period); it is cancelled when the machine leaves ``started`` (stop, suspend, destroy,
a crash) and when the emulator closes. Checks talk to the process directly, as Fly's do
(one run of a check: autoscaler/checks.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from autoscaler.checks import CheckSpec, check_spec, run_check
from autoscaler.emulator.model import CheckResult, Machine, internal_port_of, now_rfc3339

# The check the emulator writes into the service of the demo machines it seeds, as
# fly.toml's [[http_service.checks]] would (Fly's example grace of 1 s covers the `fly`
# profile's listen_s, the app's start-up after `started`). A machine created through the
# API has the checks its config gives it, none if none, as on Fly.
DEMO_CHECK: dict[str, Any] = {"type": "http", "path": "/healthz"}
_AGENT = "autoscaler-emulator health check"


def specs_of(config: dict[str, Any]) -> list[CheckSpec]:
    """The checks of a (validated) machine config: its machine checks by name, then its
    services' checks under the names Fly gives them (``servicecheck-00-http-8080``: their
    index among the machine's service checks, type and port)."""
    port = internal_port_of(config)
    checks: dict[str, Any] = config.get("checks") or {}
    specs = [check_spec(name, check, port) for name, check in sorted(checks.items())]
    of_services = [
        check_spec("", check, service.get("internal_port") or port)
        for service in config.get("services") or []
        for check in service.get("checks") or []
    ]
    for i, spec in enumerate(of_services):
        specs.append(replace(spec, name=f"servicecheck-{i:02d}-{spec.kind}-{spec.port}"))
    return specs


class HealthChecks:
    """The check tasks of every started machine, and their results on the machines."""

    def __init__(self, on_change: Callable[[], None], wall: Callable[[], float] = time.time):
        self._on_change = on_change
        self._wall = wall  # the emulator's time of day (Fly's clock), of the results' times
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
                specs = specs_of(m.config)
                self._reset(m, specs, "waiting for the first check")
                if specs:
                    self._tasks[m.id] = asyncio.ensure_future(self._run(m, specs))
            return
        if task is not None:
            task.cancel()
            del self._tasks[m.id]
        if m.checks:
            self._reset(m, specs_of(m.config), f"the machine is {m.state}")

    def _reset(self, m: Machine, specs: list[CheckSpec], why: str) -> None:
        """Before a first result, a check shows ``warning`` (neither passing nor failing)."""
        stamp = now_rfc3339(self._wall())
        m.checks = {s.name: CheckResult(s.name, "warning", why, stamp) for s in specs}

    async def _run(self, m: Machine, specs: list[CheckSpec]) -> None:
        await asyncio.gather(*(self._loop(m, spec) for spec in specs))

    async def _loop(self, m: Machine, spec: CheckSpec) -> None:
        await asyncio.sleep(spec.grace_s)
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            status, output = await run_check(spec, m.private_ip, _AGENT)
            previous = m.checks.get(spec.name)
            m.checks[spec.name] = CheckResult(spec.name, status, output, now_rfc3339(self._wall()))
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

"""Shared pieces of the reliability suite: a live service, a load generator, counters.

``live_service`` runs the real composition root (``Service``) against an emulator on
loopback, with ``fly.api_url`` pointing at it, so faults set on that emulator hit the real
client, controller and proxy. ``Load`` is a set of HTTP clients whose number can change
while they run; it classifies every outcome (status code, or the exception's type).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from autoscaler.config import load_settings
from autoscaler.emulator import Emulator
from autoscaler.emulator.procs import SESSION_ENV
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import CORDON_METADATA_KEY
from autoscaler.service import Service

FLY_TOKEN = "fly-token-r3l14b1l1ty-n0t-f0r-upstr34m"
ADMIN_TOKEN = "admin-token-r3l14b1l1ty-k33p-0ut"
HOST = "web.test"
APP = "web"


# --- figures ---------------------------------------------------------------------------


@dataclass
class Figures:
    """What each test did (requests, outcomes, faults), for docs/reliability.md."""

    soak: bool
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, name: str, **values: Any) -> None:
        self.sections.setdefault(name, {}).update(values)

    def document(self) -> dict[str, Any]:
        return {"soak": self.soak, "tests": self.sections}


# --- logs ------------------------------------------------------------------------------


@dataclass
class LogCapture:
    out: io.StringIO
    raw: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=lambda: {FLY_TOKEN, ADMIN_TOKEN})

    def text(self) -> str:
        return self.out.getvalue()

    def events(self, name: str) -> list[str]:
        return [line for line in self.text().splitlines() if f'"event": "{name}"' in line]

    def assert_no_crash(self) -> None:
        """No line that only a bug writes: an unretrieved task error, a crashed loop, an
        unclosed session, aiohttp's "Error handling request" (a handler that raised)."""
        signs = (
            "Task exception was never retrieved",
            "Task was destroyed but it is pending",
            "tick_crashed",
            "Error handling request",
            "Unclosed client session",
            "Unclosed connector",
            "internal proxy error",
        )
        found = [line for line in self.text().splitlines() if any(s in line for s in signs)]
        assert not found, f"signs of a crash in the log: {found[:3]}"

    def assert_no_secret(self) -> None:
        rendered = self.text()
        for secret in self.secrets:
            assert secret not in rendered, "a secret reached the rendered log"
            leaks = [line for line in self.raw if secret in line]
            assert not leaks, f"a secret was handed to a logger: {leaks[:2]}"


# --- processes and counts ----------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for a child ``autoscaler`` process: none of this shell's
    ``AUTOSCALER_*`` or ``FLY_*`` settings, but the test session's mark, so that the
    session-end check also finds machines of an emulator the child runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOSCALER_", "FLY_"))}
    if SESSION_ENV in os.environ:
        env[SESSION_ENV] = os.environ[SESSION_ENV]
    return env


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_tasks() -> int:
    return len([t for t in asyncio.all_tasks() if not t.done()])


async def settle(measure: Callable[[], int], baseline: int, timeout_s: float = 10.0) -> int:
    """Wait for ``measure()`` to come back to ``baseline`` (sockets close asynchronously);
    returns the last value, so the caller's assert shows what was left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    value = measure()
    while value > baseline and loop.time() < deadline:
        await asyncio.sleep(0.05)  # nothing to await: the kernel closes fds on its own time
        value = measure()
    return value


def our_cordons(emulator: Emulator, app: str) -> list[str]:
    """Machines that carry our cordon (the API flag or our metadata key)."""
    out = []
    for m in emulator.machines(app):
        meta = m.config.get("metadata") or {}
        if m.cordoned or CORDON_METADATA_KEY in meta:
            out.append(m.id)
    return out


def started(emulator: Emulator, app: str) -> list[str]:
    return [m.id for m in emulator.machines(app) if m.state == "started"]


# --- the service -------------------------------------------------------------------------


def service_config(emulator: Emulator, **app: Any) -> dict[str, Any]:
    """A config for ``Service`` against ``emulator``; ``app`` overrides the app's knobs."""
    return {
        "fly": {"api_url": emulator.url, "token": emulator.token, "rate_limit": False},
        "proxy": {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 5},
        "admin": {"listen": "127.0.0.1:9091", "token": ADMIN_TOKEN},
        "control": {"tick_s": 0.2, "api_backoff_max_s": 1},
        "apps": [
            {
                "name": APP,
                "hosts": [HOST],
                "max_machines": 4,
                "target_concurrency": 4,
                "stable_window_s": 3,
                "panic_window_s": 1,
                "scale_down_delay_s": 1,
                "idle_to_zero_s": 3,
                "min_lifetime_s": 0.5,
                "drain_timeout_s": 3,
                "wake_timeout_s": 20,
                **app,
            }
        ],
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@asynccontextmanager
async def live_service(
    config_file: Path,
    *,
    without_api: bool = False,
    worker: int = 0,
    speaker: Path | None = None,
) -> AsyncIterator[Service]:
    """``Service`` from ``config_file`` on ephemeral loopback ports; stopped after.
    ``without_api``: static apps only, no Machines API (as ``autoscaler run`` starts a
    config without ``fly.api_url``); ``worker``: its index under ``run --workers``, and
    ``speaker`` the supervisor's file naming the worker that speaks for the config."""
    settings, _ = load_settings(config_file, env={})
    svc = Service(
        settings,
        config_file,
        metrics=Metrics(CollectorRegistry()),
        proxy_port=0,
        admin_port=0,
        without_api=without_api,
        worker=worker,
        speaker=speaker,
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def metric(svc: Service, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


# --- load --------------------------------------------------------------------------------


@dataclass
class Load:
    """HTTP clients against ``url``; ``resize(n)`` changes how many run; outcomes counted."""

    url: str
    host: str = HOST
    path: str = "/work?ms=50"
    outcomes: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    _clients: list[tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    async def __aenter__(self) -> Load:
        # Each request on a fresh connection would measure the kernel; keep-alive is what
        # real clients do. No total timeout: "every request gets a response" is the claim.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.resize(0)
        if self._session is not None:
            await self._session.close()

    async def once(self, path: str | None = None, method: str = "GET") -> str:
        assert self._session is not None
        try:
            async with self._session.request(
                method, self.url + (path or self.path), headers={"Host": self.host}
            ) as resp:
                body = await resp.read()
                outcome = str(resp.status)
                if resp.status != 200 and len(self.details) < 50:
                    self.details.append(f"{resp.status}: {body[:160]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = type(exc).__name__
            if len(self.details) < 50:
                self.details.append(repr(exc))
        self.outcomes[outcome] += 1
        return outcome

    async def _client(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not (await self.once()).isdigit():
                # No HTTP answer (nothing listens during a restart): back off a little, as a
                # real client would, instead of counting refusals in a tight loop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

    async def resize(self, n: int) -> None:
        """Run ``n`` clients; the ones let go finish their request first."""
        while len(self._clients) < n:
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._client(stop))
            self._clients.append((task, stop))
        leaving = self._clients[n:]
        del self._clients[n:]
        for _, stop in leaving:
            stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(task for task, _ in leaving))

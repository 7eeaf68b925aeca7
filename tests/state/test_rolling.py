"""Issue 22, item 7a: a rolling restart of `autoscaler run --workers 2` under steady load.

Real processes: the supervisor and its two workers against the emulator (in this test's
process) and a real redis-server. Looping keep-alive clients send requests all along;
SIGUSR2 to the supervisor replaces the workers one at a time (docs/deploy.md). Claims:

- every request gets its 200, before, during and after the restart (the clients retry an
  idempotent request once when a kept-alive connection turns out closed before any answer,
  as HTTP clients and Fly's proxy do; nothing else is retried);
- both workers are new processes afterwards, the old ones exited and were reaped, and the
  new ones serve requests;
- the supervisor stops cleanly afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from reliability.harness import Load, child_env, write_config
from testkit import free_port

from autoscaler.config import EmulatorApp
from autoscaler.emulator import Emulator

from .test_workers import get_json, pair_of_free_ports

pytestmark = pytest.mark.timeout(180)


class Supervisor:
    """`autoscaler run --workers N`; its output (the workers' too) read line by line."""

    def __init__(self, config: Path, workers: int) -> None:
        self.args = [
            sys.executable, "-m", "autoscaler", "run", "--config", str(config),
            "--workers", str(workers), "--log-format", "json",
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            env=child_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode("utf-8", "replace")
            self.lines.append(text)
            try:
                doc = json.loads(text)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self.events.append(doc)
                self.changed.set()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_for(self, event: str, timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while not self.named(event):
                assert self.proc is not None
                assert self.proc.returncode is None, self.tail()
                self.changed.clear()
                await self.changed.wait()
        return self.named(event)[0]

    def tail(self) -> str:
        return "".join(self.lines[-60:])

    async def stop(self) -> int:
        """SIGTERM, wait (SIGKILL after 60 s); always reaped, the output read to its end."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return self.proc.returncode


async def _requests_served(http: aiohttp.ClientSession, admin: str) -> float:
    async with http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("autoscaler_requests_total{")
    )


def _config(emulator: Emulator, redis_url: str, key_prefix: str) -> tuple[int, int, dict[str, Any]]:
    """Ports of the proxy and of worker 0's admin server, and a config using them."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=2))
    proxy, admin = free_port(), pair_of_free_ports()
    while proxy in (admin, admin + 1):
        admin = pair_of_free_ports()
    return (
        proxy,
        admin,
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": f"127.0.0.1:{proxy}", "shutdown_timeout_s": 5},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "control": {"tick_s": 0.2},
            "cluster": {"redis_url": redis_url, "lease_ttl_s": 1, "key_prefix": key_prefix},
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 300}],
        },
    )


async def _fresh_requests(http: aiohttp.ClientSession, url: str, n: int = 20) -> None:
    """``n`` requests, each on a new connection (spread by the kernel over the workers)."""
    for _ in range(n):
        async with http.get(f"{url}/", headers={"Host": "web.test", "Connection": "close"}) as resp:
            assert resp.status == 200


async def test_rolling_restart_of_two_workers_fails_no_request(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    proxy, admin, config = _config(emulator, redis_server, key_prefix)
    file = write_config(tmp_path / "c.yaml", config)
    supervisor = Supervisor(file, 2)
    url = f"http://127.0.0.1:{proxy}"
    admins = [f"http://127.0.0.1:{admin + i}" for i in (0, 1)]
    try:
        await supervisor.start()
        async with aiohttp.ClientSession() as http, Load(url, path="/work?ms=20") as load:
            for base in admins:  # both workers ready (a follower: once it has the view)
                await get_json(http, f"{base}/status", limit_s=60)
                await until_ready(http, f"{base}/readyz")
            await load.resize(6)
            async with asyncio.timeout(30):
                while load.sent < 30:  # noqa: ASYNC110 - the load runs in this loop
                    await asyncio.sleep(0.05)
            before = load.sent
            assert supervisor.proc is not None
            supervisor.proc.send_signal(signal.SIGUSR2)
            await supervisor.wait_for("rolling_restart_done", 120)
            during = load.sent - before
            after = load.sent
            async with asyncio.timeout(30):
                while load.sent < after + 30:  # noqa: ASYNC110 - the load runs in this loop
                    await asyncio.sleep(0.05)
            await load.resize(0)
            # Kept-alive clients stay with the worker they reached; new connections are
            # spread by the kernel over both new workers.
            await _fresh_requests(http, url)
            served = [await _requests_served(http, base) for base in admins]
        assert dict(load.outcomes) == {"200": load.sent}, (load.outcomes, load.details[:10])
        assert during > 0  # the load ran through the restart
        assert all(n > 0 for n in served), served
        started = [e["pid"] for e in supervisor.named("worker_started")]
        replaced = {e["worker"]: e["pid"] for e in supervisor.named("worker_replaced")}
        assert len(started) == 4, supervisor.tail()
        assert sorted(replaced) == [0, 1]
        assert set(replaced.values()) == set(started[2:])
        for pid in started[:2]:  # the old workers are gone and reaped: not even a zombie
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not supervisor.named("worker_exited"), supervisor.tail()
    finally:
        code = await supervisor.stop()
    assert code == 0, supervisor.tail()
    for pid in [e["pid"] for e in supervisor.named("worker_started")]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def until_ready(http: aiohttp.ClientSession, url: str, limit_s: float = 60) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # a separate process offers nothing to await


async def test_a_replacement_that_fails_at_start_leaves_the_others_serving(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    """A bad new config (or version): the first new worker exits at once; the roll stops
    there, the other worker keeps serving, and the next SIGUSR2 fills the empty slot."""
    proxy, admin, config = _config(emulator, redis_server, key_prefix)
    file = write_config(tmp_path / "c.yaml", config)
    supervisor = Supervisor(file, 2)
    url = f"http://127.0.0.1:{proxy}"
    try:
        await supervisor.start()
        assert supervisor.proc is not None
        async with aiohttp.ClientSession() as http:
            for i in (0, 1):
                await until_ready(http, f"http://127.0.0.1:{admin + i}/readyz")
            write_config(file, {**config, "control": {"tick_s": -1}})
            supervisor.proc.send_signal(signal.SIGUSR2)
            failed = await supervisor.wait_for("rolling_restart_failed", 60)
            assert failed["worker"] == 0
            assert failed["code"] == 2
            assert supervisor.proc.returncode is None
            await _fresh_requests(http, url)  # worker 1, never touched, serves them all
            assert len(supervisor.named("worker_started")) == 3

            write_config(file, config)
            supervisor.proc.send_signal(signal.SIGUSR2)
            done = await supervisor.wait_for("rolling_restart_done", 120)
            assert done["workers"] == [0, 1]  # the empty slot first
            await _fresh_requests(http, url)
    finally:
        code = await supervisor.stop()
    assert code == 0, supervisor.tail()
    for pid in [e["pid"] for e in supervisor.named("worker_started")]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

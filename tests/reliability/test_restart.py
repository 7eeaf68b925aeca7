"""Item 3: the autoscaler restarts under load (SIGTERM, then a new process).

Real processes: ``python -m autoscaler run --config ...`` against an emulator on loopback
(in this test's process; ``fly.api_url`` points at it), under continuous client load.
Claims:

- requests in flight when SIGTERM arrives all finish with their answer;
- the old process exits 0 after a graceful stop;
- the new process picks the fleet up from the API: the machines the old one started are
  started in its ``/status`` too, and its first request needs no wake;
- nothing is started twice: no machine gets a start from us while it is already started
  (checked on the emulator's event history of every machine);
- no cordon of ours is left behind once the new process has run a few ticks;
- neither process prints a token.

Every process is reaped whatever happens (killed if it outlives its deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from testkit import free_port, until

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator

from .harness import (
    ADMIN_TOKEN,
    APP,
    FLY_TOKEN,
    HOST,
    Figures,
    Load,
    child_env,
    our_cordons,
    service_config,
    started,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]
IN_FLIGHT = 6
# The requests sure to be in flight at SIGTERM go to their own app, so that the old
# process's in-flight gauge for it counts them and nothing else.
SLOW = "slow"
pytestmark = [pytest.mark.timeout(240), pytest.mark.one_profile]


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    apps = [EmulatorApp(name=APP, machines=4), EmulatorApp(name=SLOW, machines=2)]
    return emulator_settings.model_copy(update={"apps": apps})


class Autoscaler:
    """One ``autoscaler run`` process; its output is kept for the token scan."""

    def __init__(self, config: Path, proxy_port: int, admin_port: int, *, cwd: Path = REPO) -> None:
        self.cwd = cwd  # another tree's ``autoscaler`` package there is the one that runs
        self.args = [
            sys.executable, "-m", "autoscaler", "run", "--config", str(config),
            "--listen", f"127.0.0.1:{proxy_port}",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--log-format", "json",
        ]  # fmt: skip
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.output = b""
        self._reader: asyncio.Task[None] | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            cwd=self.cwd,
            env=child_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:  # a separate process offers nothing to await but its port
            assert self.proc.returncode is None, self.output.decode()[-3000:]
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.admin}/readyz") as resp:
                    if resp.status == 200:
                        return
            assert loop.time() < deadline, "autoscaler run never became ready"
            await asyncio.sleep(0.1)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output += chunk

    async def stop(self, timeout_s: float = 60, *, kill_on_timeout: bool = False) -> int:
        """SIGTERM, then wait; after ``timeout_s`` SIGKILL, and fail with the process's log
        unless ``kill_on_timeout`` (then the return code says it was killed). Always
        reaped."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.reap()
            if not kill_on_timeout:
                tail = self.output.decode("utf-8", "replace")[-4000:]
                raise AssertionError(
                    f"alive {timeout_s:g}s after SIGTERM; its log:\n{tail}"
                ) from None
        finally:
            await self.reap()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def reap(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    def events(self) -> list[str]:
        out = []
        for line in self.output.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(str(json.loads(line).get("event")))
        return out


@contextlib.asynccontextmanager
async def reaped(procs: list[Autoscaler]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            await proc.reap()


# Event statuses after which a start is legitimate again (a stop or suspend is recorded as
# it begins: "stopping", "suspending").
_DOWN = frozenset(
    {"stopping", "stopped", "suspending", "suspended", "failed", "destroying", "destroyed"}
)


def _double_starts(emulator: Emulator) -> list[str]:
    """Machines that got a user start while already started (or starting)."""
    bad = []
    for m in [*emulator.machines(APP), *emulator.machines(SLOW)]:
        running = False
        for e in m.events:
            if e.type == "start" and e.source == "user":
                if running:
                    bad.append(f"{m.id} ({m.app}): {[(x.type, x.status) for x in m.events]}")
                running = True
            elif e.status in _DOWN:
                running = False
    return bad


def _user_starts(emulator: Emulator) -> dict[str, int]:
    return {
        m.id: sum(1 for e in m.events if e.type == "start" and e.source == "user")
        for m in emulator.machines(APP)
    }


async def _inflight(http: aiohttp.ClientSession, admin: str, app: str) -> float:
    return await _metric(http, admin, "autoscaler_inflight_requests", app)


async def _metric(
    http: aiohttp.ClientSession, admin: str, name: str, app: str, labels: str = ""
) -> float:
    """A gauge of ``app`` as the process's /metrics says (``labels``: the ones after app)."""
    async with http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    rest = f",{labels}" if labels else ""
    for line in text.splitlines():
        if line.startswith(f'{name}{{app="{app}"{rest}}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_restart_under_load_loses_nothing(
    emulator: Emulator, tmp_path: Path, figures: Figures, soak: bool
) -> None:
    config: dict[str, Any] = service_config(
        emulator, max_machines=4, target_concurrency=2, idle_to_zero_s=300, min_lifetime_s=0
    )
    config["proxy"]["shutdown_timeout_s"] = 20
    config["apps"].append({**config["apps"][0], "name": SLOW, "hosts": [f"{SLOW}.test"]})
    file = write_config(tmp_path / "autoscaler.yaml", config)
    proxy_port, admin_port = free_port(), free_port()
    procs = [Autoscaler(file, proxy_port, admin_port) for _ in range(2)]
    url = f"http://127.0.0.1:{proxy_port}"
    rounds = 3 if soak else 1
    in_flight_outcomes: list[str] = []
    async with (
        reaped(procs),
        aiohttp.ClientSession() as http,
        Load(url, path="/work?ms=100") as load,
    ):
        await procs[0].start(http)
        await load.resize(8)
        await until(lambda: len(started(emulator, APP)) >= 2, 30, "the load to start machines")

        old, new = procs
        for _ in range(rounds):
            # Requests surely in flight at SIGTERM: long ones, counted by the old process.
            slow = Load(url, host=f"{SLOW}.test", path="/work?ms=2000")
            async with slow:
                pending = [asyncio.create_task(slow.once()) for _ in range(IN_FLIGHT)]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                while await _inflight(http, old.admin, SLOW) < IN_FLIGHT:
                    assert loop.time() < deadline, "the slow requests never got in flight"
                    await asyncio.sleep(0.05)
                code = await old.stop()
                in_flight_outcomes += await asyncio.gather(*pending)
            assert code == 0, old.output.decode()[-3000:]
            assert "stopped" in old.events()

            at_stop = set(started(emulator, APP))
            starts_at_stop = _user_starts(emulator)
            left_by_old = our_cordons(emulator, APP) + our_cordons(emulator, SLOW)
            await new.start(http)

            # The new process knows the fleet from the API: a request needs no wake.
            async with http.get(f"{url}/", headers={"Host": HOST}) as resp:
                assert resp.status == 200
                assert resp.headers.get("Fly-Autoscaler-Wake") == "none"
            bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with http.get(f"{new.admin}/status", headers=bearer) as resp:
                doc = await resp.json()
            seen = {m["id"]: m["state"] for a in doc["apps"] for m in a["machines"]}
            assert at_stop <= {mid for mid, state in seen.items() if state == "started"}, seen

            # A few seconds of load on the new process, then: no double start, no cordon.
            await asyncio.sleep(3)  # the ticks under load are the point
            for mid in at_stop:
                if mid in started(emulator, APP):
                    assert _user_starts(emulator)[mid] == starts_at_stop[mid], mid
            await until(
                lambda: not our_cordons(emulator, APP) and not our_cordons(emulator, SLOW),
                20,
                "our cordons to go",
            )
            old, new = new, Autoscaler(file, proxy_port, admin_port)
            procs.append(new)
        await load.resize(0)
        assert await old.stop() == 0
        await new.reap()

    assert in_flight_outcomes == ["200"] * (IN_FLIGHT * rounds), in_flight_outcomes
    assert _double_starts(emulator) == []
    for proc in procs:
        text = proc.output.decode("utf-8", "replace")
        assert FLY_TOKEN not in text
        assert ADMIN_TOKEN not in text
    # Around the restart, new requests meet a closing proxy (503, or a connection closed
    # or refused while no process listens): the clients retry; nothing else is allowed.
    gap = {"503", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}
    unexpected = {k: v for k, v in load.outcomes.items() if k != "200" and k not in gap}
    assert not unexpected, (unexpected, load.details[:10])
    figures.record(
        "restart",
        restarts=rounds,
        in_flight_at_sigterm=len(in_flight_outcomes),
        in_flight_outcomes=dict(
            (k, in_flight_outcomes.count(k)) for k in sorted(set(in_flight_outcomes))
        ),
        background_requests=load.sent,
        background_outcomes=dict(load.outcomes),
        cordons_left_by_old_process=len(left_by_old),
        double_starts=len(_double_starts(emulator)),
    )


async def test_drain_cut_short_by_sigterm_leaves_no_cordon(
    emulator: Emulator, tmp_path: Path, figures: Figures
) -> None:
    """SIGTERM while a drain waits for a long request: the next process lifts our cordon.

    Two machines each hold one long request while demand wants one: the policy drains one
    of them, and the drain waits (cordoned) for its request. SIGTERM with a short
    ``shutdown_timeout_s`` cuts the requests and the drain short, which may leave our
    cordon on a machine; the new process must not leave it there.
    """
    config: dict[str, Any] = service_config(
        emulator,
        max_machines=2,
        target_concurrency=4,
        scale_down_delay_s=0.5,
        drain_timeout_s=60,
        idle_to_zero_s=300,
        min_lifetime_s=0,
    )
    config["proxy"]["shutdown_timeout_s"] = 1
    file = write_config(tmp_path / "autoscaler.yaml", config)
    proxy_port, admin_port = free_port(), free_port()
    procs = [Autoscaler(file, proxy_port, admin_port) for _ in range(2)]
    url = f"http://127.0.0.1:{proxy_port}"
    async with reaped(procs), aiohttp.ClientSession() as http, Load(url) as burst:
        old, new = procs
        await old.start(http)
        await burst.resize(12)  # panic: both machines start
        await until(lambda: len(started(emulator, APP)) == 2, 30, "two machines started")
        # Fly's `started` comes before the app listens: both must be routed to (the old
        # process's own start saw their ports open) before the test goes on.
        deadline = asyncio.get_running_loop().time() + 10
        while await _metric(http, old.admin, "autoscaler_machines", APP, 'state="started"') < 2:
            assert asyncio.get_running_loop().time() < deadline, "not both routed to"
            await asyncio.sleep(0.05)
        await burst.resize(0)
        # One long request per machine (least outstanding spreads them), then low demand.
        long = Load(url, path="/work?ms=30000")
        async with long:
            held = [asyncio.create_task(long.once()) for _ in range(2)]
            await until(
                lambda: any(m in started(emulator, APP) for m in our_cordons(emulator, APP)),
                30,
                "a drain waiting on a busy machine",
            )
            assert await old.stop() == 0
            await asyncio.gather(*held)  # cut by the short shutdown timeout
        left = our_cordons(emulator, APP)
        await new.start(http)
        await until(lambda: not our_cordons(emulator, APP), 20, "our cordon to go")
        async with http.get(f"{url}/", headers={"Host": HOST}) as resp:
            assert resp.status == 200
        assert await new.stop() == 0
    assert _double_starts(emulator) == []
    figures.record("restart_mid_drain", cordons_left_by_old_process=len(left), lifted_by_new=True)

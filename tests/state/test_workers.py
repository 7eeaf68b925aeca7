"""`autoscaler run --workers 2`: two processes on one port, one decider, all reaped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from reliability.harness import child_env, write_config
from testkit import free_port

from autoscaler.config import EmulatorApp
from autoscaler.emulator import Emulator


def pair_of_free_ports() -> int:
    """A port P with P and P + 1 both free (worker i serves admin on P + i)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def run(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autoscaler", "run", "--config", str(config), *extra]


def test_workers_need_a_redis_url(tmp_path: Path) -> None:
    file = write_config(
        tmp_path / "a.yaml", {"fly": {"api_url": "http://127.0.0.1:9", "token": "t"}}
    )
    done = subprocess.run(
        run(file, "--workers", "2"), env=child_env(), capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"--workers needs cluster.redis_url" in done.stdout + done.stderr
    bad = subprocess.run(
        run(file, "--workers", "0"), env=child_env(), capture_output=True, timeout=60
    )
    assert bad.returncode == 2
    assert b"at least 1" in bad.stdout + bad.stderr


async def get_json(http: aiohttp.ClientSession, url: str, limit_s: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            async with http.get(url) as resp:
                return await resp.json()
        except aiohttp.ClientError:
            assert loop.time() - start < limit_s, f"{url} never answered"
            await asyncio.sleep(0.1)


async def test_two_workers_one_port_one_leader_all_reaped(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    proxy, admin = free_port(), pair_of_free_ports()
    while proxy in (admin, admin + 1):
        admin = pair_of_free_ports()
    file = write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": f"127.0.0.1:{proxy}", "shutdown_timeout_s": 2},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "control": {"tick_s": 0.2},
            "cluster": {"redis_url": redis_server, "lease_ttl_s": 1, "key_prefix": key_prefix},
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60}],
        },
    )
    proc = await asyncio.create_subprocess_exec(
        *run(file, "--workers", "2"),
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    # Read all along: the workers log to the same pipe, which must never fill up.
    output = asyncio.ensure_future(proc.stdout.read())
    try:
        await asyncio.sleep(0)
        async with aiohttp.ClientSession() as http:
            docs: list[dict[str, Any]] = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            while True:
                docs = [
                    await get_json(http, f"http://127.0.0.1:{admin + i}/status") for i in (0, 1)
                ]
                if sum(1 for d in docs if d["cluster"]["leading"]) == 1 and all(
                    len(d["cluster"]["replicas"]) == 2 for d in docs
                ):
                    break
                assert loop.time() - start < 20, f"no single leader: {docs}"
                await asyncio.sleep(0.1)
            ids = {d["cluster"]["replica"] for d in docs}
            assert len(ids) == 2
            for _ in range(6):  # new connections, spread over the workers by the kernel
                async with http.get(
                    f"http://127.0.0.1:{proxy}/",
                    headers={"Host": "web.test", "Connection": "close"},
                ) as resp:
                    assert resp.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
        err = (await asyncio.wait_for(output, 60)).decode()
    assert code == 0, err
    pids = [json.loads(line)["pid"] for line in err.splitlines() if '"worker_started"' in line]
    assert len(pids) == 2
    for pid in pids:  # reaped: gone, not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

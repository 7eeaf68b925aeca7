"""Cluster mode: leader failover time over repeated kills, against a real redis-server.

    .venv/bin/python benchmarks/cluster.py [--kills 10] [--ttl 1.0] [--replicas 3]

Starts redis-server on a free loopback port (no persistence), runs ``--replicas`` lease
holders the way replicas do (autoscaler/control/replica.py: a round every 250 ms, a lease
step every ttl / 3), and ``--kills`` times kills the leader (its rounds stop, its Redis
connection closes, as a SIGKILLed process's would) and measures the time until another
replica leads. Prints each failover and min / median / max against the bound of
2 x ttl. (Throughput with 1 and 2 workers and the added p50 of cluster mode are not
measured yet.) Loopback only; redis-server is reaped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoscaler.state.cluster import REPORT_S, connect
from autoscaler.state.lease import Lease


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    def __init__(self, url: str, prefix: str, name: str, ttl: float) -> None:
        self.lease = Lease(connect(url, ttl), prefix, name, ttl)
        self.ttl = ttl
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        next_step = 0.0
        while True:
            now = time.monotonic()
            if now >= next_step:
                next_step = now + self.ttl / 3
                with contextlib.suppress(Exception):  # a killed member's own errors
                    await self.lease.step()
            await asyncio.sleep(REPORT_S)

    async def kill(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.lease.redis.aclose()


async def measure(url: str, kills: int, ttl: float, replicas: int) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    members = [Member(url, prefix, f"r{i}", ttl) for i in range(replicas)]
    for m in members:
        m.task = asyncio.ensure_future(m.run())
    times: list[float] = []
    spawned = replicas
    try:
        for _ in range(kills):
            while not any(m.lease.held() for m in members):  # noqa: ASYNC110 - a deadline, no event
                await asyncio.sleep(0.01)
            leader = next(m for m in members if m.lease.held())
            await leader.kill()
            members.remove(leader)
            killed_at = time.monotonic()
            # A replacement joins (a restarted process), so the cluster keeps its size.
            fresh = Member(url, prefix, f"r{spawned}", ttl)
            spawned += 1
            fresh.task = asyncio.ensure_future(fresh.run())
            members.append(fresh)
            while not any(m.lease.held() for m in members):  # noqa: ASYNC110 - a deadline, no event
                await asyncio.sleep(0.005)
            took = time.monotonic() - killed_at
            times.append(took)
            print(f"failover {len(times):2d}: {took:.3f} s", flush=True)
    finally:
        for m in members:
            await m.kill()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=1.0, help="cluster.lease_ttl_s")
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found (Debian package redis-server)", file=sys.stderr)
        return 1
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        times = asyncio.run(
            measure(f"redis://127.0.0.1:{port}/0", args.kills, args.ttl, args.replicas)
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(
        f"lease_ttl_s {args.ttl:g}, {args.replicas} replicas, {len(times)} kills: failover"
        f" min {min(times):.3f} s, median {statistics.median(times):.3f} s,"
        f" max {max(times):.3f} s (bound {2 * args.ttl:g} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

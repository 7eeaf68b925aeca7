"""What idle keep-alive connections cost the Machines API client on every call.

    .venv/bin/python benchmarks/api_keepalive.py [--calls 1000] [--keepalive 20,8,4]

httpcore looks at every idle connection of its pool on each request (is its socket still
usable?), so the CPU of one call grows with the connections kept open. For each size in
``--keepalive``, in the same run and against the same server (aiohttp on 127.0.0.1 that
answers a list of 10 machines, as the emulator does), the script fills the pool with 50
calls at once, then times ``--calls`` calls one after the other through
``MachinesClient.list_machines`` and prints the process's CPU per call (client and server:
both run in this process, and the server's share is the same for every size).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from autoscaler import logs
from autoscaler.fly.client import MachinesClient

HOST = "127.0.0.1"
MACHINE = {"id": "m0", "name": "m0", "state": "started", "region": "ams", "instance_id": "i0"}


async def _machines(_: web.Request) -> web.Response:
    return web.json_response([{**MACHINE, "id": f"m{i}"} for i in range(10)])


async def _cpu_per_call(url: str, keepalive: int, calls: int) -> float:
    async with MachinesClient(
        url, "bench-token", rate_limit=False, keepalive_connections=keepalive
    ) as api:
        await asyncio.gather(*(api.list_machines("app") for _ in range(50)))
        cpu = time.process_time()
        for _ in range(calls):
            await api.list_machines("app")
        return (time.process_time() - cpu) / calls


async def run(calls: int, sizes: list[int]) -> None:
    app = web.Application()
    app.router.add_get("/v1/apps/{app}/machines", _machines)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        for size in sizes:
            ms = await _cpu_per_call(f"http://{HOST}:{port}", size, calls) * 1000
            print(f"{size:3d} idle connections kept: {ms:.3f} ms of CPU per call")
    finally:
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls timed per size")
    parser.add_argument("--keepalive", default="20,8,4", help="pool sizes, comma-separated")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logs.configure(level="warning", fmt="console")  # a debug line per call is not the cost
    asyncio.run(run(args.calls, [int(s) for s in args.keepalive.split(",")]))


if __name__ == "__main__":
    main()

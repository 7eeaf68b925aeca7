"""What the Machines API client costs the event loop it shares with the proxy, with its
transport in the loop (as shipped) and on a thread of its own (an idea, not shipped).

    .venv/bin/python benchmarks/api_thread.py [--calls 1500] [--rounds 2]

In one process the proxy and the control plane share one event loop, and most of the
control plane's CPU is its API calls (docs/benchmarks.md, "Many apps"). This measures how
much of one call's CPU would leave that loop if httpcore (the connection pool, h11, the
sockets) ran on a thread with a loop of its own: ``ThreadedTransport`` below hands each
request to that loop and the whole response back. The server (aiohttp, a list of 10
machines, as the emulator answers) runs in a child process on 127.0.0.1, so the CPU read
here is the client's. For each variant, in turn, ``--rounds`` times: ``--calls`` calls of
``MachinesClient.list_machines`` one after the other, and the CPU per call of the main
thread (what the proxy's loop would lose) and of the whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import threading
import time

import httpx

from autoscaler import logs
from autoscaler.fly.client import KEEPALIVE_CONNECTIONS, MachinesClient

HOST = "127.0.0.1"
SERVER = """
import sys
from aiohttp import web
MACHINE = {"id": "m0", "name": "m0", "state": "started", "region": "ams", "instance_id": "i0"}
async def machines(_):
    return web.json_response([{**MACHINE, "id": f"m{i}"} for i in range(10)])
app = web.Application()
app.router.add_get("/v1/apps/{app}/machines", machines)
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
"""


class ThreadedTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, run on a thread's event loop; each response read whole."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fly-api")
        self._thread.start()
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=KEEPALIVE_CONNECTIONS)
        self._inner = httpx.AsyncHTTPTransport(limits=limits)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async def exchange() -> tuple[int, httpx.Headers, bytes]:
            response = await self._inner.handle_async_request(request)
            try:
                return response.status_code, response.headers, await response.aread()
            finally:
                await response.aclose()

        future = asyncio.run_coroutine_threadsafe(exchange(), self._loop)
        status, headers, content = await asyncio.wrap_future(future)
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._inner.aclose(), self._loop)
        )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _per_call(url: str, threaded: bool, calls: int) -> tuple[float, float, float]:
    """Main thread's CPU, process CPU and wall time per call, in ms."""
    transport = ThreadedTransport() if threaded else None
    async with MachinesClient(url, "bench-token", rate_limit=False, transport=transport) as api:
        await asyncio.gather(*(api.list_machines("app") for _ in range(20)))  # warm the pool
        main, process, wall = time.thread_time(), time.process_time(), time.perf_counter()
        for _ in range(calls):
            await api.list_machines("app")
        return (
            (time.thread_time() - main) / calls * 1000,
            (time.process_time() - process) / calls * 1000,
            (time.perf_counter() - wall) / calls * 1000,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1500, help="calls timed per variant")
    parser.add_argument("--rounds", type=int, default=2, help="each variant this many times")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logs.configure(level="warning", fmt="console")  # a debug line per call is not the cost
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, HOST, str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.05)
        print("| transport | main thread CPU (ms/call) | process CPU (ms/call) | wall (ms/call) |")
        print("| --- | ---: | ---: | ---: |")
        for _ in range(args.rounds):
            for threaded in (False, True):
                main_ms, process_ms, wall_ms = asyncio.run(
                    _per_call(f"http://{HOST}:{port}", threaded, args.calls)
                )
                name = "on a thread" if threaded else "in the loop (shipped)"
                print(f"| {name} | {main_ms:.3f} | {process_ms:.3f} | {wall_ms:.3f} |")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

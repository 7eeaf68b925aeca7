"""Proxy memory under abuse: 10,000 hostile connections at once, the proxy's RSS, and the
latency of well-behaved clients meanwhile.

    .venv/bin/python benchmarks/proxy_memory.py [--connections 10000] [--hold 15]
                                                 [--body-kib 1024] [--response-kib 2048]

Starts a slow machine (aiohttp) and the proxy (static mode, uvloop, JSON logs to
/dev/null) as two processes on 127.0.0.1, measures well-behaved clients (sequential small
GETs on one keep-alive connection), then opens ``--connections`` connections, a quarter of
each kind:

- idle: connected, sends nothing;
- slowloris: sends a request head one byte every 2 s, never ends it;
- pipelining uploads: two pipelined POSTs with ``--body-kib`` bodies, to a machine that
  reads 4 KiB every half second;
- slow readers: GET a ``--response-kib`` response and never read it.

It then holds them for ``--hold`` seconds, sampling the proxy's RSS (``/proc``), measures
the well-behaved clients again, and prints RSS before and during (and the peak, VmHWM),
with p50/p99 of the small GETs before and during. Goal: RSS under 200 MB. The open-file
limit is raised to its hard limit (each process holds over 10,000 sockets). Every child
process is stopped at the end, on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from proxy_overhead import HOST, _loop_policy, _until_sigterm

KINDS = ("idle", "slowloris", "uploads", "slow readers")


def _raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    got = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if got < want:
        raise SystemExit(f"need {want} open files, the hard limit allows {got}")
    return got


# --- the two servers ----------------------------------------------------------------------


def serve_machine(port: int, response_kib: int) -> None:
    from aiohttp import web

    piece = b"r" * 65536

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 512)

    async def upload(request: web.Request) -> web.Response:
        with contextlib.suppress(ConnectionError):  # (the client left at the end)
            while await request.content.read(4096):  # noqa: ASYNC110 - slow, on purpose
                await asyncio.sleep(0.5)
        return web.Response(body=b"stored")

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = response_kib * 1024
        await response.prepare(request)
        for _ in range(response_kib // 64):
            await response.write(piece)
        return response

    async def main() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/", small)
        app.router.add_post("/upload", upload)
        app.router.add_get("/large", large)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=4096).start()
        print("ready", flush=True)
        await _until_sigterm()
        await runner.cleanup()

    _loop_policy(True)
    asyncio.run(main())


def serve_proxy(port: int, machine_port: int, max_connections: int) -> None:
    from prometheus_client import CollectorRegistry

    from autoscaler import logs
    from autoscaler.config import AppConfig, ProxySettings, Settings
    from autoscaler.control.view import FleetView
    from autoscaler.metrics import Metrics
    from autoscaler.proxy.server import ProxyServer

    with open(os.devnull, "w") as devnull:
        logs.configure(fmt="json", stream=devnull)
        settings = Settings(
            proxy=ProxySettings(
                listen=f"{HOST}:{port}",
                max_connections=max_connections,
                client_timeout_s=600,  # the hostile connections stay for the measurement
                upstream_timeout_s=600,
            ),
            apps=[
                AppConfig(
                    name="bench",
                    hosts=[HOST],
                    backends=[f"{HOST}:{machine_port}"],
                    hard_limit=100_000,
                    max_body_bytes=None,
                )
            ],
        )

        async def main() -> None:
            proxy = ProxyServer(settings, FleetView(), Metrics(CollectorRegistry()))
            await proxy.start()
            print("ready", flush=True)
            await _until_sigterm()
            await proxy.stop()

        _loop_policy(True)
        asyncio.run(main())


# --- clients ------------------------------------------------------------------------------


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(50):
        try:
            return await asyncio.open_connection(HOST, port, limit=1024)
        except OSError:
            await asyncio.sleep(0.1)  # the accept backlog is full: a moment
    raise RuntimeError("could not connect")


async def idle(port: int, stop: asyncio.Event) -> None:
    _, writer = await _open(port)
    await stop.wait()
    writer.close()


async def slowloris(port: int, stop: asyncio.Event) -> None:
    _, writer = await _open(port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await stop.wait()
        writer.write(b"a")
    writer.close()


async def uploads(port: int, stop: asyncio.Event, body_kib: int) -> None:
    _, writer = await _open(port)
    head = b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (
        body_kib * 1024
    )
    piece = b"u" * 16384
    with contextlib.suppress(ConnectionError):
        for _ in range(2):  # the second is pipelined behind the first
            writer.write(head)
            for _ in range(body_kib // 16):
                if stop.is_set():
                    break
                writer.write(piece)
                await writer.drain()  # as fast as the proxy takes it
        await stop.wait()
    writer.close()


async def slow_reader(port: int, stop: asyncio.Event) -> None:
    _, writer = await _open(port)
    writer.write(b"GET /large HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await stop.wait()  # never reads (the reader's buffer limit is 1 KiB)
    writer.close()


async def well_behaved(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection(HOST, port)
    latencies = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - t0) * 1000)
    finally:
        writer.close()
    return latencies


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace, port: int, pid: int) -> None:
    await well_behaved(port, 100)  # warm-up
    before = await well_behaved(port, args.requests)
    rss_before, _ = _rss_mib(pid)
    stop = asyncio.Event()
    per_kind = args.connections // len(KINDS)
    makers = [
        lambda: idle(port, stop),
        lambda: slowloris(port, stop),
        lambda: uploads(port, stop, args.body_kib),
        lambda: slow_reader(port, stop),
    ]
    if args.only:
        makers = [makers[["idle", "slowloris", "uploads", "readers"].index(args.only)]]
        per_kind = args.connections
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    for i in range(per_kind):  # interleaved, in batches, so the backlog keeps up
        tasks += [asyncio.create_task(make()) for make in makers]
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    opened = time.monotonic() - t0
    peak = 0.0
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline:
        peak = max(peak, _rss_mib(pid)[0])
        await asyncio.sleep(0.5)
    during = await well_behaved(port, args.requests)
    rss_during, hwm = _rss_mib(pid)
    peak = max(peak, rss_during)
    failed = sum(1 for t in tasks if t.done() and t.exception() is not None)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    print(
        f"{args.connections} connections ({per_kind} each: {args.only or ', '.join(KINDS)}) "
        "opened in "
        f"{opened:.1f}s, held {args.hold:g}s; {failed} client tasks failed"
    )
    print(
        f"proxy RSS: {rss_before:.0f} MiB before, {peak:.0f} MiB at most during,"
        f" VmHWM {hwm:.0f} MiB"
    )
    print(
        f"well-behaved GETs ({args.requests} sequential): p50 {_pct(before, 0.5):.2f} ms, "
        f"p99 {_pct(before, 0.99):.2f} ms before; p50 {_pct(during, 0.5):.2f} ms, "
        f"p99 {_pct(during, 0.99):.2f} ms during (mean {statistics.mean(during):.2f} ms)"
    )
    verdict = "under" if peak < 200 else "OVER"
    print(f"goal: RSS under 200 MB: {verdict} ({peak * 1.048576:.0f} MB)")


@contextlib.contextmanager
def _child(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"child {args} failed to start")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _compiled() -> bool:
    import autoscaler.proxy.h1 as h1

    return not h1.__file__ or not h1.__file__.endswith(".py")


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the flood is held")
    parser.add_argument("--body-kib", type=int, default=1024, help="each upload's body")
    parser.add_argument("--response-kib", type=int, default=2048, help="each slow read")
    parser.add_argument("--requests", type=int, default=300, help="well-behaved GETs per phase")
    parser.add_argument(
        "--only", choices=["idle", "slowloris", "uploads", "readers"], help="one kind, all of them"
    )
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.serve:
        role, *rest = args.serve
        if role == "machine":
            serve_machine(int(rest[0]), int(rest[1]))
        else:
            serve_proxy(int(rest[0]), int(rest[1]), int(rest[2]))
        return 0
    limit = _raise_nofile(args.connections + 2000)  # inherited by both children
    machine_port, proxy_port = _free_port(), _free_port()
    # SIGTERM (and Ctrl-C) end the run through the finally clauses that stop the children.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(
        f"proxy data path {'compiled (mypyc)' if _compiled() else 'pure Python'}, uvloop, "
        f"{os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; open files limit {limit}"
    )
    with (
        _child(["--serve", "machine", str(machine_port), str(args.response_kib)]),
        _child(
            ["--serve", "proxy", str(proxy_port), str(machine_port), str(args.connections + 1000)]
        ) as proxy,
    ):
        _loop_policy(True)
        asyncio.run(measure(args, proxy_port, proxy.pid))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

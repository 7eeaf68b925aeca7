"""Proxy overhead: the same load straight to a backend and through the proxy, in one run.

    .venv/bin/python benchmarks/proxy_overhead.py [--duration 10] [--rounds 3]
                                                  [--connections 50] [--rate 500]
                                                  [--no-access-log] [--no-uvloop] [--no-wrk]
                                                  [--no-nginx]

Starts a small aiohttp backend and the autoscaler proxy (static mode, one backend) as two
processes on 127.0.0.1, and, when nginx is installed, nginx as a reference proxy in front of
the same backend (one process, access log on, as the proxy runs). Then it measures:

1. throughput: closed loop at ``--connections`` concurrent connections (wrk when it is
   installed, else a built-in aiohttp load generator), giving req/s, p50 and p99, for
   ``--rounds`` rounds that alternate the order of the targets (so a machine whose speed
   drifts during the run penalises none); the medians are compared, and the CPU time per
   request of the process under test (the backend when direct, the proxy when proxied,
   nginx for nginx) is read from /proc;
2. latency at a fixed rate (``--rate`` req/s, open loop, built-in generator), giving p50 and
   p99, so the proxy's added latency is read at a load well under saturation.

It prints both tables and the ratios proxied/direct (and nginx/direct: what a proxy written
in C reaches on the same machine, where the load generator, the proxy and the backend share
its cores). Loopback only; every phase is bounded by ``--duration``; the child processes
are stopped at the end, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
BODY = b"x" * 512  # a small JSON-sized response


# --- the two servers (each runs in its own process) -----------------------------------


def _loop_policy(use_uvloop: bool) -> None:
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def serve_backend(port: int) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="text/plain")

    async def main() -> None:
        server = web.Server(handler, access_log=None)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        print("ready", flush=True)
        await _until_sigterm()
        await runner.cleanup()

    asyncio.run(main())


def serve_proxy(port: int, backend_port: int, access_log: bool) -> None:
    from prometheus_client import CollectorRegistry

    from autoscaler import logs
    from autoscaler.config import AppConfig, ProxySettings, Settings
    from autoscaler.control.view import FleetView
    from autoscaler.metrics import Metrics
    from autoscaler.proxy.server import ProxyServer

    with open(os.devnull, "w") as devnull:  # JSON lines, as in production, to nowhere
        logs.configure(fmt="json", stream=devnull)
        settings = Settings(
            proxy=ProxySettings(listen=f"{HOST}:{port}", access_log=access_log),
            apps=[
                AppConfig(
                    name="bench",
                    hosts=[HOST],
                    backends=[f"{HOST}:{backend_port}"],
                    hard_limit=10_000,
                )
            ],
        )

        async def main() -> None:
            proxy = ProxyServer(settings, FleetView(), Metrics(CollectorRegistry()))
            await proxy.start()
            print("ready", flush=True)
            await _until_sigterm()
            await proxy.stop()  # graceful: what a SIGTERM does in production

        asyncio.run(main())


# --- load generators --------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    @classmethod
    def of(cls, latencies_ms: list[float], elapsed_s: float, errors: int) -> Result:
        return cls(
            len(latencies_ms) / elapsed_s,
            _percentile(latencies_ms, 0.5),
            _percentile(latencies_ms, 0.99),
            errors,
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(port: int, duration: float, connections: int) -> Result:
    out = subprocess.run(
        [
            "wrk",
            "--latency",
            "-t2",
            f"-c{connections}",
            f"-d{max(1, int(duration))}s",
            f"http://{HOST}:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout

    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(match.group(1)) * _UNIT_MS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return Result(
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        errors=(int(errors.group(1)) if errors else 0) + (1 if socket_errors else 0),
    )


async def closed_loop(port: int, duration: float, connections: int) -> Result:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                async with session.get(f"http://{HOST}:{port}/") as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return Result.of(latencies, elapsed, errors)


async def open_loop(port: int, duration: float, rate: float) -> Result:
    """``rate`` requests a second on a fixed schedule, whatever the answers' speed."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    total = int(duration * rate)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                async with session.get(f"http://{HOST}:{port}/") as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append((time.perf_counter() - start) * 1000)

        # Warm the pool so connection set-up is not measured.
        await asyncio.gather(*(one() for _ in range(20)))
        latencies.clear()
        tasks = []
        begin = time.perf_counter()
        for i in range(total):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return Result.of(latencies, elapsed, errors)


# --- orchestration -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _compiled() -> bool:
    """Whether the proxy's data path was built with AUTOSCALER_COMPILE=1 (see setup.py)."""
    from autoscaler.proxy import server

    return not (server.__file__ or "").endswith(".py")


@contextlib.contextmanager
def _child(args: list[str], wrapper: Sequence[str] = ()) -> Iterator[subprocess.Popen[str]]:
    """This script as a server (``--serve ...``), run under ``wrapper`` (such as valgrind)
    when given; yielded once it says "ready", stopped with SIGTERM at the end."""
    command = [*wrapper, sys.executable, __file__, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"child {args} failed to start")
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after 10 s; reaped either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_NGINX_CONF = """\
daemon off;
master_process {master};
worker_processes {workers};
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    access_log /dev/null combined buffer=32k flush=1s;
    upstream backend {{
{servers}{keepalive}    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_next_upstream {next_upstream};
        }}
    }}
}}
"""


def nginx_config(
    prefix: str,
    port: int,
    upstreams: Sequence[int],
    *,
    workers: int = 1,
    keepalive: int = 64,
    next_upstream: str = "error timeout",
) -> str:
    """nginx.conf for a reverse proxy on ``HOST:port`` in front of ``HOST:upstreams``
    (round robin), everything it writes under ``prefix``. ``workers`` 1 runs one process
    (no master); more runs a master and that many workers. ``keepalive`` 0 opens a new
    upstream connection per request. ``next_upstream`` is ``proxy_next_upstream`` (nginx's
    default; "error" retries on an upstream error: a refused connection for any request, one
    that failed after it was sent only when the method is idempotent)."""
    servers = "".join(f"        server {HOST}:{p};\n" for p in upstreams)
    return _NGINX_CONF.format(
        dir=prefix,
        host=HOST,
        port=port,
        master="on" if workers > 1 else "off",
        workers=workers,
        servers=servers,
        keepalive=f"        keepalive {keepalive};\n" if keepalive else "",
        next_upstream=next_upstream,
    )


@contextlib.contextmanager
def nginx(
    port: int,
    upstreams: Sequence[int],
    **options: Any,
) -> Iterator[subprocess.Popen[bytes]]:
    """nginx (``nginx_config``'s options) with a temporary prefix, yielded once it accepts
    connections on ``HOST:port``, stopped with SIGTERM at the end (its master reaps its
    workers) and reaped, on error too."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(tmp, port, upstreams, **options))
        errors = os.path.join(tmp, "error.log")
        with open(errors, "w") as err:
            proc = subprocess.Popen(["nginx", "-p", tmp, "-e", "stderr", "-c", conf], stderr=err)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    with open(errors) as err:
                        raise RuntimeError(f"nginx failed to start: {err.read().strip()}")
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not accept connections within 10 s")
                time.sleep(0.05)
            yield proc
        finally:
            _stop(proc)


def _median_run(results: list[Result]) -> Result:
    """The run with the median throughput (its latencies come with it)."""
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _row(name: str, r: Result) -> str:
    return f"{name:<10} {r.rps:>10.0f} {r.p50_ms:>9.2f} {r.p99_ms:>9.2f} {r.errors:>7}"


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per target")
    parser.add_argument("--connections", type=int, default=50, help="closed-loop connections")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/second")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loops")
    parser.add_argument("--no-wrk", action="store_true", help="built-in generator only")
    parser.add_argument(
        "--no-nginx", action="store_true", help="no nginx reference (used when installed)"
    )
    parser.add_argument(
        "--no-access-log", action="store_true", help="proxy.access_log off (on by default)"
    )
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    _loop_policy(not args.no_uvloop)
    if args.serve:
        if args.serve[0] == "backend":
            serve_backend(int(args.serve[1]))
        else:
            serve_proxy(int(args.serve[1]), int(args.serve[2]), args.serve[3] == "log")
        return 0

    backend_port, proxy_port, nginx_port = _free_port(), _free_port(), _free_port()
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    use_nginx = shutil.which("nginx") is not None and not args.no_nginx
    loop_kind = "asyncio" if args.no_uvloop else "uvloop"
    data_path = "compiled (mypyc)" if _compiled() else "pure Python"
    with (
        _child(
            ["--serve", "backend", str(backend_port)] + (["--no-uvloop"] * args.no_uvloop)
        ) as backend_proc,
        _child(
            ["--serve", "proxy", str(proxy_port), str(backend_port)]
            + (["nolog"] if args.no_access_log else ["log"])
            + (["--no-uvloop"] * args.no_uvloop)
        ) as proxy_proc,
        nginx(nginx_port, [backend_port]) if use_nginx else contextlib.nullcontext() as nginx_proc,
    ):
        # CPU per request of the process under test: the backend when direct, the proxy
        # when proxied (the backend's share is the same in both), nginx for nginx.
        targets = [
            ("direct", backend_port, backend_proc.pid),
            ("proxied", proxy_port, proxy_proc.pid),
        ]
        if nginx_proc is not None:
            targets.append(("nginx", nginx_port, nginx_proc.pid))
        tool = "wrk -t2" if use_wrk else "built-in aiohttp generator"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"servers: aiohttp backend and proxy on {HOST}, {loop_kind} loops, "
            f"proxy data path {data_path}, "
            f"{os.cpu_count()} CPUs, load average {load}; {args.duration:g}s per phase; "
            f"access log {'off' if args.no_access_log else 'on'}"
            + ("; nginx (1 process, access log on) as a reference" if use_nginx else "")
        )
        print(
            f"\nthroughput: closed loop, {args.connections} connections ({tool}), "
            f"{args.rounds} rounds alternating the order"
        )
        print(
            f"{'target':<10} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}"
            f" {'CPU us/req':>11}"
        )
        runs: dict[str, list[Result]] = {name: [] for name, _, _ in targets}
        cpu_per_request: dict[str, list[float]] = {name: [] for name, _, _ in targets}
        for round_ in range(args.rounds):
            for name, port, pid in targets if round_ % 2 == 0 else targets[::-1]:
                cpu_before = _cpu_seconds(pid)
                if use_wrk:
                    result = run_wrk(port, args.duration, args.connections)
                else:
                    result = asyncio.run(closed_loop(port, args.duration, args.connections))
                runs[name].append(result)
                cost = ""
                if result.rps > 0:
                    used = _cpu_seconds(pid) - cpu_before
                    cpu_per_request[name].append(used / (result.rps * args.duration) * 1e6)
                    cost = f"{cpu_per_request[name][-1]:>11.0f}"
                print(_row(name, result) + f" {cost}", flush=True)
        closed = {name: _median_run(results) for name, results in runs.items()}
        print(f"\nlatency: open loop at {args.rate:g} req/s (built-in generator)")
        print(f"{'target':<10} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
        fixed: dict[str, Result] = {}
        for name, port, _ in targets:
            fixed[name] = asyncio.run(open_loop(port, args.duration, args.rate))
            print(_row(name, fixed[name]), flush=True)

    print("\nratios")
    for name, _, _ in targets[1:]:
        ratio = closed[name].rps / closed["direct"].rps if closed["direct"].rps else 0.0
        per_round = [
            p.rps / d.rps if d.rps else 0.0 for d, p in zip(runs["direct"], runs[name], strict=True)
        ]
        goal = " (goal >= 0.50)" if name == "proxied" else " (reference)"
        print(
            f"throughput {name}/direct: {ratio:.2f}{goal}, medians of {args.rounds} rounds;"
            f" per round: {', '.join(f'{r:.2f}' for r in per_round)}"
        )
    if all(cpu_per_request.values()):
        backend_us = statistics.median(cpu_per_request["direct"])
        costs = []
        for name, _, _ in targets[1:]:
            us = statistics.median(cpu_per_request[name])
            label = "proxy" if name == "proxied" else name
            costs.append(f"{label} {us:.0f} us ({us / backend_us:.2f}x)")
        print(f"CPU per request (medians): backend {backend_us:.0f} us, {', '.join(costs)}")
    for name, _, _ in targets[1:]:
        added_p50 = fixed[name].p50_ms - fixed["direct"].p50_ms
        added_p99 = fixed[name].p99_ms - fixed["direct"].p99_ms
        goal = " (goal <= 1 ms)" if name == "proxied" else ""
        print(
            f"p50 latency {name}/direct at {args.rate:g} req/s: "
            f"{fixed[name].p50_ms / fixed['direct'].p50_ms:.2f}, "
            f"added {added_p50:+.2f} ms{goal}; p99 added {added_p99:+.2f} ms"
        )
    errors = sum(r.errors for results in runs.values() for r in results)
    errors += sum(r.errors for r in fixed.values())
    print(f"errors: {errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

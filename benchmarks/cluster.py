"""Cluster mode against a real redis-server: throughput of 1 and 2 workers against nginx
with 1 and 2 workers, the added p50 of cluster mode, and leader failover time.

    .venv/bin/python benchmarks/cluster.py [--duration 5] [--rounds 3] [--connections 50]
                                           [--rate 300] [--kills 10] [--ttl 1.0]
                                           [--replicas 3] [--no-throughput] [--no-failover]
                                           [--no-skew] [--skew-limit 8] [--skew-clients 40]
                                           [--skew-splits 90/10,50/50] [--skew-delay-ms 20]

Starts redis-server on a free loopback port (no persistence), then:

1. throughput and latency (skipped with ``--no-throughput``): a small aiohttp backend
   (benchmarks/proxy_overhead.py's), an emulator process as the Machines API, and, all in
   front of that backend at once: ``autoscaler run`` as one process without Redis
   (``single``), ``autoscaler run --workers 1`` and ``--workers 2`` with
   ``cluster.redis_url`` (``cluster-1w``, ``cluster-2w``), and nginx with 1 and 2 worker
   processes (``nginx-1w``, ``nginx-2w``; proxy_overhead.py's helper). Closed loop at
   ``--connections`` connections (wrk when installed, else a built-in generator) for
   ``--rounds`` rounds alternating the order, medians reported, the backend alone
   (``direct``) as the ceiling; then an open loop at ``--rate`` req/s against ``single``
   and ``cluster-1w``: the added p50 of cluster mode under the same load. The load
   generator, the backend and the proxies share this machine's cores.
2. leader failover (skipped with ``--no-failover``): ``--replicas`` lease holders the way
   replicas do (autoscaler/control/replica.py: a round every 250 ms, a lease step every
   ttl / 3), and ``--kills`` times kills the leader (its rounds stop, its Redis connection
   closes, as a SIGKILLed process's would) and measures the time until another replica
   leads; min / median / max against the bound of 2 x ttl.
3. ``hard_limit`` under skew (skipped with ``--no-skew``): two ``autoscaler run`` replicas
   (one process each, ``cluster.redis_url``) in front of ONE machine, a backend process
   that holds each request ``--skew-delay-ms`` and counts the requests it serves at once,
   ``hard_limit`` ``--skew-limit``. ``--skew-clients`` closed-loop clients split 90/10 and
   50/50 over the replicas (``--skew-splits``) for ``--duration`` s each, after a warm-up
   (both replicas' reports read). Reported: the most requests the machine served at once,
   the share of requests that arrived to find it above the limit, the share of time it
   spent above it, and each replica's requests and errors.

Loopback only; every child process (redis-server, backend, emulator, supervisors and their
workers, nginx) is stopped and reaped at the end, on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy_overhead import (
    HOST,
    Result,
    _child,
    _compiled,
    _median_run,
    _row,
    closed_loop,
    nginx,
    open_loop,
    run_wrk,
)

from autoscaler.aio import urlopen_direct
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


# --- throughput: autoscaler run (single, --workers 1, --workers 2) against nginx -------


def _child_env() -> dict[str, str]:
    """This environment without the shell's AUTOSCALER_* / FLY_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AUTOSCALER_", "FLY_"))}


def _reap(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM (a supervisor stops its workers gracefully), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until(check: Any, what: str, proc: subprocess.Popen[Any], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit_s:g} s")
        time.sleep(0.1)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free loopback port, nothing written to disk; its URL. Reaped."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (Debian package redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_until(lambda: _answers(port), "redis-server", proc, 10)
        yield f"redis://{HOST}:{port}/0"
    finally:
        _reap(proc, 10)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
        return True
    return False


def _ready(admin_port: int) -> bool:
    try:
        url = f"http://{HOST}:{admin_port}/readyz"
        with urlopen_direct(url, 1) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _free_range(n: int) -> int:
    """A port P with P .. P + n - 1 all free (worker i serves admin on P + i)."""
    while True:
        first = _free_port()
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


@contextlib.contextmanager
def _emulator(tmp: str) -> Iterator[tuple[str, str]]:
    """An emulator process as the Machines API (no app: the benchmark's app is static)."""
    port, token = _free_port(), secrets.token_urlsafe(16)
    log = open(os.path.join(tmp, "emulator.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "autoscaler", "emulator", "--listen", f"{HOST}:{port}"),
            *("--token", token, "--no-rate-limits"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_child_env(),
    )
    try:
        _wait_until(lambda: _answers(port), "the emulator", proc)
        yield f"http://{HOST}:{port}", token
    finally:
        _reap(proc)
        log.close()


@contextlib.contextmanager
def _autoscaler(
    tmp: str, name: str, backend_port: int, api: tuple[str, str], redis_url: str | None,
    workers: int | None, hard_limit: int = 10_000, prefix: str | None = None,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:  # fmt: skip
    """``autoscaler run`` (``workers`` None: one process, no supervisor) in front of the
    backend, static mode, access log on as in production; yields its proxy port once every
    worker's /readyz answers."""
    port, admin = _free_port(), _free_range(workers or 1)
    config: dict[str, Any] = {
        "fly": {"api_url": api[0], "token": api[1], "rate_limit": False},
        "proxy": {"listen": f"{HOST}:{port}", "shutdown_timeout_s": 2},
        "admin": {"listen": f"{HOST}:{admin}"},
        "apps": [
            {
                "name": "bench",
                "hosts": [HOST],
                "backends": [f"{HOST}:{backend_port}"],
                "hard_limit": hard_limit,
            }
        ],
    }
    if redis_url is not None:
        config["cluster"] = {"redis_url": redis_url, "key_prefix": prefix or f"bench-{name}"}
    file = os.path.join(tmp, f"{name}.yaml")
    with open(file, "w") as f:
        yaml.safe_dump(config, f)
    argv = [sys.executable, "-m", "autoscaler", "run", "--config", file, "--log-format", "json"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    log = open(os.path.join(tmp, f"{name}.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    try:
        for i in range(workers or 1):
            _wait_until(lambda i=i: _ready(admin + i), f"{name} worker {i}", proc)
        yield port, proc
    finally:
        _reap(proc)
        log.close()


def throughput(args: argparse.Namespace, redis_url: str) -> int:
    use_wrk = shutil.which("wrk") is not None
    use_nginx = shutil.which("nginx") is not None
    backend_port = _free_port()
    errors = 0
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        _child(["--serve", "backend", str(backend_port)]),
        _emulator(tmp) as api,
        _autoscaler(tmp, "single", backend_port, api, None, None) as (single, _),
        _autoscaler(tmp, "cluster-1w", backend_port, api, redis_url, 1) as (w1, _),
        _autoscaler(tmp, "cluster-2w", backend_port, api, redis_url, 2) as (w2, _),
        contextlib.ExitStack() as stack,
    ):
        targets = [("direct", backend_port), ("single", single)]
        targets += [("cluster-1w", w1), ("cluster-2w", w2)]
        if use_nginx:
            for n in (1, 2):
                port = _free_port()
                stack.enter_context(nginx(port, [backend_port], workers=n))
                targets.append((f"nginx-{n}w", port))
        tool = f"wrk -t2 -c{args.connections}" if use_wrk else "built-in aiohttp generator"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        build = "compiled (mypyc)" if _compiled() else "pure Python"
        print(
            f"proxy data path {build}; {os.cpu_count()} CPUs (shared with other work: the"
            f" load generator, the backend and every proxy run on them); load average {load}"
            + ("" if use_nginx else "; nginx not installed: no reference")
        )
        print(
            f"\nthroughput: closed loop, {args.connections} connections ({tool}),"
            f" {args.duration:g} s, {args.rounds} rounds alternating the order"
        )
        print(f"{'target':<11}{'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
        runs: dict[str, list[Result]] = {name: [] for name, _ in targets}
        for round_ in range(args.rounds):
            for name, port in targets if round_ % 2 == 0 else targets[::-1]:
                if use_wrk:
                    result = run_wrk(port, args.duration, args.connections)
                else:
                    result = asyncio.run(closed_loop(port, args.duration, args.connections))
                runs[name].append(result)
                errors += result.errors
                print(" " + _row(name, result), flush=True)
        print("\nmedians")
        medians = {name: _median_run(results) for name, results in runs.items()}
        for name, _ in targets:
            print(" " + _row(name, medians[name]), flush=True)
        print(f"\nlatency: open loop at {args.rate:g} req/s (built-in generator)")
        fixed: dict[str, Result] = {}
        for name, port in targets[1:3]:
            fixed[name] = asyncio.run(open_loop(port, args.duration, args.rate))
            errors += fixed[name].errors
            print(" " + _row(name, fixed[name]), flush=True)
    print()
    ratio = medians["cluster-2w"].rps / medians["cluster-1w"].rps
    print(f"cluster-2w/cluster-1w throughput: {ratio:.2f}")
    if use_nginx:
        ratio = medians["nginx-2w"].rps / medians["nginx-1w"].rps
        print(f"nginx-2w/nginx-1w throughput: {ratio:.2f}")
    added = fixed["cluster-1w"].p50_ms - fixed["single"].p50_ms
    added99 = fixed["cluster-1w"].p99_ms - fixed["single"].p99_ms
    print(
        f"added p50 of cluster mode (cluster-1w vs single at {args.rate:g} req/s):"
        f" {added:+.2f} ms; p99 {added99:+.2f} ms"
    )
    print(f"errors: {errors}")
    return errors


# --- hard_limit across two replicas under skewed traffic ------------------------------


def serve_counter(port: int, delay_ms: float) -> None:
    """The skew part's machine: holds each request ``delay_ms``; counts the requests it
    serves at once. ``GET /__stats`` (asked directly, not through a proxy) answers the
    figures since the previous ask and starts over."""
    from aiohttp import web

    state = {"now": 0, "most": 0, "arrivals": 0, "over": 0}
    level_since = [time.monotonic()]
    time_at: dict[int, float] = {}

    def level_changes() -> None:
        now = time.monotonic()
        time_at[state["now"]] = time_at.get(state["now"], 0.0) + now - level_since[0]
        level_since[0] = now

    limit = [0]

    async def handle(request: web.Request) -> web.Response:
        level_changes()
        state["now"] += 1
        state["arrivals"] += 1
        state["most"] = max(state["most"], state["now"])
        if limit[0] and state["now"] > limit[0]:
            state["over"] += 1
        try:
            await asyncio.sleep(delay_ms / 1000)
        finally:
            level_changes()
            state["now"] -= 1
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        level_changes()
        limit[0] = int(request.query.get("limit", "0"))
        doc = {**state, "time_at": {str(k): v for k, v in sorted(time_at.items())}}
        state.update(most=state["now"], arrivals=0, over=0)
        time_at.clear()
        return web.json_response(doc)

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/__stats", stats)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


@contextlib.contextmanager
def _counter(port: int, delay_ms: float) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-counter", str(port), str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the counting backend failed to start")
        yield
    finally:
        _reap(proc, 10)


def _counter_stats(port: int, limit: int) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/__stats?limit={limit}"
    with urlopen_direct(url, 5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def skew(args: argparse.Namespace, redis_url: str) -> int:
    """Two replicas, one machine, hard_limit ``--skew-limit``; clients split unevenly."""
    limit, total = args.skew_limit, args.skew_clients
    backend_port = _free_port()
    prefix = f"bench-skew-{uuid.uuid4().hex[:8]}"
    errors = 0
    with (
        tempfile.TemporaryDirectory(prefix="bench-skew-") as tmp,
        _counter(backend_port, args.skew_delay_ms),
        _emulator(tmp) as api,
        _autoscaler(tmp, "skew-a", backend_port, api, redis_url, None, limit, prefix) as (pa, _),
        _autoscaler(tmp, "skew-b", backend_port, api, redis_url, None, limit, prefix) as (pb, _),
    ):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        build = "compiled (mypyc)" if _compiled() else "pure Python"
        print(
            f"hard_limit {limit} on one machine (a backend holding each request"
            f" {args.skew_delay_ms:g} ms) behind 2 replicas; {total} closed-loop clients,"
            f" {args.duration:g} s per split; {build}; load average {load}"
        )
        print(
            f"{'split A/B':<10}{'clients':>9}{'req/s A':>9}{'req/s B':>9}{'max':>5}{'bound':>6}"
            f"{'arrivals>limit':>16}{'time>limit':>12}{'errors':>7}"
        )
        for split in args.skew_splits.split(","):
            share_a = float(split.split("/")[0]) / 100
            ca = max(1, min(total - 1, round(total * share_a)))
            cb = total - ca

            async def both(duration: float, ca: int = ca, cb: int = cb) -> tuple[Result, Result]:
                ra, rb = await asyncio.gather(
                    closed_loop(pa, duration, ca), closed_loop(pb, duration, cb)
                )
                return ra, rb

            # Warm-up: connections open, each replica has read the other's reports.
            asyncio.run(both(max(1.0, 4 * REPORT_S)))
            _counter_stats(backend_port, limit)  # starts the figures over
            ra, rb = asyncio.run(both(args.duration))
            doc = _counter_stats(backend_port, limit)
            errors += ra.errors + rb.errors
            time_at = {int(k): v for k, v in doc["time_at"].items()}
            spent = sum(time_at.values()) or 1.0
            over_time = sum(v for k, v in time_at.items() if k > limit) / spent
            over_arrivals = doc["over"] / max(1, doc["arrivals"])
            bound = limit + min(ca, cb, limit)
            print(
                f"{split:<10}{f'{ca}/{cb}':>9}{ra.rps:>9.0f}{rb.rps:>9.0f}{doc['most']:>5}"
                f"{bound:>6}{over_arrivals:>15.2%} {over_time:>11.2%}"
                f"{ra.errors + rb.errors:>7}",
                flush=True,
            )
            levels = ", ".join(f"{k}: {v / spent:.1%}" for k, v in sorted(time_at.items()))
            print(f"  time at each concurrency: {levels}", flush=True)
    return errors


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=1.0, help="cluster.lease_ttl_s")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per target")
    parser.add_argument("--connections", type=int, default=50, help="closed-loop connections")
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop requests/second")
    parser.add_argument("--no-throughput", action="store_true", help="failover only")
    parser.add_argument("--no-failover", action="store_true", help="throughput only")
    parser.add_argument("--no-skew", action="store_true", help="no hard_limit skew part")
    parser.add_argument("--skew-limit", type=int, default=8, help="the machine's hard_limit")
    parser.add_argument("--skew-clients", type=int, default=40, help="clients of both replicas")
    parser.add_argument("--skew-splits", default="90/10,50/50", help="client shares A/B")
    parser.add_argument("--skew-delay-ms", type=float, default=20.0, help="backend hold")
    return parser


def main() -> int:
    if sys.argv[1:2] == ["--serve-counter"]:
        serve_counter(int(sys.argv[2]), float(sys.argv[3]))
        return 0
    args = build_parser().parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server not found (Debian package redis-server)", file=sys.stderr)
        return 1
    errors = 0
    with redis_server() as url:
        if not args.no_throughput:
            errors = throughput(args, url)
        if not args.no_failover:
            print()
            times = asyncio.run(measure(url, args.kills, args.ttl, args.replicas))
            print(
                f"lease_ttl_s {args.ttl:g}, {args.replicas} replicas, {len(times)} kills:"
                f" failover min {min(times):.3f} s, median {statistics.median(times):.3f} s,"
                f" max {max(times):.3f} s (bound {2 * args.ttl:g} s)"
            )
        if not args.no_skew:
            print()
            errors += skew(args, url)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

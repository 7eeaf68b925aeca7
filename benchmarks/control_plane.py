"""The control plane at scale: 1,000 apps of 10 machines on one autoscaler process.

    .venv/bin/python benchmarks/control_plane.py [--apps 1000] [--busy 100] [--machines 10]
                                                 [--duration 90] [--baseline 30] [--rate 200]
                                                 [--no-rate-limits] [--split [--decider-nice N]]

Starts, each as its own process on 127.0.0.1:

1. the emulator (``autoscaler.emulator.Emulator``), with ``--apps`` apps of ``--machines``
   stopped machines each and Fly's documented rate limits on (``--no-rate-limits``: off);
   the benchmark starts 1 machine in each of the ``--busy`` apps with traffic, 2 in every
   fourth one (each started machine is a real demo-app process);
2. the autoscaler (``autoscaler run``) with every app configured (a generated config in a
   temporary directory): the busy apps keep their machines (``min_machines`` =
   ``max_machines`` = what was started, so the fleet holds still), the others sleep.

With ``--split``, the control plane runs in a process of its own (cluster mode): a
redis-server on a loopback port, a replica that decides (``cluster.lead: true``) and gets
no traffic, and a proxy-only replica (``cluster.lead: false``) that gets all of it; the
figures below are then the proxy-only replica's, and the deciding replica's CPU is
reported beside them.

Then, for ``--duration`` seconds, it sends ``--rate`` requests a second (open loop, spread
over the busy apps), each one alternately straight to a machine and through the proxy, and
reads:

- **control work**: the autoscaler's CPU seconds per second, minus the same figure for a
  second autoscaler process that serves the same traffic with the busy apps configured as
  static backends and no app to scale (``--baseline`` seconds, same run): what is left is
  the controller's (its loops, API calls and decisions). Goal: under 0.10 (10 % of a core).
- **API calls per minute** per sleeping and per busy app, counted in the emulator (every
  request names its app once), after a warm-up in which every app is read once; and the
  shortest time from one call for a sleeping app to the next, over the calls made in the
  measured window (the one before may be from the warm-up). Goal: at most 1 a minute per
  sleeping app (a shortest gap of 60 s or more says it for every app, whatever the window;
  start-up, when a first read that timed out is tried again at the next tick, is left out).
- **the proxy's added p99**: p99 through the proxy minus p99 straight to the machines,
  measured on the same requests' schedule. Goal: under 2 ms.

Every child is stopped at the end, on error and on Ctrl-C or SIGTERM too; the emulator
kills its machine processes when it stops (and they die with it if it is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TOKEN = "bench-control-plane-token"  # noqa: S105 - a local emulator's token, not a secret
REPO = Path(__file__).resolve().parent.parent


def app_name(i: int) -> str:
    return f"app{i:04d}"


# --- the emulator (child process) -------------------------------------------------------


def serve_emulator(port: int, apps: int, machines: int, rate_limits: bool, stats: str) -> None:
    """The emulator with ``apps`` apps; SIGUSR1 writes, per app, when its requests came
    (``time.monotonic``, one clock for every process of the machine) to ``stats``."""
    from autoscaler import logs
    from autoscaler.config import EmulatorApp, EmulatorSettings
    from autoscaler.emulator import Emulator

    logs.configure(fmt="json", stream=sys.stderr, level="warning")
    settings = EmulatorSettings(
        token=TOKEN,
        rate_limits=rate_limits,
        apps=[EmulatorApp(name=app_name(i), machines=machines) for i in range(apps)],
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        calls: dict[str, list[float]] = {}

        def dump() -> None:
            Path(stats).write_text(json.dumps(calls))
            print("stats", flush=True)

        loop.add_signal_handler(signal.SIGUSR1, dump)
        async with Emulator(settings, HOST, port) as emu:
            world = emu.world
            lookup = world.app

            # Every API request about an app looks the app up once (World.app): count there.
            def counted(name: str) -> Any:
                calls.setdefault(name, []).append(time.monotonic())
                return lookup(name)

            world.app = counted  # type: ignore[method-assign]
            print("ready", flush=True)
            await stop.wait()

    asyncio.run(main())


# --- orchestration --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after 30 s; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _emulator(args: argparse.Namespace, stats: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = _free_port()
    command = [sys.executable, __file__, "--serve-emulator", str(port), str(stats)]
    command += [f"--apps={args.apps}", f"--machines={args.machines}"]
    command += ["--no-rate-limits"] if args.no_rate_limits else []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the emulator failed to start")
        yield proc, f"http://{HOST}:{port}"
    finally:
        _stop(proc)


def _emulator_calls(proc: subprocess.Popen[str], stats: Path) -> dict[str, list[float]]:
    """When each app's API calls came so far, per app."""
    assert proc.stdout is not None
    proc.send_signal(signal.SIGUSR1)
    if proc.stdout.readline().strip() != "stats":
        raise RuntimeError("the emulator did not write its counts")
    calls: dict[str, list[float]] = json.loads(stats.read_text())
    return calls


@contextlib.contextmanager
def _autoscaler(
    config: dict[str, Any], tmp: Path, name: str, nice: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """``autoscaler run`` on ``config`` (at CPU priority ``nice``), yielded once /readyz
    answers 200."""
    import yaml

    from autoscaler.aio import urlopen_direct

    file = tmp / f"{name}.yaml"
    file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "FLY_API_TOKEN": TOKEN}
    command = [sys.executable, "-m", "autoscaler", "run", "--config", str(file)]
    if nice:
        command = ["nice", "-n", str(nice), *command]  # nice execs it: the same pid
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail() -> str:
        log.flush()
        lines = (tmp / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-20:])

    try:
        admin = f"http://{config['admin']['listen']}/readyz"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"autoscaler {name} exited:\n{tail()}")
            with contextlib.suppress(OSError), urlopen_direct(admin, 2) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"autoscaler {name} not ready within 120 s:\n{tail()}")
            time.sleep(0.2)
        yield proc
    finally:
        _stop(proc)
        log.close()
        _report_failed_ticks(tmp / f"{name}.log", name)


def _report_failed_ticks(path: Path, name: str) -> None:
    """How many ticks failed in the run, and the first one: a failed tick is read again at
    the next, so failures show in the API calls of sleeping apps."""
    lines = path.read_text(errors="replace").splitlines()
    failed = [line for line in lines if "tick_failed" in line or "tick_crashed" in line]
    print(
        f"failed ticks ({name}): {len(failed)}" + (f"; first: {failed[0][:300]}" if failed else "")
    )


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Busy:
    name: str
    host: str
    machines: list[str]  # "ip:port" of its started machines


async def _start_busy(url: str, names: list[str]) -> list[Busy]:
    """Start 1 machine of each app (2 of every fourth), a few at a time."""
    from autoscaler.fly.client import MachinesClient

    out: list[Busy] = []
    sem = asyncio.Semaphore(8)  # each start spawns a Python process: not all at once
    async with MachinesClient(url, TOKEN, rate_limit=False) as api:

        async def one(i: int, name: str) -> Busy:
            async with sem:
                listed = await api.list_machines(name)
                chosen = listed[: 2 if i % 4 == 0 else 1]
                for m in chosen:
                    await api.start_machine(name, m.id)
                for m in chosen:
                    await api.wait_for_machine_state(name, m.id, "started", timeout_s=120)
                return Busy(name, f"{name}.bench", [f"{m.private_ip}:8080" for m in chosen])

        out = list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))
    return out


def _config(
    args: argparse.Namespace, url: str, busy: list[Busy], proxy: int, admin: int, *, static: bool
) -> dict[str, Any]:
    apps: list[dict[str, Any]] = []
    busy_by_name = {b.name: b for b in busy}
    for i in range(args.apps):
        name = app_name(i)
        b = busy_by_name.get(name)
        if static:
            if b is not None:
                apps.append({"name": name, "hosts": [b.host], "backends": b.machines})
            continue
        app: dict[str, Any] = {"name": name, "hosts": [f"{name}.bench"]}
        if b is not None:
            app.update(min_machines=len(b.machines), max_machines=len(b.machines))
        apps.append(app)
    return {
        "fly": {"api_url": url},
        "proxy": {"listen": f"{HOST}:{proxy}"},
        "admin": {"listen": f"{HOST}:{admin}"},
        "apps": apps,
    }


@dataclass
class Latencies:
    direct: list[float]
    proxied: list[float]
    errors: int


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _traffic(busy: list[Busy], proxy_port: int, rate: float, duration: float) -> Latencies:
    """``rate`` requests a second, open loop, round robin over the busy apps; each one goes
    straight to the app's machine and through the proxy, one after the other in turn."""
    import aiohttp

    out = Latencies([], [], 0)
    proxy = f"http://{HOST}:{proxy_port}/"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str, host: str | None, into: list[float]) -> None:
            start = time.perf_counter()
            try:
                headers = {"Host": host} if host else None
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        out.errors += 1
                        return
            except aiohttp.ClientError:
                out.errors += 1
                return
            into.append((time.perf_counter() - start) * 1000)

        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * duration)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            b = busy[i % len(busy)]
            machine = b.machines[(i // len(busy)) % len(b.machines)]
            if (i // len(busy)) % 2 == 0:
                tasks.append(asyncio.create_task(one(f"http://{machine}/", None, out.direct)))
            else:
                tasks.append(asyncio.create_task(one(proxy, b.host, out.proxied)))
        await asyncio.gather(*tasks)
    return out


def _compiled() -> bool:
    from autoscaler.proxy import server

    return not (server.__file__ or "").endswith(".py")


def _measure(
    proc: subprocess.Popen[Any], busy: list[Busy], proxy: int, rate: float, duration: float
) -> tuple[float, Latencies]:
    """CPU seconds per second of ``proc`` over a window of traffic, and the latencies."""
    cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
    lat = asyncio.run(_traffic(busy, proxy, rate, duration))
    return (_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0), lat


@contextlib.contextmanager
def _scaled(
    args: argparse.Namespace, url: str, busy: list[Busy], tmp: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, subprocess.Popen[bytes] | None]]:
    """The autoscaler that gets the traffic, its proxy port, and (``--split``) the
    process that decides for it."""
    proxy, admin = _free_port(), _free_port()
    config = _config(args, url, busy, proxy, admin, static=False)
    if not args.split:
        with _autoscaler(config, tmp, "scaled") as proc:
            yield proc, proxy, None
        return
    from cluster import redis_server  # benchmarks/cluster.py (this script's directory)

    with redis_server() as redis_url:
        decider = _config(args, url, busy, _free_port(), _free_port(), static=False)
        decider["cluster"] = {"redis_url": redis_url, "replica_id": "decider"}
        config["cluster"] = {"redis_url": redis_url, "replica_id": "proxy", "lead": False}
        # The decider leads once ready (nobody else may); the proxy-only replica is ready
        # once it routes with the decider's view.
        with (
            _autoscaler(decider, tmp, "decider", args.decider_nice) as control,
            _autoscaler(config, tmp, "scaled") as proc,
        ):
            yield proc, proxy, control


def run(args: argparse.Namespace) -> int:
    from autoscaler import logs

    logs.configure(level="warning", fmt="console")  # the client's own lines: errors only
    names = [app_name(i) for i in range(args.apps)]
    busy_names = names[: args.busy]
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp_name:
        tmp = Path(tmp_name)
        stats = tmp / "emulator-stats.json"
        with _emulator(args, stats) as (emu, url):
            t = time.perf_counter()
            busy = asyncio.run(_start_busy(url, busy_names))
            started = sum(len(b.machines) for b in busy)
            print(
                f"emulator: {args.apps} apps x {args.machines} machines, rate limits "
                f"{'off' if args.no_rate_limits else 'on'}; {started} machines started in "
                f"{len(busy)} busy apps ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
            with _scaled(args, url, busy, tmp) as (proc, proxy, control):
                time.sleep(args.warmup)  # every app read once; the sleeping ones settle
                t0 = time.monotonic()
                control_cpu0 = _cpu_seconds(control.pid) if control else 0.0
                cpu, lat = _measure(proc, busy, proxy, args.rate, args.duration)
                t1 = time.monotonic()
                control_cpu = (
                    (_cpu_seconds(control.pid) - control_cpu0) / (t1 - t0) if control else 0
                )
                times = _emulator_calls(emu, stats)
            proxy, admin = _free_port(), _free_port()
            config = _config(args, url, busy, proxy, admin, static=True)
            with _autoscaler(config, tmp, "static") as proc:
                time.sleep(2)
                cpu_base, lat_base = _measure(proc, busy, proxy, args.rate, args.baseline)

    minutes = (t1 - t0) / 60
    calls = {n: sum(1 for t in times.get(n, ()) if t0 <= t < t1) for n in names}
    sleeping = [calls[n] / minutes for n in names[args.busy :]]
    gaps = [
        b - a
        for n in names[args.busy :]
        for a, b in itertools.pairwise(times.get(n, ()))  # nobody else calls about them
        if b >= t0
    ]
    busy_calls = [calls[n] / minutes for n in busy_names]
    control = cpu - cpu_base
    where = "the proxy-only replica" if args.split else "the autoscaler"
    p99_direct, p99_proxied = _percentile(lat.direct, 0.99), _percentile(lat.proxied, 0.99)
    added = p99_proxied - p99_direct
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"autoscaler: {'compiled (mypyc)' if _compiled() else 'pure Python'} data path, "
        f"{os.cpu_count()} CPUs, load average {load}; traffic {args.rate:g} req/s over "
        f"{len(busy)} apps, {args.duration:g} s measured after {args.warmup:g} s of warm-up"
    )
    print(
        f"CPU of {where}: {cpu:.3f} s/s with {args.apps} apps, {cpu_base:.3f} s/s with "
        f"the busy apps static and nothing to scale ({args.baseline:g} s)"
    )
    if args.split:
        print(
            f"control work: {control:.3f} of a core in the proxy-only replica; the deciding "
            f"replica: {control_cpu:.3f} of a core (goal < 0.10 in all)"
        )
    else:
        print(f"control work: {control:.3f} of a core (goal < 0.10)")
    print(
        f"API calls per minute, sleeping apps: mean {sum(sleeping) / len(sleeping):.2f}, "
        f"max {max(sleeping):.2f} (goal <= 1), shortest gap between two calls of one "
        f"sleeping app {min(gaps, default=math.inf):.1f} s (goal >= 60); busy apps: mean "
        f"{sum(busy_calls) / len(busy_calls):.1f}, max {max(busy_calls):.1f}; "
        f"all apps: {sum(calls.values()) / minutes:.0f}/min"
    )
    print(
        f"latency p50/p99 ms: direct {_percentile(lat.direct, 0.5):.2f}/{p99_direct:.2f}, "
        f"proxied {_percentile(lat.proxied, 0.5):.2f}/{p99_proxied:.2f}; proxy added p99 "
        f"{added:+.2f} ms (goal < 2 ms); baseline run: direct p99 "
        f"{_percentile(lat_base.direct, 0.99):.2f}, proxied p99 "
        f"{_percentile(lat_base.proxied, 0.99):.2f}"
    )
    errors = lat.errors + lat_base.errors
    print(f"errors: {errors} ({len(lat.direct) + len(lat.proxied)} requests measured)")
    return 0 if errors == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=1000, help="apps in the emulator")
    parser.add_argument("--busy", type=int, default=100, help="of which with traffic")
    parser.add_argument("--machines", type=int, default=10, help="machines per app")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/second in all")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds measured")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds of the baseline")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--no-rate-limits", action="store_true", help="emulator without 429s")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the control plane in a process of its own (cluster mode, a redis-server)",
    )
    parser.add_argument(
        "--decider-nice",
        type=int,
        default=0,
        help="with --split: the deciding replica's nice value (10: the kernel prefers the"
        " proxy when both want the CPU)",
    )
    parser.add_argument("--serve-emulator", nargs=2, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.serve_emulator:
        port, stats = args.serve_emulator
        serve_emulator(int(port), args.apps, args.machines, not args.no_rate_limits, stats)
        return 0
    if not 0 < args.busy < args.apps:
        parser.error("expected 0 < --busy < --apps")
    # SIGTERM as Ctrl-C: unwind through the context managers, which stop every child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

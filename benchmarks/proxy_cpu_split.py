"""Where a proxied request's CPU goes: user and kernel time of each process, per request.

    .venv/bin/python benchmarks/proxy_cpu_split.py [--rounds 3] [--duration 5]

Starts the same servers as ``proxy_overhead.py`` (the aiohttp backend, the proxy with its
access log on, and nginx when installed), drives each target in turn with
``wrk -t2 -c50`` and reads the user and system CPU time of the process in front and of
the backend from ``/proc/<pid>/stat`` around each run. Needs wrk and Linux; loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from contextlib import ExitStack

import proxy_overhead as po


def _cpu(pid: int) -> tuple[int, int]:
    """User and system clock ticks of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _wrk(port: int, duration: int, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", f"http://{po.HOST}:{port}/"],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"no request count in wrk's output:\n{out}")
    return int(match.group(1))


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if shutil.which("wrk") is None or not os.path.exists("/proc/self/stat"):
        print("needs wrk and Linux's /proc", file=sys.stderr)
        return 2
    tick = os.sysconf("SC_CLK_TCK")
    backend_port, proxy_port, nginx_port = po._free_port(), po._free_port(), po._free_port()
    with ExitStack() as stack:
        backend = stack.enter_context(po._child(["--serve", "backend", str(backend_port)]))
        proxy = stack.enter_context(
            po._child(["--serve", "proxy", str(proxy_port), str(backend_port), "log"])
        )
        targets = [("direct", backend_port, None), ("proxied", proxy_port, proxy.pid)]
        if shutil.which("nginx"):
            nginx = stack.enter_context(po._nginx(nginx_port, backend_port))
            targets.append(("nginx", nginx_port, nginx.pid))
        for _, port, _ in targets:  # warm-up
            _wrk(port, 1, 10)
        print(
            f"{'target':<8} {'req/s':>7} {'front user':>11} {'front sys':>10}"
            f" {'backend user':>13} {'backend sys':>12}   (CPU us a request)"
        )
        for _ in range(args.rounds):
            for name, port, front in targets:
                before = {pid: _cpu(pid) for pid in (backend.pid, front) if pid is not None}
                requests = _wrk(port, args.duration, args.connections)
                per_request = {
                    pid: [
                        (b - a) / tick / requests * 1e6
                        for a, b in zip(ticks, _cpu(pid), strict=True)
                    ]
                    for pid, ticks in before.items()
                }
                front_cost = per_request.get(front) if front is not None else None
                user, system = (f"{x:.1f}" for x in front_cost) if front_cost else ("-", "-")
                print(
                    f"{name:<8} {requests / args.duration:>7.0f} {user:>11} {system:>10}"
                    f" {per_request[backend.pid][0]:>13.1f} {per_request[backend.pid][1]:>12.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

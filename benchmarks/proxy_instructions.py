"""Proxy cost in instructions: what one request costs the backend and the proxy, counted.

    .venv/bin/python benchmarks/proxy_instructions.py [--requests 4000] [--connections 10]

Wall-clock figures on a shared VM drift by up to 1.5x within minutes (docs/benchmarks.md);
instruction counts do not. This runs the two servers of ``proxy_overhead.py`` (a minimal
aiohttp backend and the proxy in static mode in front of it, on 127.0.0.1), each in turn
under valgrind's callgrind, sends a warm-up, zeroes the counters, sends ``--requests``
requests over ``--connections`` keep-alive connections, and reads the count. It prints the
instructions per request of the backend answering directly (the baseline), and of the
proxy with its access log on and off, with their ratios to the baseline.

Counted: the process's own instructions in user space (the interpreter, compiled modules,
libraries). Not counted: the kernel's side of its system calls, which the proxy makes twice
as many of as the backend (a read and a write on each side), nor cache misses. Needs
valgrind (Debian package ``valgrind``). About a minute per server.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The sibling script (its folder is sys.path[0] when this one runs).
from proxy_overhead import HOST, _child, _compiled, _free_port

REQUEST = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def send(port: int, requests: int, connections: int) -> None:
    """``requests`` GETs, one at a time on each of ``connections`` keep-alive connections."""
    failures: list[BaseException] = []

    def one_connection(count: int) -> None:
        try:
            with socket.create_connection((HOST, port), timeout=60) as sock:
                for _ in range(count):
                    sock.sendall(REQUEST)
                    _read_response(sock)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    share, extra = divmod(requests, connections)
    threads = [
        threading.Thread(target=one_connection, args=(share + (i < extra),))
        for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} connections failed: {failures[0]!r}")


def _read_response(sock: socket.socket) -> None:
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        data += _recv(sock)
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < end + 4 + length:
        data += _recv(sock)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed before the response was whole")
    return chunk


def _callgrind(pid: int, *options: str) -> None:
    subprocess.run(
        ["callgrind_control", *options, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _total(directory: str) -> int:
    """The instruction count of the one dump callgrind_control wrote into ``directory``."""
    for path in Path(directory).glob("out.cg.*"):  # out.cg.1: the first dump
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump found in {directory}")


def count(measured: str, access_log: bool, requests: int, connections: int) -> float:
    """Instructions per request of ``measured`` ("backend" or "proxy")."""
    backend_port, proxy_port = _free_port(), _free_port()
    log = "log" if access_log else "nolog"
    with tempfile.TemporaryDirectory() as directory:
        callgrind = [
            "valgrind",
            "--quiet",
            "--tool=callgrind",
            f"--callgrind-out-file={directory}/out.cg",
        ]
        with (
            _child(
                ["--serve", "backend", str(backend_port)],
                callgrind if measured == "backend" else (),
            ) as backend,
            _child(
                ["--serve", "proxy", str(proxy_port), str(backend_port), log],
                callgrind if measured == "proxy" else (),
            ) as proxy,
        ):
            pid, port = (
                (backend.pid, backend_port) if measured == "backend" else (proxy.pid, proxy_port)
            )
            send(port, max(200, requests // 10), connections)  # warm-up: caches, pools
            _callgrind(pid, "--zero")
            send(port, requests, connections)
            _callgrind(pid, "--dump")
            return _total(directory) / requests


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests counted")
    parser.add_argument("--connections", type=int, default=10, help="keep-alive connections")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        print(f"needs {' and '.join(missing)} (Debian package valgrind)", file=sys.stderr)
        return 2
    data_path = "compiled (mypyc)" if _compiled() else "pure Python"
    print(
        f"instructions per request (callgrind), {args.requests} requests over "
        f"{args.connections} connections on {HOST}; proxy data path {data_path}"
    )
    baseline = count("backend", True, args.requests, args.connections)
    print(f"{'backend, direct (baseline)':<28} {baseline / 1000:8.1f}k")
    for access_log in (True, False):
        cost = count("proxy", access_log, args.requests, args.connections)
        name = f"proxy, access log {'on' if access_log else 'off'}"
        print(f"{name:<28} {cost / 1000:8.1f}k  ({cost / baseline:.2f}x the backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

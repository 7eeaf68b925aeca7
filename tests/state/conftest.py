"""A real redis-server for the cluster tests: one for the package, on a free loopback port,
nothing written to disk, reaped at the end. Each test keeps to its own key prefix. And
load reports that outlive a stalled test (``reports_outlive_any_stall``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from autoscaler.state import cluster


def _free_port() -> int:
    # redis-server cannot pick port 0 itself: ask the kernel for one, then hand it over.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_binary() -> str:
    """redis-server's path; fails (not skips) under CI when it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server not found (Debian package `redis-server`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the CI image must provide it")
        pytest.skip(reason)
    return binary


NO_DISK = ("--save", "", "--appendonly", "no")


class RedisServer:
    """One redis-server on a fixed loopback port that a test may stop and start again."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"), *NO_DISK],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="package")
def redis_server() -> Iterator[str]:
    """The URL of a running redis-server shared by this package's tests (gone before other
    packages run: some check that the test process has no child left)."""
    server = RedisServer(redis_binary())
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and start (outages)."""
    server = RedisServer(redis_binary())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def reports_outlive_any_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load report lives an hour, not ``REPORT_TTL_S`` (2 s of real time, Redis's
    PEXPIRE): a loaded machine that stalled a test for 2 s between a write and a read
    that counts it (a follower's load or peaks the leader decides on) lost the report,
    and the test failed. The tests that use it wait for no report to expire: a replica's
    death is played by deleting its report, as Redis does when the TTL runs out.
    (``cluster`` reads the constant at each call, and is not compiled: setup.py.)"""
    monkeypatch.setattr(cluster, "REPORT_TTL_S", 3600.0)

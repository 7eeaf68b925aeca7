"""A real redis-server for the cluster tests: one per session, on a free loopback port,
nothing written to disk, reaped at the end. Each test keeps to its own key prefix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest


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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The URL of a running redis-server; fails (not skips) under CI when it is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server not found (Debian package `redis-server`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the CI image must provide it")
        pytest.skip(reason)
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def key_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"

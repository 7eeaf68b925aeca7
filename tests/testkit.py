"""Helpers every test directory shares (``tests/`` is on ``sys.path``: ``from testkit import``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import tomllib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest

from autoscaler.config import EmulatorSettings

REPO = Path(__file__).resolve().parents[1]


async def until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``condition()``, a cheap in-process check, until it holds; fail after ``timeout_s``.

    For states that fire no event when they move (a counter of the view, a record of the
    emulator). It asserts a state, never a duration.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


class SlowToEnd:
    """A task that takes its time to end once cancelled: it catches the first
    cancellation (``cancelled`` is set) and ends at the next one, or once ``release`` is
    set. A stop that cancelled it and waits for its end is held there until then: the
    window in which a cancellation of that stop must not be swallowed with the task's."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.task: asyncio.Task[None] = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            await self.release.wait()
            raise

    async def end(self) -> None:
        """End it, wherever it is (a test's clean-up)."""
        self.release.set()
        self.task.cancel()
        await asyncio.wait([self.task])

    async def cut_short(self, stop: Coroutine[Any, Any, object]) -> asyncio.Future[object]:
        """Run ``stop`` (which cancels this task and waits for its end), cancel it in that
        wait, as a second SIGTERM would, and return it once it has ended; this task is
        ended after."""
        stopping = asyncio.ensure_future(stop)
        try:
            await self.cancelled.wait()  # the stop cancelled it and waits for its end
            stopping.cancel()  # the stop cut short
            await asyncio.wait([stopping])
        finally:
            await self.end()
        return stopping


def signal_on_import(module: str, sig: str) -> str:
    """A ``python -c`` program that runs the ``autoscaler`` command (its arguments after
    ``-c PROGRAM``) as its console script does, through the entry pyproject.toml declares,
    and sends itself ``sig`` (a name, such as "SIGTERM") the moment it first imports
    ``module``. autoscaler.cli is what the entry imports first; autoscaler.logs is
    cli.main()'s first import of its own (for its logging), while the command still
    imports, long before an event loop has its handlers; uvloop is imported by
    service.run_event_loop, right after `autoscaler run` logged `config_loaded`, before
    Service.run has its handlers."""
    with (REPO / "pyproject.toml").open("rb") as f:
        entry = tomllib.load(f)["project"]["scripts"]["autoscaler"]
    entry_module, _, function = entry.partition(":")
    return f"""
import os, signal, sys

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, SignalOnImport())
from {entry_module} import {function}
sys.exit({function}())
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on now (connections to it are refused).

    For programs that cannot report the port they bound (Prometheus, a child process); the
    race with another binder is on loopback only. ``host`` may be ::1.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ipv6_loopback() -> bool:
    """Whether this machine has ::1 to bind (a container may have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


NEEDS_IPV6_LOOPBACK = pytest.mark.skipif(
    not _ipv6_loopback(), reason="no IPv6 loopback on this machine"
)


# Parameters of an ``emulator_settings`` fixture whose tests run on both timing profiles;
# the fly variants are marked (CI's compiled run leaves them out).
PROFILES = ["fast", pytest.param("fly", marks=pytest.mark.fly_profile)]


def on_profile(settings: EmulatorSettings, profile: str, **update: Any) -> EmulatorSettings:
    """``settings`` on the named timing profile ("fast" or "fly"), with ``update``."""
    base = settings if profile == "fast" else fly_like(settings)
    return base.model_copy(update=update)


def fly_like(settings: EmulatorSettings) -> EmulatorSettings:
    """``settings`` with the emulator's ``fly`` timing profile: resumes of a few hundred ms,
    cold starts of about 2 s, suspends of up to 18 s (docs/emulator.md); and Fly's rate
    limits, as ``autoscaler emulator --profile fly`` has them (a 429 is Fly's answer too)."""
    return settings.model_copy(
        update={
            "profile": "fly",
            "demo_boot_delay_s": None,
            "resume_delay_s": None,
            "rate_limits": True,
        }
    )


@contextlib.asynccontextmanager
async def canned_http(
    host: str, answer: bytes, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server on ``host`` (loopback; over TLS with ``tls``) that reads one request head
    per connection, records it and writes ``answer``, whole; yields its port and the heads
    it read."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, host, 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        await server.wait_closed()


FIGURES_ENV = "AUTOSCALER_RELIABILITY_FIGURES"
FIGURES_OUTPUT = "reliability_figures"
"""Where a pytest-xdist worker hands its reliability figures to the controller."""
FIGURE_DOCUMENTS = pytest.StashKey[list[Any]]()
"""The reliability figures of each process that ran some of those tests (the controller's
stash: from its workers; without workers, the process's own)."""


def report_figures(terminalreporter: Any, config: pytest.Config, documents: Iterable[Any]) -> None:
    """The reliability suite's figures (one document per process that ran some of its
    tests) merged, written as JSON to ``$AUTOSCALER_RELIABILITY_FIGURES`` (default:
    ``reliability-figures.json`` in pytest's base temp directory) and printed."""
    merged: dict[str, Any] = {"soak": False, "tests": {}}
    for doc in documents:
        merged["soak"] = merged["soak"] or doc["soak"]
        merged["tests"].update(doc["tests"])
    if not merged["tests"]:
        return
    default = Path(str(config._tmp_path_factory.getbasetemp())) / "reliability-figures.json"  # type: ignore[attr-defined]
    path = Path(os.environ.get(FIGURES_ENV) or default)
    text = json.dumps(merged, indent=2, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(f"written to {path}")
    terminalreporter.write_line(text)

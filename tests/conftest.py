"""Shared fixtures: a live emulator, and a session-wide check that no process is left.

Override ``emulator_settings`` in a test module to change what ``emulator`` starts with
(faults, rate limits, start-up apps); the defaults are fast and have rate limits off.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from testkit import FIGURE_DOCUMENTS, FIGURES_OUTPUT, report_figures

from autoscaler import logs
from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.procs import SESSION_ENV, leftovers, pid_alive

# No timing asserts: Hypothesis's per-example deadline and its "too slow" check measure
# this machine's load, not our code. In CI (.ci/run sets CI) Hypothesis loads its own "ci"
# profile, which turns both off too and draws the same examples on every run.
if settings.get_current_profile_name() != "ci":
    settings.register_profile(
        "autoscaler", deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("autoscaler")


@pytest.fixture
def refused_port() -> Iterator[Callable[[], int]]:
    """Loopback ports that refuse connections for the whole test, one a call: each bound,
    never listened on, until the test ends, so that no server of the test is given it, as
    it can be given one of ``free_port``'s (a proxy on port 0 given a dead backend's port
    answered its own requests, its Via header twice)."""
    with contextlib.ExitStack() as held:

        def take() -> int:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

        yield take


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(
        listen="127.0.0.1:4280",  # ignored: the fixture binds an ephemeral port
        demo_boot_delay_s=0.05,
        resume_delay_s=0.0,
        boot_timeout_s=20.0,
        rate_limits=False,  # a test that wants Fly's limits turns them on
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/reliability: pytest registers a sub-directory's options only when
    # that directory is named on the command line.
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the reliability tests at soak length (same as AUTOSCALER_SOAK=1)",
    )


@pytest.hookimpl(trylast=True)  # after ``-m`` has deselected what it leaves out
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``one_profile`` runs on one timing profile per run: Fly's when the run
    includes them, else the fast one (CI's compiled run, ``-m "not fly_profile"``). These
    are the longest end-to-end runs; their fast twin adds minutes to a run that has the
    Fly-like one, whose races are the ones production meets, and nothing else."""
    flys = {_twin_key(item) for item in items if _profile(item) == "fly"}
    twins = [
        item
        for item in items
        if item.get_closest_marker("one_profile") is not None
        and _profile(item) == "fast"
        and _twin_key(item) in flys
    ]
    if twins:
        left_out = set(twins)
        config.hook.pytest_deselected(items=twins)
        items[:] = [item for item in items if item not in left_out]


def _profile(item: pytest.Item) -> object:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("emulator_settings")


def _twin_key(item: pytest.Item) -> tuple[object, ...]:
    """The test and its parameters other than the timing profile."""
    callspec = getattr(item, "callspec", None)
    params = {} if callspec is None else callspec.params
    others = sorted((k, repr(v)) for k, v in params.items() if k != "emulator_settings")
    return (item.path, item.originalname if isinstance(item, pytest.Function) else "", *others)


@pytest.fixture
async def emulator(emulator_settings: EmulatorSettings) -> AsyncIterator[Emulator]:
    """A started emulator on 127.0.0.1 and an ephemeral port; every child reaped after."""
    async with Emulator(emulator_settings, host="127.0.0.1", port=0) as emu:
        yield emu
    alive = [pid for pid in emu.spawned_pids() if pid_alive(pid)]
    assert not alive, f"machine processes outlived the emulator: {alive}"


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """No exception stays "being handled" after a test. mypyc's coroutines leave one
    behind when an ``await`` runs in a ``finally`` while an exception passes through
    (a bug of the compiled build, not of Python): every later exception then chains to
    it, and the chain, with its tracebacks, grows for as long as the proxy runs.

    A hook, not a fixture: a fixture's teardown runs in its generator's own exception
    state, so it could see the leftover but not clear it.
    """
    left = sys.exc_info()[1]
    if left is not None:
        # Cleared, so that one leak fails one test rather than every test after it.
        ctypes.pythonapi.PyErr_SetHandledException(ctypes.py_object(None))
        pytest.fail(f"an exception was left as being handled: {left!r}")


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """Each test starts with logging as configured at start-up (debug, so that
    ``capture_logs`` sees every level), not as an earlier test left it."""
    logs.configure(level="debug", fmt="json", stream=sys.stderr)


@pytest.fixture(autouse=True)
def _signal_mask_kept() -> Iterator[None]:
    """Fail a test that leaves signals blocked (or unblocked) in the worker: the processes
    later tests start there inherit the mask, and a machine or demo whose SIGTERM or SIGINT
    is blocked ignores its stop (``autoscaler.cli.main`` blocks them until ``Service.run``
    lets them through, so a test that calls it with a fake run must give them back)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    yield
    after = signal.pthread_sigmask(signal.SIG_SETMASK, before)
    if after != before:
        changed = sorted(signal.Signals(s).name for s in after ^ before)
        pytest.fail(f"the test changed the signal mask ({', '.join(changed)})", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left() -> Iterator[None]:
    """Fail the session if any child process (or emulator machine) outlives the tests."""
    # Inherited by CLI subprocesses and passed on to their machines, so those are found too.
    os.environ[SESSION_ENV] = str(os.getpid())
    yield
    left = leftovers(os.getpid())
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        listing = "; ".join(f"{pid}: {cmd}" for pid, cmd in left)
        pytest.fail(f"processes left after the test session: {listing}", pytrace=False)


# The suite runs on pytest-xdist's workers (pyproject's addopts); the reliability tests'
# figures are gathered here, on the controller, from each worker's output
# (tests/reliability/conftest.py, ``pytest_sessionfinish``).
@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    text = getattr(node, "workeroutput", {}).get(FIGURES_OUTPUT)
    if text:
        node.config.stash.setdefault(FIGURE_DOCUMENTS, []).append(json.loads(text))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    documents = config.stash.get(FIGURE_DOCUMENTS, [])
    if documents:
        report_figures(terminalreporter, config, documents)

"""Fixtures of the reliability suite: soak length, figures, a log capture scanned for secrets.

``AUTOSCALER_SOAK=1`` (or ``--soak``) runs the long versions (item 1 for its full two
minutes, more rounds elsewhere). Every test records what it did in ``figures``; at the end
of the session they are written as JSON to ``$AUTOSCALER_RELIABILITY_FIGURES`` (default:
``reliability-figures.json`` in pytest's base temp directory) and printed in the summary.

Every test of this directory runs with logging configured as the service does it (JSON
lines, debug level) into a buffer, plus a copy of each event before the redactor ran; after
the test, no known secret may appear in either, and no line that only a crash writes
(an unretrieved task exception, a crashed control loop, a handler that raised).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from pydantic import SecretStr
from structlog.typing import EventDict, WrappedLogger
from testkit import FIGURE_DOCUMENTS, FIGURES_OUTPUT, PROFILES, on_profile

from autoscaler import logs
from autoscaler.config import EmulatorApp, EmulatorSettings

from .harness import APP, FLY_TOKEN, Figures, LogCapture

_FIGURES = pytest.StashKey[Figures]()


def _soak(config: pytest.Config) -> bool:
    # --soak is registered by tests/conftest.py: pytest reads a sub-directory's options
    # only when that directory is named on the command line.
    return bool(config.getoption("--soak")) or os.environ.get("AUTOSCALER_SOAK") == "1"


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    return _soak(request.config)


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Figures:
    stash = request.config.stash
    if _FIGURES not in stash:
        stash[_FIGURES] = Figures(soak=_soak(request.config))
    return stash[_FIGURES]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Hand the figures to the process that reports them (tests/conftest.py): on a
    pytest-xdist worker, to the controller; without workers, to this process's own."""
    config = session.config
    found = config.stash.get(_FIGURES, None)
    if found is None or not found.sections:
        return
    output = getattr(config, "workeroutput", None)
    if output is not None:
        output[FIGURES_OUTPUT] = json.dumps(found.document())
    else:
        config.stash.setdefault(FIGURE_DOCUMENTS, []).append(found.document())


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """The shared ``emulator`` fixture's defaults, plus a known token (the scans look for
    it) and app ``web``; every test runs with the fast timings and with Fly's (suspends of
    seconds, cold starts of about 2 s), where the races production meets are open (the
    longest, marked ``one_profile``, on Fly's alone when the run includes them). A module
    that wants other apps overrides this in turn."""
    return on_profile(
        emulator_settings,
        request.param,
        token=SecretStr(FLY_TOKEN),
        apps=[EmulatorApp(name=APP, machines=2)],
    )


class _Raw(logging.Handler):
    """Standard-library records as the code wrote them (before any formatting)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.msg!r} {record.args!r} {record.exc_text or ''}")


@pytest.fixture(autouse=True)
def log_capture() -> Iterator[LogCapture]:
    """Every log line of the test, rendered and raw; fails the test if a secret shows."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    capture = LogCapture(out)
    logs.configure(level="debug", fmt="json", stream=out)

    def record(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        capture.raw.append(repr(event))
        return event

    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[processors[0], record, *processors[1:]])
    root.addHandler(_Raw(capture.raw))
    # httpcore's per-byte trace lines drown a failure's report and say nothing of ours.
    wire = logging.getLogger("httpcore")
    wire_level = wire.level
    wire.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        wire.setLevel(wire_level)
        structlog.reset_defaults()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    capture.assert_no_secret()
    capture.assert_no_crash()

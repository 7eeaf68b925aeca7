"""The tokens never leave: not in /metrics, not in /status, not in any log line.

The live stack of test_prometheus.py (emulator + proxy + controller + admin) runs the same
traffic, with logging configured as the service does it (JSON lines, here at debug level so
that every line any part can write is written). Both the rendered output and the events as
they were before the redactor ran are searched: a token that only the redactor caught was
still handed to a logger, and that is a leak waiting for a new log path.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from structlog.typing import EventDict, WrappedLogger

from autoscaler import logs
from autoscaler.status import run_status

from .stack import ADMIN_TOKEN, APP, FLY_TOKEN, live_stack
from .test_prometheus import exercise

pytestmark = pytest.mark.timeout(120)
TOKENS = (FLY_TOKEN, ADMIN_TOKEN)


class _Raw(logging.Handler):
    """Standard-library records as the code wrote them (message and arguments)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.msg!r} {record.args!r}")


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, list[str]]]:
    """Rendered JSON lines, and every event before redaction; logging restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    raw: list[str] = []
    logs.configure(level="debug", fmt="json", stream=out)

    def record(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        raw.append(repr(event))
        return event

    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[processors[0], record, *processors[1:]])
    # Into ``raw`` as they come: the test reads it before this fixture's teardown.
    root.addHandler(_Raw(raw))
    try:
        yield out, raw
    finally:
        structlog.reset_defaults()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_no_token_in_metrics_status_or_logs(
    captured: tuple[io.StringIO, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out, raw = captured
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv("AUTOSCALER_ADMIN__TOKEN", ADMIN_TOKEN)  # for `autoscaler status`
    table = io.StringIO()
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with live_stack() as stack, aiohttp.ClientSession() as http:
        await exercise(stack, http)
        admin = f"http://{stack.admin_address}"
        async with http.get(f"{admin}/metrics", headers=auth) as resp:
            assert resp.status == 200
            metrics = await resp.text()
        async with http.get(f"{admin}/status", headers=auth) as resp:
            assert resp.status == 200
            status = await resp.text()
        async with http.get(f"{admin}/readyz", headers=auth) as resp:
            readyz = await resp.text()
        code = await asyncio.to_thread(
            run_status, admin, str(config), out=table, err=table, as_json=False
        )
        assert code == 0, table.getvalue()
        machine_ids = [m.id for m in stack.emulator.machines(APP)]
    # Label values stay bounded: no machine ids, paths or client addresses in /metrics.
    assert machine_ids
    for unbounded in [*machine_ids, "/work", "127.0.0.1"]:
        assert unbounded not in metrics, unbounded
    # The capture saw the traffic (so an empty capture cannot pass), in the lines issue 8
    # asks for: one per request with these fields, one per decision, one per API call.
    rendered = out.getvalue()
    events = [json.loads(line) for line in rendered.splitlines() if line.startswith("{")]
    requests = [e for e in events if e["event"] == "request"]
    assert requests
    fields = {"request_id", "app", "method", "path", "status", "duration_ms", "machine", "wake"}
    assert all(fields <= e.keys() for e in requests), requests[0]
    assert any(e["event"] == "decision" for e in events)
    assert any(e["event"] == "fly_api" for e in events)
    assert "autoscaler_requests_total" in metrics
    assert '"apps": [{"app": "demo"' in status
    assert f"{APP}: desired " in table.getvalue()
    for token in TOKENS:
        assert token not in metrics
        assert token not in status
        assert token not in readyz
        assert token not in table.getvalue()
        assert token not in rendered
        leaks = [line for line in raw if token in line]
        assert not leaks, f"token handed to a logger (redacted only by luck): {leaks[:3]}"

"""The demo, end to end: real requests through the proxy to real machine processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import free_port

from autoscaler.config import ConfigError
from autoscaler.demo import demo_settings, print_summary, run_demo
from autoscaler.emulator.procs import leftovers

pytestmark = pytest.mark.timeout(180)


async def test_short_demo_wakes_both_ways_and_ends_asleep() -> None:
    settings = demo_settings(None, machines=5)
    out = io.StringIO()
    summary = await run_demo(
        settings, duration_s=30, out=out, ports={"proxy": 0, "admin": 0, "emulator": 0}
    )
    assert summary is not None
    assert summary.errors == {}
    assert summary.requests > 100
    assert summary.wakes["start"] >= 1
    assert summary.wakes["resume"] >= 1
    assert summary.requests_waited.get("start", 0) >= 1
    assert summary.requests_waited.get("resume", 0) >= 1
    assert summary.final_states == {"suspended": 5}
    assert 0 < summary.machine_seconds < summary.always_on_seconds
    print_summary(summary, out)
    text = out.getvalue()
    for phase in ("burst", "steady", "visitor"):
        assert f"--- {phase}" in text
    assert "errors            none" in text
    assert "\x1b[" not in text, "no terminal escapes when the output is not a terminal"


def test_ctrl_c_stops_everything_and_leaves_no_process(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    builtin = (Path(__file__).parents[1] / "autoscaler" / "data" / "demo.yaml").read_text()
    config.write_text(
        builtin.replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
        .replace("127.0.0.1:9091", f"127.0.0.1:{free_port()}")
        .replace("127.0.0.1:4280", f"127.0.0.1:{free_port()}")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoscaler", "demo", "--no-traffic", "--config", str(config),
         "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("try:"):
                break
        assert any("curl -H 'Host: demo'" in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(os.getpid()) == []


def test_demo_refuses_a_real_api(tmp_path: Path) -> None:
    config = tmp_path / "real.yaml"
    config.write_text(
        "fly: {api_url: 'http://127.0.0.1:9'}\napps: [{name: demo}]\n"
        "emulator: {apps: [{name: demo, machines: 1}]}\n"
    )
    with pytest.raises(ConfigError, match="only on the embedded emulator"):
        demo_settings(str(config), None)

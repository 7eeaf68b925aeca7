"""The demo, end to end: real requests through the proxy to real machine processes."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pexpect
import pytest
from testkit import free_port, until

from autoscaler.config import ConfigError, Settings
from autoscaler.demo import (
    DEMO_APP,
    STORY,
    Replayed,
    Stats,
    Summary,
    _summarize,
    demo_settings,
    print_summary,
    replay_baselines,
    run_demo,
    summary_lines,
)
from autoscaler.demo import _client as demo_client
from autoscaler.emulator.procs import leftovers
from autoscaler.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(180)


async def test_short_demo_wakes_both_ways_and_ends_asleep() -> None:
    settings = _with_short_idle(demo_settings(None, machines=5))
    out = io.StringIO()
    summary = await run_demo(
        settings, duration_s=30, out=out, ports={"proxy": 0, "admin": 0, "emulator": 0}
    )
    assert summary is not None
    assert summary.answers == {"2xx": summary.requests}
    assert summary.ok
    assert summary.requests > 100
    assert summary.wakes["start"] >= 1
    assert summary.wakes["resume"] >= 1
    assert summary.actions["start"] >= summary.wakes["start"]
    assert summary.requests_waited.get("start", 0) >= 1
    assert summary.requests_waited.get("resume", 0) >= 1
    assert summary.final_states == {"suspended": 5}
    assert summary.machine_seconds > 0
    # The same requests replayed under the baselines, over the same time.
    autostop, always_on = summary.baselines
    assert (autostop.name, always_on.name) == ("fly-autostop", "always-on")
    assert always_on.machine_seconds == pytest.approx(summary.elapsed_s, rel=0.01)
    assert always_on.waited == 0
    assert autostop.waited >= 1  # its first request found no machine started
    print_summary(summary, out)
    text = out.getvalue()
    for phase in ("burst", "steady", "visitor"):
        assert f"--- {phase}" in text
    assert f"answers           2xx {summary.requests}, 4xx 0, 5xx 0, transport errors 0" in text
    assert "Fly's autostop, same requests (" in text
    assert "one machine always on, same requests (0 waited" in text
    assert "\x1b[" not in text, "no terminal escapes when the output is not a terminal"


def _with_short_idle(settings: Settings) -> Settings:
    """The demo's app asleep within about 3 s of its last request, not 6 s.

    The story's phases are shares of its length: cut to 30 s, the quiet before the visitor
    lasts 6 s, and the app sleeps only once its stable window (6 s) has no request and
    ``idle_to_zero_s`` (5 s) has passed, plus a tick and the drain. With both windows at
    their defaults the visitor could find the app still up (no resume to assert) on a busy
    machine; at 3 s the app sleeps with seconds to spare, as it does at the default 90 s.
    """
    app = settings.app(DEMO_APP).model_copy(update={"stable_window_s": 3.0, "idle_to_zero_s": 3.0})
    return settings.model_copy(
        update={"apps": [app if a.name == DEMO_APP else a for a in settings.apps]}
    )


def demo_config(tmp_path: Path) -> Path:
    """The built-in demo config on free ports."""
    config = tmp_path / "demo.yaml"
    builtin = (REPO / "autoscaler" / "data" / "demo.yaml").read_text()
    # At once, whole ports only: replaced one after the other, a free port such as 42805
    # put in for 8080 had its "4280" replaced next (127.0.0.1:469555).
    ports = {port: str(free_port()) for port in ("8080", "9091", "4280")}
    config.write_text(
        re.sub(r"127\.0\.0\.1:(8080|9091|4280)\b", lambda m: f"127.0.0.1:{ports[m[1]]}", builtin)
    )
    assert all(f"127.0.0.1:{port}" in config.read_text() for port in ports.values())
    return config


def test_ctrl_c_stops_everything_and_leaves_no_process(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoscaler", "demo", "--no-traffic", "--config", str(config),
         "--log-file", str(tmp_path / "demo.log")],
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
        try:
            # Read on to the end: a demo blocked on a full pipe would never exit.
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            log = (tmp_path / "demo.log").read_text(errors="replace").splitlines()[-40:]
            pytest.fail(
                "the demo did not stop within 30 s of Ctrl-C; its output after 'try:':\n"
                + rest[-4000:]
                + "\nthe end of its log:\n"
                + "\n".join(log)
            )
        assert proc.returncode == 0, rest[-4000:]
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


# A machine row's state cell: the state, in its colour (the panel title says "started 0"
# without one).
STATE_CELL = r"\x1b\[[\d;]*m{}"


def test_the_terminal_view_redraws_in_place_and_ctrl_c_ends_with_the_summary(
    tmp_path: Path,
) -> None:
    log = tmp_path / "demo.log"
    screen = io.StringIO()
    child = pexpect.spawn(
        sys.executable,
        ["-m", "autoscaler", "demo", "--duration", "20", "--machines", "2",
         "--config", str(demo_config(tmp_path)), "--log-file", str(log)],
        cwd=str(REPO),
        # The terminal's own size: COLUMNS and LINES (pytest-xdist's workers set 80 and 24)
        # would win over it.
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        | {"TERM": "xterm-256color"},
        dimensions=(50, 150),
        encoding="utf-8",
        timeout=60,
    )  # fmt: skip
    child.logfile_read = screen
    try:
        child.expect_exact("\x1b[?1049h")  # the alternate screen: a full-screen view
        child.expect(STATE_CELL.format("stopped"))  # the machines' rows, before any traffic
        child.expect(STATE_CELL.format("started"))  # ... and as the burst wakes them
        child.expect_exact("req/s")
        child.sendintr()  # Ctrl-C in the middle of the story
        child.expect_exact("\x1b[?1049l")  # the screen given back
        child.expect_exact("summary")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, screen.getvalue()[-2000:]
    shown = screen.getvalue()
    assert f"logs: {log}" in shown
    assert "machine-seconds" in shown.rsplit("summary", 1)[1]
    # Every log line went to the file; none reached the screen.
    logged = log.read_text()
    assert '"event": "started"' in logged
    assert '"event"' not in shown
    assert not re.search(r"\[(info|warning|debug) *\]", shown)
    assert leftovers(os.getpid()) == []


def test_the_baselines_replay_a_known_request_log() -> None:
    settings = demo_settings(None, machines=2)
    # Two requests a second apart, then one 28 s later; 40 s in all.
    log = [(1.0, 0.05), (2.0, 0.05), (30.0, 0.05)]
    autostop, always_on = replay_baselines(log, settings, 40.0)
    # One machine, up from the first second to the end of the run: nobody waits.
    assert always_on == Replayed("always-on", 40.0, waited=0, errors=0)
    # Fly's autostop starts a machine for the first request (it waits), routes the others
    # to it, and never looks for idle machines within 40 s (every 300 s): up from the
    # start call (1 s + the 0.01 s modelled API latency) to the end.
    assert autostop.name == "fly-autostop"
    assert autostop.waited == 1
    assert autostop.errors == 0
    assert autostop.machine_seconds == pytest.approx(40.0 - 1.01)


def test_every_answer_is_counted_by_class() -> None:
    stats = Stats()
    stats.record(200, "start", 1.2, arrival=1.0, work_s=0.1)
    stats.record(200, "none", 0.1, arrival=2.0, work_s=0.1)
    stats.record(404, "none", 0.01, arrival=3.0, work_s=0.1)
    stats.record(503, None, 0.01, arrival=4.0, work_s=0.1)
    stats.record(None, None, 0.5, arrival=5.0, work_s=0.1)
    assert stats.answers == {"2xx": 2, "4xx": 1, "5xx": 1, "transport errors": 1}
    assert stats.failed == 3
    assert stats.wakes_seen == {"start": 1}
    # A request that waited for a wake is replayed with the work it asked for (the
    # simulator adds its own wait); the others with the time they took.
    assert stats.log == [(1.0, 0.1), (2.0, 0.1), (3.0, 0.01), (4.0, 0.01), (5.0, 0.1)]


async def test_a_request_held_when_ctrl_c_stops_the_story_is_counted_as_cut_short() -> None:
    """Ctrl-C cancels the story's clients: one whose request was held for a wake was
    counted nowhere (a Ctrl-C during the first wake: a summary of 0 requests)."""
    received = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()  # and no answer: a request held for a wake
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stats = Stats()
    burst = next(phase for phase in STORY if phase.name == "burst")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            client = asyncio.create_task(
                demo_client(session, url, burst, t0 + 3600, stats, t0 - 5.0)
            )
            await received.wait()
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
    finally:
        server.close()
        await server.wait_closed()
    assert stats.requests == 1
    assert stats.answers == {"cut short": 1}
    assert stats.failed == 0  # the stop was the user's
    assert stats.latencies == []  # no answer, no latency
    ((arrival, work_s),) = stats.log  # the baselines replay it, as the others
    assert arrival >= 5.0
    assert work_s == burst.work_ms / 1000
    assert stats.in_flight == 0


def test_the_summary_says_what_failed_and_what_the_baselines_spent() -> None:
    summary = Summary(
        requests=16,
        answers={"2xx": 10, "4xx": 2, "5xx": 1, "transport errors": 1, "cut short": 2},
        wakes={"start": 1, "resume": 0},
        wake_mean_s={"start": 0.9},
        actions={"start": 2, "resume": 0, "suspend": 2, "stop": 0},
        requests_waited={"start": 3},
        p50_ms=50.0,
        p99_ms=900.0,
        machine_seconds=30.4,
        baselines=[Replayed("fly-autostop", 55.0, 3, 0), Replayed("always-on", 60.0, 0, 2)],
        final_states={"suspended": 2},
        elapsed_s=60.0,
    )
    assert not summary.ok
    lines = summary_lines(summary)
    assert "  answers           2xx 10, 4xx 2, 5xx 1, transport errors 1, cut short 2" in lines
    assert "  wakes             start 1 (mean 0.90 s), resume 0" in lines
    assert "  machine actions   start 2, resume 0, suspend 2, stop 0" in lines
    assert "  requests waited   3 (start 3)" in lines
    assert "  machine-seconds       30  this run (3 requests waited for a wake)" in lines
    assert (
        "                        55  Fly's autostop, same requests (3 waited; idle check every"
        " 300 s)"
    ) in lines
    assert (
        "                        60  one machine always on, same requests (0 waited, 2 turned"
        " away or timed out)"
    ) in lines


async def test_the_first_progress_line_has_the_rate_already(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without a baseline point at the start, the first line (piped output: CI's) said
    # "0 req/s" for a burst of a thousand requests.
    from types import SimpleNamespace

    from autoscaler import demo_view

    start = time.monotonic()

    def families() -> list[Any]:
        answered = 1000.0 * (time.monotonic() - start)  # 1,000 requests a second
        labels = {"app": "demo", "code": "200", "wake": "none"}
        sample = SimpleNamespace(name="autoscaler_requests_total", labels=labels, value=answered)
        return [SimpleNamespace(samples=[sample])]

    monkeypatch.setattr(demo_view, "PROGRESS_S", 0.05)
    monkeypatch.setattr(demo_view, "SAMPLE_S", 0.01)
    out = io.StringIO()
    view = demo_view.DemoView(
        out, "demo", status=lambda: {"apps": []}, families=families,
        clients=lambda: (0, 0, {}), terminal=False,
    )  # fmt: skip
    task = asyncio.create_task(view.run())
    try:
        await until(lambda: bool(out.getvalue()), what="the first progress line")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    first = out.getvalue().splitlines()[0]
    assert " 0 req/s" not in first, first


@pytest.mark.parametrize("key", ["proxy", "admin"])
def test_demo_listens_on_loopback_only(
    tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "open.yaml"
    # (admin.listen beyond loopback needs a token, given here by the environment)
    monkeypatch.setenv("AUTOSCALER_ADMIN__TOKEN", "0123456789abcdef0123")
    port = 8080 if key == "proxy" else 9091  # the other's default port: no clash
    config.write_text(
        f"{key}: {{listen: '0.0.0.0:{port}'}}\napps: [{{name: demo}}]\n"
        "emulator: {apps: [{name: demo, machines: 1}]}\n"
    )
    with pytest.raises(ConfigError, match=rf"{key}\.listen: the demo listens on loopback only"):
        demo_settings(str(config), None)


def test_a_log_file_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was "autoscaler demo: cannot start: [Errno 2] No such file or directory: '...'"
    # and exit 1, the code of a demo whose requests failed. Nothing starts before.
    from autoscaler.demo import main as demo_main

    missing = tmp_path / "missing" / "demo.log"
    code = demo_main(None, 5.0, None, True, io.StringIO(), log_file=str(missing))
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err == f"autoscaler demo: --log-file: cannot write {missing}: No such file or directory\n"
    )


def test_a_port_in_use_says_how_to_use_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8080 taken by something else: "cannot start: ... address already in use" and no
    more, while AUTOSCALER_PROXY__LISTEN, which the README offers, does nothing to the
    built-in config."""
    import socket

    from autoscaler.demo import main as demo_main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "demo.yaml"
    emulator, admin = free_port(), free_port()
    config.write_text(
        f"proxy: {{listen: '127.0.0.1:{port}'}}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"apps: [{{name: demo}}]\nemulator: {{listen: '127.0.0.1:{emulator}',"
        " apps: [{name: demo, machines: 1}]}\n"
    )
    try:
        code = demo_main(
            str(config), 5.0, None, True, io.StringIO(), log_file=str(tmp_path / "demo.log")
        )
    finally:
        taken.close()
    assert code == 1
    err = capsys.readouterr().err
    assert "address already in use\n  the demo's ports are those of" in err, err
    assert f"those of {config} (proxy.listen 127.0.0.1:{port}," in err
    from autoscaler.demo import _port_hint

    builtin = _port_hint(None, demo_settings(None, None))
    assert "its built-in config (proxy.listen 127.0.0.1:8080," in builtin
    assert builtin.endswith("data/demo.yaml with them changed")


def test_the_summary_counts_drains_taken_back_when_there_were_any() -> None:
    """The summary's wakes were starts and resumes only: a wake that took a drain back
    (timed as kind "uncordon") was left out of the story's count."""
    metrics = Metrics()
    service = SimpleNamespace(metrics=metrics)
    settings = demo_settings(None, machines=2)
    wakes = metrics.wake_duration
    wakes.labels(app=DEMO_APP, kind="start").observe(0.9)
    summary = _summarize(service, settings, Stats(), Counter(), 1.0)  # type: ignore[arg-type]
    assert summary.wakes == {"start": 1, "resume": 0}
    wakes.labels(app=DEMO_APP, kind="uncordon").observe(0.02)
    summary = _summarize(service, settings, Stats(), Counter(), 1.0)  # type: ignore[arg-type]
    assert summary.wakes == {"start": 1, "resume": 0, "uncordon": 1}
    assert "  wakes             start 1 (mean 0.90 s), resume 0, uncordon 1 (mean 0.02 s)" in (
        summary_lines(summary)
    )

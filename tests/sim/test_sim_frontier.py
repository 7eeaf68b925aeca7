"""`autoscaler simulate --frontier`: the sweep, the interpolation at fly-autostop's waits,
and the pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaler.cli import main
from autoscaler.sim.frontier import Frontier, Point


def point(strategy: str, value: float, woken: int, machine_s: float) -> Point:
    return Point(strategy, "knob", value, woken, machine_s, 1000)


def test_machine_seconds_at_given_waits_follow_the_lower_envelope() -> None:
    f = Frontier(
        [
            point("a", 1, 10, 1000.0),
            point("a", 2, 20, 600.0),
            point("a", 3, 25, 700.0),  # beaten by the point before on both counts
            point("a", 4, 40, 200.0),
            point("fly-autostop", 180, 30, 800.0),
            point("fly-autostop", 300, 20, 900.0),
        ],
        {},
        3600.0,
    )
    assert [p.value for p in f.envelope("a")] == [1, 2, 4]
    assert f.at_waits("a", 20) == pytest.approx(600.0)
    assert f.at_waits("a", 30) == pytest.approx(600.0 + (30 - 20) / 20 * (200 - 600))
    assert f.at_waits("a", 5) is None  # no setting of it wakes that few
    assert f.at_waits("a", 100) == pytest.approx(200.0)


def test_frontier_from_the_command_line_with_a_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    trace = tmp_path / "timers.csv"
    assert main(["simulate", "--generate", "timers", "--hours", "2", "--out", str(trace)]) == 0
    capsys.readouterr()
    png, svg = tmp_path / "f.png", tmp_path / "f.svg"
    argv = ["simulate", "--trace", str(trace), "--frontier", "--strategies", "adaptive"]
    assert main([*argv, "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "adaptive          wake_cost_s=300" in text
    assert "at fly-autostop-180s's waits" in text
    assert "at fly-autostop-300s's waits" in text
    assert png.read_bytes().startswith(b"\x89PNG")
    assert main([*argv, "--format", "json", "--plot", str(svg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["strategy"] for p in doc["points"]} == {"adaptive", "fly-autostop"}
    assert [row["baseline"] for row in doc["at_baseline_waits"]] == [
        "fly-autostop-180s",
        "fly-autostop-300s",
    ]
    assert b"<svg" in svg.read_bytes()[:2000]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--frontier", "--strategies", "always-on"], "no knob to sweep"),
        (["--plot", "x.png"], "add --frontier"),
        (["--frontier", "--strategies", "fly-autostop", "--plot", "x.pdf"], ".png or .svg"),
        (["--frontier", "--jobs", "0"], "--jobs"),
    ],
)
def test_frontier_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("t,app,duration\n0,a,0.1\n")
    assert main(["simulate", "--trace", str(trace), *extra]) == 2
    assert message in capsys.readouterr().err

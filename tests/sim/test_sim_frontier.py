"""`autoscaler simulate --frontier`: the sweep, the interpolation at fly-autostop's waits,
and the pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaler.cli import main
from autoscaler.sim import command
from autoscaler.sim.frontier import Frontier, Point, sweep
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver, simulate
from autoscaler.sim.trace import Trace


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


def test_frontier_replays_for_the_horizon_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("t,app,duration\n0,a,1\n10,a,1\n5000,a,1\n")
    argv = ["simulate", "--trace", str(trace), "--strategies", "autoscaler", "--format", "json"]
    assert main([*argv, "--frontier", "--horizon-s", "100"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["horizon_s"] == 100.0
    # Each point is the replay of the first 100 s only: the request at 5000 s is not in it.
    assert {p["requests"] for p in doc["points"]} == {2}
    assert all(p["machine_s_started"] <= 100.0 for p in doc["points"])
    assert main([*argv, "--horizon-s", "100", "--set", "idle_to_zero_s=300"]) == 0
    alone = json.loads(capsys.readouterr().out)["total"]["autoscaler"]
    at_300 = next(p for p in doc["points"] if p["value"] == 300.0)
    assert at_300["machine_s_started"] == alone["machine_s_started"]
    assert at_300["woken"] == alone["woken"]


def test_frontier_asks_the_policy_on_every_tick_when_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = Trace({"a": [(0.0, 1.0), (3000.0, 1.0)]})
    resolve = config_resolver({}, {})
    found = {
        skip: sweep(trace, resolve, Timings(), ["autoscaler"], skip_idle=skip)
        for skip in (True, False)
    }
    for value in (60.0, 300.0):
        fast = found[True].per_app[("autoscaler", value)]["a"]
        exact = found[False].per_app[("autoscaler", value)]["a"]
        assert exact.decisions > 2 * fast.decisions
        every = simulate(trace, resolve, Timings(), ["autoscaler"], skip_idle=False,
                         overrides={"idle_to_zero_s": value})  # fmt: skip
        assert exact.decisions == every.stats["autoscaler"]["a"].decisions
    # And from the command line: --every-tick reaches the sweep.
    seen: dict[str, object] = {}
    real = command.sweep

    def spy(*args: object, **kwargs: object) -> Frontier:
        seen.update(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(command, "sweep", spy)
    path = tmp_path / "t.csv"
    path.write_text("t,app,duration\n0,a,1\n")
    argv = ["simulate", "--trace", str(path), "--frontier", "--strategies", "autoscaler"]
    assert main([*argv, "--every-tick"]) == 0
    assert seen["skip_idle"] is False
    assert main(argv) == 0
    assert seen["skip_idle"] is True
    capsys.readouterr()

"""`autoscaler simulate` end to end: bundled traces, formats, --generate, bad input."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from autoscaler.cli import build_parser, main
from autoscaler.sim import command
from autoscaler.sim.command import parse_overrides
from autoscaler.sim.model import Timings
from autoscaler.sim.run import make_strategy

BUNDLED = ("steady-2h", "diurnal-24h", "bursty-24h", "sparse-24h")


def bundled(name: str) -> Path:
    path = Path(str(resources.files("autoscaler") / "data" / "traces" / f"{name}.csv.gz"))
    assert path.is_file(), f"{name} ships with the package"
    return path


def test_bundled_traces_ship_with_the_package() -> None:
    for name in BUNDLED:
        assert bundled(name).stat().st_size < 400_000


def test_json_has_every_strategy_per_app_and_in_total(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--trace", str(bundled("sparse-24h")), "--format", "json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    names = ["autoscaler", "fly-autostop", "fixed-keepalive-10m", "always-on"]
    assert doc["strategies"] == names
    assert list(doc["apps"]) == ["sparse"]
    assert doc["total"] == doc["apps"]["sparse"]
    ours, always = doc["total"]["autoscaler"], doc["total"]["always-on"]
    assert ours["requests"] == always["requests"] > 100
    assert always["woken"] == 0
    assert ours["woken"] > 0
    assert ours["machine_s_started"] < always["machine_s_started"]
    assert set(ours) >= {
        "woken_pct", "wait_p50_s", "wait_p99_s", "wait_max_s", "machine_s_suspended",
        "peak_machines", "api_actions",
    }  # fmt: skip


_REPLAY = """
import json, sys
from autoscaler.sim.generate import generate
from autoscaler.sim.model import Timings
from autoscaler.sim.run import config_resolver, simulate
from autoscaler.sim.trace import Trace

trace = Trace()
for t, app, duration in generate("azure-like", seed=3, hours=2):
    trace.apps.setdefault(app, []).append((t, duration))
names = ["adaptive", "fly-autostop"]
report = simulate(trace, config_resolver({}, {}), Timings(), names, jobs=int(sys.argv[1]))
json.dump({name: [[app, repr(stats)] for app, stats in report.stats[name].items()]
           for name in report.strategies}, sys.stdout)
"""


def _in_a_process_of_its_own(*argv: str) -> str:
    """Forking this process could deadlock a child (pytest's workers run threads): the
    replays that fork run in a process of their own, single-threaded as the CLI is."""
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout


def test_apps_replayed_in_worker_processes_give_the_same_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    serial = json.loads(_in_a_process_of_its_own("-c", _REPLAY, "1"))
    parallel = json.loads(_in_a_process_of_its_own("-c", _REPLAY, "3"))
    assert list(serial) == ["adaptive", "fly-autostop"]
    assert len(serial["adaptive"]) > 10
    # Every figure of every app (Stats' repr has them all), in the trace's order of apps.
    assert parallel == serial
    argv = ["simulate", "--generate", "azure-like", "--seed", "3", "--hours", "2"]
    argv += ["--strategies", "adaptive,fly-autostop", "--format", "json"]
    assert main(argv) == 0
    alone = capsys.readouterr().out
    assert _in_a_process_of_its_own("-m", "autoscaler", *argv, "--jobs", "3") == alone
    # The frontier's knob values go to the same workers (sim/run.py, fork_map).
    sweep = ["-m", "autoscaler", "simulate", "--generate", "timers", "--hours", "2"]
    sweep += ["--frontier", "--strategies", "autoscaler", "--format", "json"]
    frontier = json.loads(_in_a_process_of_its_own(*sweep))
    assert len(frontier["points"]) > 5
    assert json.loads(_in_a_process_of_its_own(*sweep, "--jobs", "2")) == frontier


def test_csv_and_table_with_knobs_and_a_subset(capsys: pytest.CaptureFixture[str]) -> None:
    trace = str(bundled("sparse-24h"))
    args = ["simulate", "--trace", trace, "--strategies", "autoscaler,always-on"]
    assert main([*args, "--format", "csv", "--set", "idle_to_zero_s=60"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["app"], r["strategy"]) for r in rows] == [
        ("sparse", "autoscaler"),
        ("sparse", "always-on"),
        ("TOTAL", "autoscaler"),
        ("TOTAL", "always-on"),
    ]
    # Idle for 60 s instead of 300 s: most of the requests (Poisson, ten minutes apart on
    # average) find the app asleep; with the default, about 60% do.
    assert 120 < int(rows[0]["woken"]) < int(rows[0]["requests"])
    assert main([*args, "--totals-only"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["app", "strategy", "requests"]
    assert "TOTAL" in table
    assert "sparse " not in table


def test_the_last_requests_wake_is_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The replay ends at the trace's end (3600.1 s), while the last request still waits
    # for its resume: its wait is counted whole, the machine-seconds only up to the end.
    trace = tmp_path / "t.csv"
    trace.write_text("t,app,duration\n0,a,0.1\n3600,a,0.1\n")
    argv = ["simulate", "--trace", str(trace), "--strategies", "autoscaler", "--format", "json"]
    assert main([*argv, "--totals-only"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["horizon_s"] == pytest.approx(3600.1)
    total = doc["total"]["autoscaler"]
    assert total["requests"] == total["woken"] == 2
    assert total["errors"] == 0
    # A cold start (2.1 s) and a resume (0.4 s); p50 over the 2 requests.
    assert total["wait_p50_s"] == pytest.approx(0.4)
    assert total["wait_max_s"] == pytest.approx(2.1)


def test_generate_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bursty.csv"
    assert main(["simulate", "--generate", "bursty", "--hours", "1", "--seed", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "requests (bursty, seed 3)" in capsys.readouterr().out
    assert out.read_text().startswith("t,app,duration\n")
    assert main(["simulate", "--trace", str(out), "--strategies", "always-on"]) == 0


def test_generate_without_out_replays_the_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--generate`` alone replays the synthetic trace in memory: the same figures as
    writing it and replaying the file (which keeps times to the millisecond)."""
    shape = ["--generate", "sessions", "--hours", "6", "--seed", "7"]
    replay = ["--strategies", "adaptive,fly-autostop", "--format", "json", "--app", "sess"]
    out = tmp_path / "sessions.csv"
    assert main(["simulate", *shape, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--trace", str(out), "--seed", "7", *replay]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["simulate", *shape, *replay]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    assert set(in_memory["total"]) == {"adaptive", "fly-autostop"}
    for name, figures in from_file["total"].items():
        for key, value in figures.items():
            assert in_memory["total"][name][key] == pytest.approx(value, rel=1e-3), (name, key)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--set", "idle_to_zero=5"],
            "not a policy knob of apps[] (did you mean 'idle_to_zero_s'?)",
        ),
        (["--set", "colour=blue"], "--set: 'colour' is not a policy knob of apps[]\n"),
        (["--set", "hard_limit=0"], "hard_limit"),
        (["--strategies", "magic"], "unknown 'magic'"),
        (["--app", "nope"], "no app in the trace"),
        (["--generate", "sawtooth", "--out", "x.csv"], "expected one of"),
        (["--generate", "steady", "--trace", "x.csv"], "not both"),
        (["--out", "y.csv"], "--out: only with --generate"),
        # NaN passed "<= 0" checks: a replay of nan hours and 0 requests, exit 0.
        (["--duration-ms", "nan"], "--duration-ms: expected a number > 0"),
        (["--horizon-s", "-5"], "--horizon-s: expected a number > 0"),
        (["--horizon-s", "nan"], "--horizon-s: expected a number > 0"),
        # inf generated requests without end; nan made none ("steady: no requests").
        # Named by the flag, as the others: "hours: expected ..." read as a config key.
        (["--generate", "steady", "--hours", "inf"], "simulate: --hours: expected a finite"),
        (["--generate", "steady", "--hours", "nan"], "simulate: --hours: expected a finite"),
        (["--boot-failure-rate", "1.5"], "--boot-failure-rate: expected a share"),
        # Named by the flag, with the bound that holds: "tick_s: expected a finite number
        # >= 0, got -1.0" before, and 0 then refused in other words.
        (["--tick-s", "-1"], "simulate: --tick-s: expected a finite number > 0, got -1\n"),
        (["--tick-s", "0"], "simulate: --tick-s: expected a finite number > 0, got 0\n"),
        (["--start-s", "nan"], "simulate: --start-s: expected a finite number >= 0, got nan\n"),
        (
            ["--resume-cold-rate", "2"],
            "--resume-cold-rate: expected a share between 0 and 1, got 2",
        ),
        # Python's random takes -1 as 1: the same trace as --seed 1, without a word.
        (["--seed", "-1"], "simulate: --seed: expected a whole number >= 0, got -1\n"),
        (["--generate", "steady", "--seed", "-1", "--out", "x.csv"], "--seed: expected a whole"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = [] if "--generate" in argv else ["--trace", str(bundled("sparse-24h"))]
    assert main(["simulate", *trace, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "argv"),
    [
        ("--out", ["--out", "{missing}/x.csv"]),
        ("--plot", ["--frontier", "--strategies", "autoscaler", "--plot", "{missing}/x.svg"]),
    ],
    ids=["out", "plot"],
)
def test_an_output_file_in_a_missing_directory_exits_2_with_one_line(
    tmp_path: Path,
    flag: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It was a FileNotFoundError's traceback, and exit 1; for --plot, after the sweep.
    if flag == "--plot":
        pytest.importorskip("matplotlib")

        def no_sweep(*args: object, **kwargs: object) -> None:
            raise AssertionError("the sweep ran before the --plot path was checked")

        monkeypatch.setattr(command, "sweep", no_sweep)
    missing = tmp_path / "missing"
    args = ["simulate", "--generate", "steady", "--hours", "1"]
    args += [a.format(missing=missing) for a in argv]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"simulate: {flag}: cannot write {args[-1]}: No such file or directory"
    assert not missing.exists()


@pytest.mark.timeout(60)  # before the check, the replay never ended
def test_a_fly_autostop_check_every_0s_is_refused_like_autostop_interval_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match="interval > 0"):
        make_strategy("fly-autostop-0s", Timings())
    trace = ["simulate", "--trace", str(bundled("sparse-24h")), "--totals-only"]
    for name in ("fly-autostop-0s", "autoscaler,fly-autostop-0.0s"):
        assert main([*trace, "--strategies", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith("simulate: --strategies:"), err
        assert "expected a check interval > 0 s" in err
    assert main([*trace, "--autostop-interval-s", "0"]) == 2
    assert "--autostop-interval-s: expected a finite number > 0, got 0" in capsys.readouterr().err


def test_a_trace_that_cannot_be_read_is_one_plain_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was "simulate: DIR: cannot read: [Errno 21] Is a directory: 'DIR'".
    assert main(["simulate", "--trace", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"simulate: {tmp_path}: cannot read: Is a directory\n"
    broken = tmp_path / "t.csv.gz"
    broken.write_bytes(b"not gzip at all")
    assert main(["simulate", "--trace", str(broken)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"simulate: {broken}: cannot read: Not a gzipped file")


def test_no_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate"]) == 2
    assert "expected --trace FILE" in capsys.readouterr().err


def test_cli_timing_defaults_are_the_models() -> None:
    args = build_parser().parse_args(["simulate"])
    model = Timings()
    for field in Timings.__dataclass_fields__:
        if field == "two_choices":
            assert (args.balance == "two-choices") == model.two_choices
        elif field == "seed":
            assert model.seed == 0  # the replay's draws take --seed (1 by default)
        elif field != "tick_s":
            assert getattr(args, field) == getattr(model, field), field


def test_overrides_read_yaml_scalars() -> None:
    assert parse_overrides(["idle_to_zero_s=5m", "min_machines=1", "scale_down_action=stop"]) == {
        "idle_to_zero_s": "5m",
        "min_machines": 1,
        "scale_down_action": "stop",
    }


def test_config_apps_by_name_equal_the_same_knobs_set_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "autoscaler.yaml"
    config.write_text("control:\n  tick_s: 2\napps:\n  - name: sparse\n    idle_to_zero_s: 1m\n")
    base = ["simulate", "--trace", str(bundled("sparse-24h")), "--strategies", "autoscaler"]
    assert main([*base, "--format", "json", "--config", str(config)]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert from_config["timings"]["tick_s"] == 2.0
    flags = ["--format", "json", "--set", "idle_to_zero_s=60", "--tick-s", "2"]
    assert main([*base, *flags]) == 0
    assert json.loads(capsys.readouterr().out) == from_config
    assert main([*base, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] != from_config["total"]


def test_a_config_whose_apps_are_not_in_the_trace_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`simulate --config config/autoscaler.yaml` on a bundled trace: the config's app
    `demo` is not the trace's `sparse`, so its knobs applied to nothing, without a word."""
    config = tmp_path / "autoscaler.yaml"
    config.write_text("apps:\n  - name: demo\n    idle_to_zero_s: 1m\n")
    base = ["simulate", "--trace", str(bundled("sparse-24h")), "--strategies", "autoscaler"]
    assert main([*base, "--format", "json", "--config", str(config)]) == 0
    got = capsys.readouterr()
    assert got.err == (
        f"simulate: warning: --config {config}: none of its apps (demo) is in the trace"
        " (sparse): every app replays the default policy (and --set's knobs)\n"
    )
    assert main([*base, "--format", "json"]) == 0
    assert capsys.readouterr().out == got.out  # the defaults, as it said
    config.write_text("apps:\n  - name: demo\n  - name: sparse\n")
    assert main([*base, "--format", "json", "--config", str(config)]) == 0
    assert capsys.readouterr().err == ""  # one app matches: nothing to say


def test_azure_trace_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "invocations_per_function_md.anon.d01.csv"
    minutes = ",".join(str(i) for i in range(1, 1441))
    counts = ",".join("2" if i % 60 == 0 else "0" for i in range(1440))  # twice an hour
    path.write_text(f"HashOwner,HashApp,HashFunction,Trigger,{minutes}\no,{'a' * 64},f,http,"
                    f"{counts}\n")  # fmt: skip
    argv = ["simulate", "--trace", str(path), "--duration-ms", "250", "--format", "json"]
    assert main([*argv, "--strategies", "always-on"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total"]["always-on"]["requests"] == 48
    assert doc["horizon_s"] == pytest.approx(23 * 3600 + 45 + 0.25)  # last: 23:00:45


def test_a_trace_of_unix_times_replays_from_its_first_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Times as a request log has them: the figures of the same requests written as seconds
    # from the first, and the report says where the replay started. It replayed 481527 h
    # from 1970 (always-on's machine-seconds all of them, fly-autostop's checks 5.8 million).
    unix, rel = tmp_path / "unix.csv", tmp_path / "rel.csv"
    unix.write_text("1733500000,a,0.1\n1733500005,a,0.1\n1733503600,a,0.2\n")
    rel.write_text("0,a,0.1\n5,a,0.1\n3600,a,0.2\n")
    argv = ["simulate", "--totals-only", "--format", "json"]
    assert main([*argv, "--trace", str(unix)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main([*argv, "--trace", str(rel)]) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["origin_unix_s"] == 1733500000
    assert want["origin_unix_s"] is None
    assert got["horizon_s"] == want["horizon_s"] == pytest.approx(3600.2)
    assert got["total"] == want["total"]
    assert got["total"]["always-on"]["machine_s_started"] == pytest.approx(3600.2, abs=0.1)
    assert main(["simulate", "--totals-only", "--trace", str(unix)]) == 0
    assert (
        "replayed 1.00 h from the first request (Unix time 1733500000, 2024-12-06 15:46:40 UTC);"
        in capsys.readouterr().out
    )
    # The frontier too: the same points, and where the replay began.
    frontier = ["simulate", "--frontier", "--strategies", "autoscaler", "--format", "json"]
    assert main([*frontier, "--trace", str(unix)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main([*frontier, "--trace", str(rel)]) == 0
    want = json.loads(capsys.readouterr().out)
    assert (got["origin_unix_s"], want["origin_unix_s"]) == (1733500000, None)
    assert got["points"] == want["points"]
    assert main(["simulate", "--frontier", "--strategies", "autoscaler", "--trace", str(unix)]) == 0
    assert (
        "replayed 1.00 h from the first request (Unix time 1733500000, 2024-12-06 15:46:40 UTC)"
        " per point;" in capsys.readouterr().out
    )


@pytest.mark.timeout(60)  # before the check, a replay of hours, or without end
@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("1733500000000,a,0.1\n", 1, "(milliseconds since the epoch? t is in seconds: divide by"),
        ("t,app,duration\n1e300,a,0.1\n", 2, "t: expected seconds from the trace's start or a"),
        ("0,a,0.1\n5,a,1e300\n", 2, "expected a trace of at most 366 days"),
    ],
    ids=["milliseconds", "1e300", "duration"],
)
def test_a_trace_of_absurd_span_exits_2_with_one_line(
    tmp_path: Path, text: str, where: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    # always-on: before the check these ended at once, with exit 0 (fly-autostop never).
    assert main(["simulate", "--trace", str(path), "--strategies", "always-on"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"simulate: {path}:{where}: ")
    assert message in line


@pytest.mark.timeout(60)
def test_a_replay_or_a_generated_trace_longer_than_the_longest_trace_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --horizon-s 1e12 replayed fly-autostop's checks for hours; --hours 1e6 of steady
    # would generate 1.8e10 requests in memory before writing or replaying any.
    trace = ["simulate", "--trace", str(bundled("sparse-24h")), "--strategies", "always-on"]
    assert main([*trace, "--horizon-s", "1e12"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "simulate: --horizon-s: expected a number > 0 and at most 31622400 (366 days), got 1e+12"
    )
    out = tmp_path / "long.csv"
    argv = ["simulate", "--generate", "sparse", "--out", str(out), "--hours"]
    assert main([*argv, "8761"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line
        == "simulate: --hours: expected a finite number > 0 and at most 8760 (a year), got 8761"
    )
    assert not out.exists()
    # A year is made, and read back: its last request ends within the 366 days.
    assert main([*argv, "8760", "--seed", "2"]) == 0
    assert main(["simulate", "--trace", str(out), "--strategies", "always-on"]) == 0


def test_a_draft_config_is_read_for_its_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """simulate reads apps[] by name and the tick: a file `run` would refuse for what only
    a running process needs (its proxy on the admin server's address, an app named as the
    trace names it, which Fly would refuse) was refused here too (exit 2)."""
    trace = tmp_path / "trace.csv"
    trace.write_text("t,app,duration\n0,Checkout_API,0.1\n400,Checkout_API,0.1\n")
    config = tmp_path / "draft.yaml"
    config.write_text(
        "proxy: {listen: '127.0.0.1:9091'}\napps:\n  - {name: Checkout_API, idle_to_zero_s: 30}\n"
    )
    base = ["simulate", "--trace", str(trace), "--strategies", "autoscaler", "--format", "json"]
    assert main([*base, "--config", str(config)]) == 0
    got = capsys.readouterr()
    assert got.err == ""  # its app is the trace's: no word of "none of its apps"
    assert main([*base, "--set", "idle_to_zero_s=30"]) == 0
    assert json.loads(got.out) == json.loads(capsys.readouterr().out)

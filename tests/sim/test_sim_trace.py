"""Trace readers and writers: CSV (with and without header, gzip) and Azure Functions 2019."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from autoscaler.sim.generate import SHAPES, generate
from autoscaler.sim.trace import Trace, TraceError, read_azure, read_csv, read_trace, write_csv


def test_csv_with_header_in_any_order_and_unsorted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("duration,app,t,extra\n0.5,a,10,x\n0.25,b,1,y\n1,a,2,z\n")
    trace = read_csv(path)
    assert trace.apps == {"a": [(2.0, 1.0), (10.0, 0.5)], "b": [(1.0, 0.25)]}
    assert trace.requests == 3
    assert trace.end == 10.5


def test_end_is_when_the_longest_running_request_ends() -> None:
    # A long request that started first outlasts the short one that arrived last.
    trace = Trace({"a": [(0.0, 100.0), (1.0, 0.1)], "b": [(5.0, 1.0)]})
    assert trace.end == 100.0
    assert Trace({}).end == 0.0


def test_csv_without_header(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("0,web,0.1\n1.5,web,0.2\n")
    assert read_csv(path).apps == {"web": [(0.0, 0.1), (1.5, 0.2)]}


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts the file with a byte-order mark; Azure's files may too.
    bom = b"\xef\xbb\xbf"
    path = tmp_path / "t.csv"
    path.write_bytes(bom + b"t,app,duration\n0,a,0.1\n5,a,0.1\n")
    assert read_trace(path).apps == {"a": [(0.0, 0.1), (5.0, 0.1)]}
    azure = _azure(tmp_path, [["o", "a" * 64, "f", "http", "1", "0", "0"]])
    azure.write_bytes(bom + azure.read_bytes())
    assert read_trace(azure, duration_s=0.25).apps == {"a" * 12: [(30.0, 0.25)]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t,app,duration\n1,a,x\n", "t.csv:2: duration: expected a number"),
        ("t,app,duration\n1,a\n", "t.csv:2: expected 3 columns, got 2"),
        ("t,app,duration\n-1,a,1\n", "t.csv:2: t: expected a finite number >= 0"),
        ("when,who\n1,a\n", "t.csv:1: expected a header with columns t, app, duration"),
        ("t,app,duration\n1,,1\n", "t.csv:2: app: expected a name"),
        # The file's line, past a quoted field on two lines; a name on one line only.
        ('t,app,duration\n1,"a\nb",1\n', "t.csv:3: app: expected a name on one line"),
        ('t,app,duration\n1,"a\nb",1\n2,a,x\n', "t.csv:3: app"),
        ('t,app,duration\n1,a,"1\n"\n2,a,x\n', "t.csv:4: duration: expected a number"),
    ],
)
def test_csv_errors_name_file_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=expected):
        read_csv(path)


def test_gzip_round_trip_is_byte_stable(tmp_path: Path) -> None:
    rows = [(0.0, "a", 0.1), (1.25, "b", 2.0), (3.5, "a", 0.3)]
    first, second = tmp_path / "1.csv.gz", tmp_path / "2.csv.gz"
    assert write_csv(first, rows) == 3
    write_csv(second, rows)
    assert first.read_bytes() == second.read_bytes()  # no timestamp in the gzip header
    assert read_trace(first).apps == {"a": [(0.0, 0.1), (3.5, 0.3)], "b": [(1.25, 2.0)]}


def _azure(tmp_path: Path, rows: list[list[str]], minutes: int = 3) -> Path:
    header = ["HashOwner", "HashApp", "HashFunction", "Trigger"] + [
        str(i + 1) for i in range(minutes)
    ]
    path = tmp_path / "invocations_per_function_md.anon.d01.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_azure_counts_are_summed_per_app_and_spread_over_each_minute(tmp_path: Path) -> None:
    app = "f" * 64
    path = _azure(
        tmp_path,
        [
            ["o1", app, "fn1", "http", "0", "2", "0"],
            ["o1", app, "fn2", "timer", "0", "1", "1"],
            ["o2", "e" * 64, "fn3", "queue", "0", "0", "0"],  # never called: not in the trace
        ],
    )
    trace = read_trace(path, duration_s=0.25)
    name = app[:12]
    assert list(trace.apps) == [name]
    # Minute 2 (t 60..120) has 3 requests, evenly spread; minute 3 has one, in its middle.
    assert trace.apps[name] == [(70.0, 0.25), (90.0, 0.25), (110.0, 0.25), (150.0, 0.25)]


def test_azure_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="minute 2: expected a count"):
        read_azure(_azure(tmp_path, [["o", "a", "f", "http", "0", "x", "0"]]), 0.1)
    with pytest.raises(TraceError, match="expected 7 columns"):
        read_azure(_azure(tmp_path, [["o", "a", "f", "http", "0"]]), 0.1)
    # A negative count would silently take requests away from the minute.
    with pytest.raises(TraceError, match=r":3: minute 2: expected a count >= 0, got '-3'"):
        read_azure(_azure(tmp_path, [["o", "a", "f", "http", "5", "1", "2"],
                                     ["o", "a", "f", "http", "5", "-3", "2"]]), 0.1)  # fmt: skip


def test_only_and_busiest() -> None:
    trace = Trace({"alpha": [(0.0, 1.0)], "beta": [(0.0, 1.0), (1.0, 1.0)], "bravo": []})
    assert list(trace.only(["al"]).apps) == ["alpha"]
    assert list(trace.busiest(1).apps) == ["beta"]
    with pytest.raises(TraceError, match="2 apps in the trace match"):
        trace.only(["b"])
    with pytest.raises(TraceError, match="no app"):
        trace.only(["zulu"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "nope.csv")


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "mixed-100-apps"])
def test_generated_shapes_are_sorted_reproducible_and_seeded(shape: str) -> None:
    rows = generate(shape, seed=7, hours=2)
    assert rows == generate(shape, seed=7, hours=2)
    assert rows != generate(shape, seed=8, hours=2)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(rows))
    assert all(0 <= t < 7200 and 0 < d <= 60 for t, _, d in rows)
    if shape in ("azure-like", "memoryless"):
        assert all(app.startswith("app-") for _, app, _ in rows)
    else:
        assert {app for _, app, _ in rows} == {shape}


def test_timers_repeat_and_sessions_are_bursts_between_long_gaps() -> None:
    timers = [t for t, _, _ in generate("timers", seed=3, hours=24)]
    assert 300 < len(timers) < 320  # 288 five-minute runs and 24 hourly ones
    gaps = [b - a for a, b in itertools.pairwise(timers)]
    assert max(gaps) <= 305  # never more than a period and the lateness apart
    sessions = [t for t, _, _ in generate("sessions", seed=3, hours=24)]
    gaps = sorted(b - a for a, b in itertools.pairwise(sessions))
    assert gaps[len(gaps) // 2] < 30  # most gaps are think times within a visit
    long = sum(1 for g in gaps if g > 300)  # the time between visits
    assert 0.05 * len(gaps) < long < 0.3 * len(gaps)


def test_azure_like_has_the_trigger_mix() -> None:
    rows = generate("azure-like", seed=2, hours=24)
    per_app: dict[str, list[float]] = {}
    for t, app, _ in rows:
        per_app.setdefault(app, []).append(t)
    assert 30 < len(per_app) <= 60
    periodic = 0
    for times in per_app.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        if len(gaps) > 5 and max(gaps) - min(gaps) < 10:
            periodic += 1  # a timer: every gap the same, give or take its lateness
    assert 3 <= periodic <= 20  # 16% of 60 apps, those with requests that day


def test_generated_rates() -> None:
    steady = generate("steady", seed=1, hours=1)
    assert 0.9 * 5 * 3600 < len(steady) < 1.1 * 5 * 3600
    sparse = generate("sparse", seed=1, hours=24)
    assert 100 < len(sparse) < 200  # one request every ten minutes on average


def test_mixed_100_apps_is_heavy_tailed() -> None:
    rows = generate("mixed-100-apps", seed=1, hours=1)
    per_app: dict[str, int] = {}
    for _, app, _ in rows:
        per_app[app] = per_app.get(app, 0) + 1
    assert all(name.startswith("app-") for name in per_app)
    counts = sorted(per_app.values())
    assert counts[-1] > 50 * counts[len(counts) // 2]  # a few busy apps, most rarely called


def test_generate_rejects_unknown_shape() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        generate("sawtooth")


def test_azure_apps_are_picked_from_the_counts(tmp_path: Path) -> None:
    path = _azure(
        tmp_path,
        [
            ["o", "a" * 64, "f1", "http", "1", "0", "0"],
            ["o", "b" * 64, "f2", "http", "5", "5", "0"],
            ["o", "c" * 64, "f3", "http", "0", "0", "3"],
        ],
    )
    assert list(read_trace(path, busiest=2).apps) == ["b" * 12, "c" * 12]
    assert list(read_trace(path, only=["a", "ccc"], busiest=1).apps) == ["c" * 12]
    assert read_trace(path, only=["b"]).requests == 10
    with pytest.raises(TraceError, match="no app"):
        read_trace(path, only=["d"])


def test_csv_apps_are_picked_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t,app,duration\n0,web,1\n1,web,1\n2,api,1\n")
    assert list(read_trace(path, busiest=1).apps) == ["web"]
    assert list(read_trace(path, only=["a"]).apps) == ["api"]


def test_unix_times_are_replayed_from_the_first_request(tmp_path: Path) -> None:
    # Request logs carry Unix times: the replay starts at the earliest request (it started
    # at 0, 1970, and replayed 481527 h of nothing before it).
    path = tmp_path / "t.csv"
    path.write_text("1733500010,a,0.1\n1733500000.25,b,0.5\n1733503600,a,0.2\n")
    trace = read_trace(path)
    assert trace.origin == 1733500000.25
    assert trace.apps == {"a": [(9.75, 0.1), (3599.75, 0.2)], "b": [(0.0, 0.5)]}
    assert trace.end == pytest.approx(3599.95)
    # Picking apps keeps the whole file's start: the apps stay where they were in it.
    assert read_trace(path, only=["a"]).apps == {"a": [(9.75, 0.1), (3599.75, 0.2)]}
    assert read_trace(path, busiest=1).origin == 1733500000.25


def test_times_from_the_trace_start_are_kept_as_written(tmp_path: Path) -> None:
    # Below 366 days (the longest trace), a time is seconds from the start: a quiet first
    # hour stays one, and generated traces replay as before.
    path = tmp_path / "t.csv"
    path.write_text("t,app,duration\n3600,a,0.1\n31622399,a,0.1\n")
    trace = read_trace(path)
    assert trace.origin == 0.0
    assert trace.apps == {"a": [(3600.0, 0.1), (31622399.0, 0.1)]}
    rows = generate("sparse", seed=3, hours=2)
    write_csv(tmp_path / "g.csv", rows)
    replayed = read_trace(tmp_path / "g.csv")
    assert replayed.origin == 0.0
    assert replayed.apps["sparse"][0][0] == pytest.approx(rows[0][0], abs=1e-3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "t,app,duration\n1733500000000,a,0.1\n1733500001000,a,0.1\n",
            "t.csv:2: t: expected seconds from the trace's start or a Unix time in seconds, "
            "got '1733500000000' (milliseconds since the epoch? t is in seconds: divide by 1000)",
        ),
        (
            "1733500000000000,a,0.1\n",
            "t.csv:1: t: expected seconds from the trace's start or a Unix time in seconds, "
            "got '1733500000000000' (microseconds since the epoch? t is in seconds: divide by "
            "1000000)",
        ),
        (
            "5,a,0.1\n1733500000000000000,a,0.1\n",
            "t.csv:2: this request ends 2.00637e+13 days after the trace's start (t 0); "
            "expected a trace of at most 366 days (nanoseconds since the epoch? t is in "
            "seconds: divide by 1000000000)",
        ),
        (
            "1e300,a,0.1\n",
            "t.csv:1: t: expected seconds from the trace's start or a Unix time in seconds, "
            "got '1e300'",
        ),
        (
            "t,app,duration\n0,a,0.1\n1e300,a,0.1\n1,a,0.1\n",
            "t.csv:3: this request ends 1.15741e+295 days after the trace's start (t 0); "
            "expected a trace of at most 366 days",
        ),
        (
            "t,app,duration\n1,a,0.1\n2,a,1e300\n",
            "t.csv:3: this request ends 1.15741e+295 days after the trace's start (t 0); "
            "expected a trace of at most 366 days",
        ),
        (
            "1733500000,a,0.1\n1733500000000,b,0.1\n",
            "t.csv:2: this request ends 2.00436e+07 days after the first one (line 1); "
            "expected a trace of at most 366 days (milliseconds since the epoch? t is in "
            "seconds: divide by 1000)",
        ),
        (
            "1700000000,a,0.1\n1733500000,a,0.1\n",
            "t.csv:2: this request ends 387.731 days after the first one (line 1); "
            "expected a trace of at most 366 days",
        ),
    ],
)
def test_a_trace_of_absurd_span_is_refused_naming_the_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value) == f"{path.parent}/{expected}"

"""Request traces: read CSV and Azure Functions 2019 files, write CSV.

A trace is, per app, the requests in arrival order as ``(t, duration)`` pairs of seconds
from the start of the trace. Plain tuples rather than objects: a day of a hundred apps is
millions of requests, and the replay loop reads them one by one.

Two formats are read:

- CSV with a header naming ``t``, ``app`` and ``duration`` (any order, more columns
  ignored); a file whose first row is numeric is read as ``t,app,duration`` without a
  header. ``.gz`` files are read through gzip. ``t`` is in seconds: from the start of the
  trace (as ``generate`` writes it), or since the Unix epoch (as request logs have it),
  told apart by the earliest ``t``: one of ``MAX_SPAN_S`` or more can only be a Unix time
  (a trace may span no longer), and then the replay starts at the earliest request (every
  time less it: :attr:`Trace.origin`). A ``t`` past ``MAX_UNIX_S`` is refused with a hint
  when it reads as milliseconds (or micro-, nanoseconds) since the epoch, and so is a
  trace whose last request ends more than ``MAX_SPAN_S`` after its start: either would
  have the replay run for days of machine time, or without end.
- The per-minute invocation counts of the public Azure Functions 2019 trace
  (``invocations_per_function_md.anon.dNN.csv``: ``HashOwner, HashApp, HashFunction,
  Trigger, 1 .. 1440``). The functions of one app are summed; each minute's count is
  spread evenly over that minute; every request lasts ``duration_s``.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

Request = tuple[float, float]
"""``(t, duration)``: arrival in seconds from the start of the trace, and length."""

MAX_SPAN_S = 366 * 86400.0
"""The longest a CSV trace may span, from its start to when its last request ends."""
MAX_UNIX_S = 1e11
"""Past this (the year 5138), a time is no Unix time in seconds."""

AZURE_KEY_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
AZURE_APP_NAME_LEN = 12  # a prefix of the 64-hex-digit hash is unique enough to read
_INF = float("inf")


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(slots=True)
class Trace:
    """Requests per app, each list sorted by arrival time."""

    apps: dict[str, list[Request]] = field(default_factory=dict)
    origin: float = 0.0
    """The Unix time of the trace's start, taken off every time (0: the file's times are
    seconds from its start)."""

    @property
    def requests(self) -> int:
        return sum(len(r) for r in self.apps.values())

    @property
    def end(self) -> float:
        """When the last request ends (0 for an empty trace)."""
        return max((t + d for reqs in self.apps.values() for t, d in reqs), default=0.0)

    def only(self, names: Iterable[str]) -> Trace:
        """The apps named (an app matches its full name or a unique prefix of it)."""
        return Trace({a: self.apps[a] for a in select(self.apps, names)}, self.origin)

    def pick(self, only: Iterable[str] | None, busiest: int | None) -> Trace:
        """The apps named in ``only`` (if given), then the ``busiest`` of them (if given)."""
        trace = self if only is None else self.only(only)
        return trace if busiest is None else trace.busiest(busiest)

    def busiest(self, count: int) -> Trace:
        """The ``count`` apps with the most requests (ties by name, for reproducibility)."""
        sizes = {a: len(r) for a, r in self.apps.items()}
        return Trace({a: self.apps[a] for a in select(sizes, busiest=count)}, self.origin)


def select(
    apps: Iterable[str] | dict[str, int],
    names: Iterable[str] | None = None,
    busiest: int | None = None,
) -> list[str]:
    """App names picked by ``--app`` (full name or unique prefix) and then ``--max-apps``
    (the most requests first; ``apps`` must then map names to request counts)."""
    known = list(apps)
    picked = known
    if names is not None:
        picked = []
        for name in names:
            matches = [name] if name in known else [a for a in known if a.startswith(name)]
            if len(matches) != 1:
                what = "no app" if not matches else f"{len(matches)} apps"
                raise TraceError(f"--app {name!r}: {what} in the trace match")
            if matches[0] not in picked:
                picked.append(matches[0])
    if busiest is not None:
        if not isinstance(apps, dict):
            raise TypeError("busiest needs request counts")
        counts = apps
        picked = sorted(picked, key=lambda a: (-counts[a], a))[:busiest]
    return sorted(picked)


def _open_text(path: Path) -> TextIO:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is dropped, not read as part of
    # the first column's name.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: {column}: expected a number, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise TraceError(f"{path}:{line}: {column}: expected a finite number >= 0, got {text!r}")
    return value


def _finish(apps: dict[str, list[Request]], origin: float = 0.0) -> Trace:
    for reqs in apps.values():
        # Most files are written in order; sort only when one is not (sort is stable).
        if any(reqs[i][0] > reqs[i + 1][0] for i in range(len(reqs) - 1)):
            reqs.sort(key=lambda r: r[0])
    return Trace(dict(sorted(apps.items())), origin)


def _unit_hint(t: float) -> str:
    """What a time too large for Unix seconds may be, as a hint after the error."""
    for scale, unit in ((1000, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds")):
        if MAX_SPAN_S <= t / scale < MAX_UNIX_S:
            return f" ({unit} since the epoch? t is in seconds: divide by {scale})"
    return ""


def _origin(path: Path, first: tuple[float, int, str], last: tuple[float, int, float]) -> float:
    """The time the replay starts at, from the earliest arrival ``first`` (its time, line
    and text) and the latest end ``last`` (its time, line and the request's arrival);
    TraceError if the trace would span more than ``MAX_SPAN_S``."""
    t0, line0, text0 = first
    if t0 >= MAX_UNIX_S:
        raise TraceError(
            f"{path}:{line0}: t: expected seconds from the trace's start or a Unix time in "
            f"seconds, got {text0!r}{_unit_hint(t0)}"
        )
    origin = t0 if t0 >= MAX_SPAN_S else 0.0  # no trace spans that long: a Unix time
    end, line, t = last
    if end - origin > MAX_SPAN_S:
        since = f"the first one (line {line0})" if origin else "the trace's start (t 0)"
        hint = _unit_hint(t) if t >= MAX_UNIX_S else ""
        raise TraceError(
            f"{path}:{line}: this request ends {(end - origin) / 86400:.6g} days after "
            f"{since}; expected a trace of at most {MAX_SPAN_S / 86400:g} days{hint}"
        )
    return origin


def from_rows(rows: Iterable[tuple[float, str, float]]) -> Trace:
    """A trace of (arrival, app, duration) rows, such as ``generate`` makes."""
    apps: dict[str, list[Request]] = {}
    for t, app, duration in rows:
        apps.setdefault(app, []).append((t, duration))
    return _finish(apps)


def read_csv(path: Path) -> Trace:
    """A CSV trace: one request per row (``t``, ``app``, ``duration``)."""
    apps: dict[str, list[Request]] = {}
    # The first request (arrival, line, t's text) and the one that ends last (end, line,
    # arrival): the trace's span, and the lines to name when it is absurd.
    first_t, first_line, first_text = _INF, 0, ""
    last_end, last_line, last_t = -_INF, 0, 0.0
    with _open_text(path) as fh:
        rows = csv.reader(fh)
        first = next(rows, None)
        if first is None:
            return Trace()
        header = [c.strip().lower() for c in first]
        if {"t", "app", "duration"} <= set(header):
            it, ia, id_ = header.index("t"), header.index("app"), header.index("duration")
            body: Iterator[list[str]] = rows
        else:
            try:
                float(first[0])
            except (ValueError, IndexError):
                raise TraceError(
                    f"{path}:1: expected a header with columns t, app, duration, got {first!r}"
                ) from None
            it, ia, id_ = 0, 1, 2
            body = itertools.chain([first], rows)
        width = max(it, ia, id_) + 1
        for row in body:
            line = rows.line_num  # the file's line (a quoted field may span several)
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                raise TraceError(f"{path}:{line}: expected {width} columns, got {len(row)}")
            app = row[ia].strip()
            if not app:
                raise TraceError(f"{path}:{line}: app: expected a name, got an empty field")
            if not app.isprintable():
                raise TraceError(f"{path}:{line}: app: expected a name on one line, got {app!r}")
            t = _number(row[it], path, line, "t")
            duration = _number(row[id_], path, line, "duration")
            reqs = apps.get(app)
            if reqs is None:
                reqs = apps[app] = []
            reqs.append((t, duration))
            if t < first_t:
                first_t, first_line, first_text = t, line, row[it].strip()
            if t + duration > last_end:
                last_end, last_line, last_t = t + duration, line, t
    if not apps:
        return Trace()
    origin = _origin(path, (first_t, first_line, first_text), (last_end, last_line, last_t))
    if origin:
        for reqs in apps.values():
            reqs[:] = [(t - origin, d) for t, d in reqs]
    return _finish(apps, origin)


def read_azure(
    path: Path,
    duration_s: float,
    only: Iterable[str] | None = None,
    busiest: int | None = None,
) -> Trace:
    """An Azure Functions 2019 invocation-count file, functions summed per app.

    A day's file holds tens of thousands of apps and far more requests than one replay
    wants: ``only`` and ``busiest`` pick apps from the counts, before any request is made.
    """
    counts: dict[str, list[int]] = {}
    with _open_text(path) as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None or tuple(header[:4]) != AZURE_KEY_COLUMNS:
            raise TraceError(
                f"{path}:1: expected the Azure header {', '.join(AZURE_KEY_COLUMNS)}, 1..1440"
            )
        minutes = len(header) - 4
        for row in rows:
            line = rows.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise TraceError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
            app = row[1][:AZURE_APP_NAME_LEN]
            per_minute = counts.get(app)
            if per_minute is None:
                per_minute = counts[app] = [0] * minutes
            for m, text in enumerate(row[4:]):
                if text and text != "0":
                    try:
                        count = int(text)
                    except ValueError:
                        count = -1
                    if count < 0:
                        raise TraceError(
                            f"{path}:{line}: minute {m + 1}: expected a count >= 0, got {text!r}"
                        )
                    per_minute[m] += count
    totals = {app: sum(per_minute) for app, per_minute in counts.items()}
    totals = {app: n for app, n in totals.items() if n}
    apps: dict[str, list[Request]] = {}
    for app in select(totals, only, busiest):
        per_minute = counts[app]
        reqs: list[Request] = []
        for m, n in enumerate(per_minute):
            # Evenly spread, each in the middle of its slot: deterministic, no bunching
            # at the minute boundary that a "all at :00" reading would invent.
            step = 60.0 / n if n else 0.0
            reqs.extend((m * 60.0 + (i + 0.5) * step, duration_s) for i in range(n))
        apps[app] = reqs
    return Trace(apps)


def sniff(path: Path) -> str:
    """``"azure"`` or ``"csv"``, from the first line of the file."""
    with _open_text(path) as fh:
        first = fh.readline()
    return "azure" if first.startswith("HashOwner,") else "csv"


def read_trace(
    path: Path,
    fmt: str = "auto",
    duration_s: float = 0.1,
    only: Iterable[str] | None = None,
    busiest: int | None = None,
) -> Trace:
    """Read a trace in the named format (``auto`` looks at the first line), keeping the
    apps named in ``only`` (full names or unique prefixes), then the ``busiest`` of them."""
    try:
        kind = sniff(path) if fmt == "auto" else fmt
        if kind == "azure":
            return read_azure(path, duration_s, only, busiest)
        if kind == "csv":
            return read_csv(path).pick(only, busiest)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        # An OSError's own words, as check-config says them: not "[Errno 21] Is a
        # directory: 'x'", which names the path a second time (a bad gzip file has none).
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TraceError(f"{path}: cannot read: {why}") from None
    raise TraceError(f"unknown trace format {fmt!r} (expected auto, csv or azure)")


def write_csv(path: Path, rows: Iterable[tuple[float, str, float]]) -> int:
    """Write ``(t, app, duration)`` rows with a header; gzip if the name ends in .gz."""
    with path.open("wb") as raw:
        if path.suffix == ".gz":
            # mtime=0 and no name: the same seed gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
                return _write_rows(packed, rows)
        return _write_rows(raw, rows)


def _write_rows(raw: IO[bytes] | gzip.GzipFile, rows: Iterable[tuple[float, str, float]]) -> int:
    count = 0
    fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    out = csv.writer(fh, lineterminator="\n")
    out.writerow(["t", "app", "duration"])
    for t, app, duration in rows:
        out.writerow([f"{t:.3f}", app, f"{duration:.3f}"])
        count += 1
    fh.flush()
    fh.detach()  # leave the binary file to its owner
    return count

"""Synthetic traces with named shapes, reproducible from a seed.

Arrivals are Poisson processes (a time-varying rate is drawn by thinning), request lengths
log-normal around a per-app median. The shapes are meant for tests and demos, each showing
one thing a scaling policy has to get right:

- ``steady``: constant 5 req/s; after the first wake nothing should sleep.
- ``diurnal``: a day-night cycle from near silence to 1 req/s in the afternoon.
- ``bursty``: near silence broken every hour or two by a two-minute burst of 40 req/s.
- ``sparse``: one request every ten minutes on average; the scale-to-zero case.
- ``mixed-100-apps``: a hundred apps whose daily request counts follow the Azure
  Functions 2019 trace (most apps called a few times an hour or less, a few very busy),
  each with one of the shapes above.
- ``timers``: timer-triggered jobs, every 5 minutes and every hour, a few seconds late
  at random: idle gaps that repeat.
- ``sessions``: human visits, a few an hour following the day, each a burst of requests
  a few seconds of think time apart, then nothing until the next visit.
- ``azure-like``: sixty apps in the proportions of the Azure Functions 2019
  characterisation (Shahrad et al., "Serverless in the Wild", USENIX ATC'20): by trigger,
  55% HTTP (``sessions`` here), 16% timer (``timers``, one period per app) and 29% queue,
  event, orchestration and others (Poisson arrivals); daily counts as in
  ``mixed-100-apps``.
- ``memoryless``: sixty apps with those daily counts, every one a Poisson process: the
  time to the next request never depends on the time since the last one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from autoscaler.sim.model import TimingError

Row = tuple[float, str, float]
RateFn = Callable[[float], float]

SHAPES = (
    "steady",
    "diurnal",
    "bursty",
    "sparse",
    "mixed-100-apps",
    "timers",
    "sessions",
    "azure-like",
    "memoryless",
)
DAY_S = 86400.0
MAX_HOURS = 365 * 24.0
"""The longest trace made: its requests (60 s at most) end within the 366 days
(``autoscaler.sim.trace.MAX_SPAN_S``) that a trace read may span."""


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    """Arrival times of a Poisson process of constant ``rate`` on ``[start, end)``."""
    out: list[float] = []
    if rate <= 0:
        return out
    t = start + rng.expovariate(rate)
    while t < end:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _thinned(rng: random.Random, rate: RateFn, peak: float, end: float) -> list[float]:
    """Arrivals of a Poisson process whose rate varies as ``rate(t) <= peak``."""
    return [t for t in _poisson(rng, peak, 0.0, end) if rng.random() * peak < rate(t)]


def _diurnal_rate(low: float, high: float, phase_s: float) -> RateFn:
    def rate(t: float) -> float:
        # Lowest at 03:00 + phase, highest twelve hours later.
        x = (t - 3 * 3600.0 - phase_s) / DAY_S
        return low + (high - low) * (1 - math.cos(2 * math.pi * x)) / 2

    return rate


def _bursts(
    rng: random.Random,
    end: float,
    background: float,
    burst_rate: float,
    burst_s: float,
    gap_s: float,
) -> list[float]:
    times = _poisson(rng, background, 0.0, end)
    t = rng.expovariate(1 / gap_s)
    while t < end:
        length = burst_s * rng.uniform(0.5, 1.5)
        times.extend(_poisson(rng, burst_rate, t, min(end, t + length)))
        t += length + rng.expovariate(1 / gap_s)
    times.sort()
    return times


def _app_rows(
    rng: random.Random, app: str, times: list[float], median_s: float, sigma: float = 0.6
) -> list[Row]:
    mu = math.log(median_s)
    # Capped so one freak draw cannot hold a machine for an hour.
    return [(t, app, min(60.0, rng.lognormvariate(mu, sigma))) for t in times]


def _shape_times(rng: random.Random, shape: str, end: float, scale: float = 1.0) -> list[float]:
    if shape == "steady":
        return _poisson(rng, 5.0 * scale, 0.0, end)
    if shape == "diurnal":
        high = 1.0 * scale
        rate = _diurnal_rate(high / 200, high, rng.uniform(-3600.0, 3600.0))
        return _thinned(rng, rate, high, end)
    if shape == "bursty":
        return _bursts(
            rng, end, background=scale / 600, burst_rate=40.0 * scale, burst_s=120.0, gap_s=5400.0
        )
    if shape == "sparse":
        return _poisson(rng, scale / 600, 0.0, end)
    raise ValueError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


# Azure Functions 2019 (Shahrad et al., "Serverless in the Wild", 2020): 45% of apps are
# invoked at most once an hour, 81% at most once a minute. A log-normal of the daily count
# through both points: median 40 a day, 1.77 decades of spread.
_AZURE_MEDIAN_PER_DAY = 40.0
_AZURE_SIGMA_DECADES = 1.77
_MAX_RATE = 2.0  # req/s; keeps the few giant apps from being nearly the whole trace


def _mixed(rng: random.Random, end: float, apps: int) -> list[Row]:
    rows: list[Row] = []
    unit_mean = {"steady": 5.0, "diurnal": 0.5025, "bursty": 40 * 120 / 5520, "sparse": 1 / 600}
    for i in range(apps):
        name = f"app-{i:03d}"
        per_day = _AZURE_MEDIAN_PER_DAY * 10 ** rng.gauss(0.0, _AZURE_SIGMA_DECADES)
        mean = min(_MAX_RATE, per_day / DAY_S)
        shape = rng.choices(["steady", "diurnal", "bursty", "sparse"], [2, 4, 2, 2])[0]
        # Scale the shape so that its mean rate is ``mean``.
        times = _shape_times(rng, shape, end, mean / unit_mean[shape])
        rows.extend(_app_rows(rng, name, times, median_s=rng.uniform(0.05, 0.5)))
    return rows


def _timer(rng: random.Random, period_s: float, end: float, late_s: float = 5.0) -> list[float]:
    """A timer every ``period_s`` from a random phase, each run up to ``late_s`` late."""
    out: list[float] = []
    t = rng.uniform(0.0, period_s)
    while t < end:
        at = t + rng.uniform(0.0, late_s)
        if at < end:
            out.append(at)
        t += period_s
    return out


def _sessions(
    rng: random.Random,
    visits_per_hour: float,
    end: float,
    clicks: float = 8.0,
    think_s: float = 8.0,
) -> list[float]:
    """Visits arriving as a Poisson process following the day (lowest at 03:00), each a
    geometric number of requests (mean ``clicks``) with log-normal think times."""
    peak = visits_per_hour / 3600.0 * 2.0
    rate = _diurnal_rate(peak / 20, peak, rng.uniform(-3600.0, 3600.0))
    out: list[float] = []
    mu = math.log(think_s)
    for start in _thinned(rng, rate, peak, end):
        t = start
        while t < end:
            out.append(t)
            if rng.random() < 1.0 / clicks:
                break
            t += rng.lognormvariate(mu, 0.8)
    out.sort()
    return out


# Azure Functions 2019 trigger shares (Shahrad et al. 2020, share of functions): HTTP 55%,
# timer 16%, and queue 15% + event 2% + orchestration 7% + others 5% = 29%.
_AZURE_KINDS = (("sessions", 55.0), ("timers", 16.0), ("poisson", 29.0))


def _azure_like(
    rng: random.Random, end: float, apps: int, mix: tuple[tuple[str, float], ...] = _AZURE_KINDS
) -> list[Row]:
    rows: list[Row] = []
    kinds = [k for k, _ in mix]
    weights = [w for _, w in mix]
    for i in range(apps):
        name = f"app-{i:03d}"
        per_day = _AZURE_MEDIAN_PER_DAY * 10 ** rng.gauss(0.0, _AZURE_SIGMA_DECADES)
        mean = min(_MAX_RATE, per_day / DAY_S)  # req/s
        kind = rng.choices(kinds, weights)[0]
        if kind == "timers":
            period = min(4 * 3600.0, max(60.0, 1.0 / mean))
            # Timers are set in round numbers of minutes.
            period = max(60.0, round(period / 60.0) * 60.0)
            times = _timer(rng, period, end)
        elif kind == "sessions":
            times = _sessions(rng, mean * 3600.0 / 8.0, end)
        else:
            times = _poisson(rng, mean, 0.0, end)
        rows.extend(_app_rows(rng, name, times, median_s=rng.uniform(0.05, 0.5)))
    return rows


def generate(shape: str, seed: int = 1, hours: float = 24.0) -> list[Row]:
    """The rows of a synthetic trace, sorted by time."""
    if not 0 < hours <= MAX_HOURS:  # (nan too)
        # A TimingError, to be said by the flag that set it (`--hours`) on the command line.
        raise TimingError("hours", f"a finite number > 0 and at most {MAX_HOURS:g} (a year)", hours)
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    end = hours * 3600.0
    if shape == "mixed-100-apps":
        rows = _mixed(rng, end, 100)
    elif shape == "azure-like":
        rows = _azure_like(rng, end, 60)
    elif shape == "memoryless":
        rows = _azure_like(rng, end, 60, (("poisson", 1.0),))
    elif shape == "timers":
        times = sorted(_timer(rng, 300.0, end) + _timer(rng, 3600.0, end))
        rows = _app_rows(rng, shape, times, median_s=0.5)
    elif shape == "sessions":
        rows = _app_rows(rng, shape, _sessions(rng, 4.0, end), median_s=0.2)
    else:
        rows = _app_rows(rng, shape, _shape_times(rng, shape, end), median_s=0.2)
    rows.sort(key=lambda r: r[0])
    return rows

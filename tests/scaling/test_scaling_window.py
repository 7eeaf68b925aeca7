"""LoadWindows: time-weighted averages over the stable and panic windows."""

from __future__ import annotations

import copy

import pytest

from autoscaler.config import AppConfig
from autoscaler.scaling.window import ConcurrencyMeter, LoadWindows, Sample


def filled(*spans: tuple[float, float, float], stable: float = 60, panic: float = 6) -> LoadWindows:
    w = LoadWindows(stable, panic)
    for start, end, avg in spans:
        w.add(Sample(start, end, avg, int(avg + 0.999)))
    return w


@pytest.mark.parametrize(
    ("spans", "window", "now", "expected"),
    [
        ([], 60, 100, 0.0),
        ([(0, 10, 4.0)], 60, 10, 4.0),  # partial coverage: the known 10 s only
        ([(0, 10, 4.0), (10, 20, 0.0)], 60, 20, 2.0),
        ([(0, 10, 4.0), (10, 20, 0.0)], 10, 20, 0.0),
        ([(0, 10, 4.0), (10, 20, 0.0)], 15, 20, 4.0 * 5 / 15),  # a sample cut by the window
        ([(0, 1, 10.0), (1, 2, 20.0), (2, 3, 30.0)], 2, 3, 25.0),
        ([(0, 10, 4.0)], 5, 30, 0.0),  # nothing inside the window
    ],
)
def test_average(
    spans: list[tuple[float, float, float]], window: float, now: float, expected: float
) -> None:
    assert filled(*spans).average(window, now) == pytest.approx(expected)


def test_stable_and_panic_use_their_windows() -> None:
    w = filled(*[(t, t + 1, 0.0) for t in range(54)], *[(t, t + 1, 12.0) for t in range(54, 60)])
    assert w.panic(60) == pytest.approx(12.0)
    assert w.stable(60) == pytest.approx(12.0 * 6 / 60)


def test_old_samples_are_dropped_beyond_the_longest_window() -> None:
    w = filled(*[(t, t + 1, 1.0) for t in range(200)], stable=60)
    assert len(w) == 60


def test_last_active_is_the_end_of_the_latest_busy_sample() -> None:
    w = LoadWindows(60, 6)
    assert w.last_active is None
    w.add(Sample(0, 1, 0.0, 0))
    assert w.last_active is None
    w.add(Sample(1, 2, 0.2, 1))  # a short burst inside the tick
    w.add(Sample(2, 3, 0.0, 0))
    assert w.last_active == 2
    w.add(Sample(3, 3, 0.0, 1))  # empty span: no load, but a request was there
    assert w.last_active == 3
    assert len(w) == 3


def test_windows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="longer than 0"):
        LoadWindows(0, 6)


def test_for_app_reads_the_knobs() -> None:
    w = LoadWindows.for_app(AppConfig(name="a", stable_window_s=30, panic_window_s=3))
    assert (w.stable_window_s, w.panic_window_s) == (30, 3)


def test_held_requests_from_the_meter_are_load() -> None:
    meter = ConcurrencyMeter(0.0)
    meter.add(1, 0.0)  # one in flight
    meter.add(3, 1.0)  # three held (queued) for a wake
    meter.add(-3, 3.0)
    w = LoadWindows(60, 6)
    w.add(meter.take(4.0))
    assert w.stable(4.0) == pytest.approx((4 + 3 * 2) / 4)
    assert w.last_active == 4.0


def test_a_deep_copy_reads_the_same_and_moves_on_its_own() -> None:
    # The simulator's purity test replays decide() on deep copies of its inputs.
    original = filled((0, 5, 2.0), (5, 10, 4.0), stable=60, panic=6)
    twin = copy.deepcopy(original)
    assert (twin.stable(10), twin.panic(10), len(twin)) == (3.0, 22 / 6, 2)
    assert (twin.stable_window_s, twin.panic_window_s, twin.last_active) == (60, 6, 10)
    twin.add(Sample(10, 20, 8.0, 8))
    assert (len(original), original.last_active) == (2, 10)
    assert (len(twin), twin.last_active) == (3, 20)

"""Load measurement: exact time-weighted concurrency, read in samples.

The proxy moves a :class:`ConcurrencyMeter` up and down as requests start and end (queued
requests count as demand too); the controller (or the simulator) ``take``s a sample per
tick. A sample is the exact average concurrency since the previous one, so a burst shorter
than a tick is not lost, and its peak. :class:`LoadWindows` keeps recent samples and
averages them over the policy's stable and panic windows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from autoscaler.config import AppConfig


@dataclass(frozen=True, slots=True)
class Sample:
    """Load between ``start`` and ``end``: the time-weighted average and the peak."""

    start: float
    end: float
    average: float
    peak: int


class ConcurrencyMeter:
    """Counts concurrent requests and integrates them over time."""

    __slots__ = ("_area", "_peak", "_since", "_t", "last_arrival", "level")

    def __init__(self, now: float) -> None:
        self.level = 0
        self.last_arrival: float | None = None
        self._area = 0.0
        self._t = now
        self._since = now
        self._peak = 0

    def _advance(self, now: float) -> None:
        if now > self._t:
            self._area += self.level * (now - self._t)
            self._t = now

    def add(self, delta: int, now: float) -> None:
        """``delta`` requests began (positive) or ended (negative) at ``now``."""
        self._advance(now)
        self.level += delta
        if self.level > self._peak:
            self._peak = self.level
        if delta > 0:
            self.last_arrival = now

    def take(self, now: float) -> Sample:
        """The load since the previous take; starts the next sample."""
        self._advance(now)
        span = now - self._since
        average = self._area / span if span > 0 else float(self.level)
        sample = Sample(self._since, now, average, self._peak)
        self._area = 0.0
        self._since = now
        self._peak = self.level
        return sample


class LoadWindows:
    """Recent samples, averaged over the stable and the panic window.

    Pure and mutable: the caller ``add``s each sample it takes from the meter and asks for
    averages at ``now``. An average is time-weighted over the part of the window that
    samples cover: a window that is only partly covered (just after start-up) averages what
    is known rather than counting the unknown past as idle, and a window with no samples
    at all reads 0.
    """

    __slots__ = ("_horizon", "_samples", "last_active", "panic_window_s", "stable_window_s")

    def __init__(self, stable_window_s: float, panic_window_s: float) -> None:
        if stable_window_s <= 0 or panic_window_s <= 0:
            raise ValueError("windows must be longer than 0 seconds")
        self.stable_window_s = stable_window_s
        self.panic_window_s = panic_window_s
        self._horizon = max(stable_window_s, panic_window_s)
        self._samples: deque[Sample] = deque()
        self.last_active: float | None = None
        """End of the latest sample during which any request was in flight or held.

        A request that is still running is activity even though it arrived long ago, so
        idle-to-zero must not count from its arrival alone.
        """

    @classmethod
    def for_app(cls, app: AppConfig) -> LoadWindows:
        return cls(app.stable_window_s, app.panic_window_s)

    def add(self, sample: Sample) -> None:
        busy = sample.peak > 0 or sample.average > 0
        if busy and (self.last_active is None or sample.end > self.last_active):
            self.last_active = sample.end
        if sample.end <= sample.start:
            return  # an empty span carries no load; its peak is recorded above
        self._samples.append(sample)
        cutoff = sample.end - self._horizon
        while self._samples and self._samples[0].end <= cutoff:
            self._samples.popleft()

    def average(self, window_s: float, now: float) -> float:
        """Time-weighted average concurrency over ``[now - window_s, now]``."""
        # Newest first, stopping at the window's start: this runs on every decision of every
        # app (and of every simulated tick), so it avoids the samples it cannot use.
        lo = now - window_s
        area = covered = 0.0
        for s in reversed(self._samples):
            if s.end <= lo:
                break
            end = now if s.end > now else s.end
            start = lo if s.start < lo else s.start
            overlap = end - start
            if overlap > 0:
                area += s.average * overlap
                covered += overlap
        return area / covered if covered > 0 else 0.0

    def __deepcopy__(self, memo: dict[int, object]) -> LoadWindows:
        # Written out: in the compiled build (setup.py) copy's default, which makes the
        # object without calling __init__, is not available. Samples are immutable.
        twin = LoadWindows(self.stable_window_s, self.panic_window_s)
        twin._samples = deque(self._samples)
        twin.last_active = self.last_active
        return twin

    def stable(self, now: float) -> float:
        return self.average(self.stable_window_s, now)

    def panic(self, now: float) -> float:
        return self.average(self.panic_window_s, now)

    def __len__(self) -> int:
        return len(self._samples)

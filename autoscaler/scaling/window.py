"""Load measurement: exact time-weighted concurrency, read in samples.

The proxy moves a :class:`ConcurrencyMeter` up and down as requests start and end (queued
requests count as demand too); the controller (or the simulator) ``take``s a sample per
tick. A sample is the exact average concurrency since the previous one, so a burst shorter
than a tick is not lost, and its peak.
"""

from __future__ import annotations

from dataclasses import dataclass


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

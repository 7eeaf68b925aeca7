"""Load measurement: exact time-weighted concurrency, read in samples.

The proxy moves a :class:`ConcurrencyMeter` up and down as requests start and end (queued
requests count as demand too); the controller (or the simulator) ``take``s a sample per
tick. A sample is the exact average concurrency since the previous one, so a burst shorter
than a tick is not lost, and its peak. :class:`LoadWindows` keeps recent samples and
averages them over the policy's stable and panic windows.
"""

from __future__ import annotations

from bisect import bisect_right
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

    Running sums: each sample is kept with the sums of load x time and of time covered
    up to it, so an average is two subtractions and a binary search, whatever the window's
    length (every decision of every app reads two, and the simulator asks millions).
    """

    __slots__ = (
        "_area",
        "_avgs",
        "_covered",
        "_ends",
        "_head",
        "_horizon",
        "_idle_until",
        "_starts",
        "last_active",
        "panic_window_s",
        "stable_window_s",
    )

    def __init__(self, stable_window_s: float, panic_window_s: float) -> None:
        if stable_window_s <= 0 or panic_window_s <= 0:
            raise ValueError("windows must be longer than 0 seconds")
        self.stable_window_s = stable_window_s
        self.panic_window_s = panic_window_s
        self._horizon = max(stable_window_s, panic_window_s)
        # Parallel lists; entries before ``_head`` have left the windows (kept until a
        # compaction, so that adding stays O(1)).
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._avgs: list[float] = []
        self._area: list[float] = []
        """Running sum of load x time up to and including each sample."""
        self._covered: list[float] = []
        """Running sum of the time covered up to and including each sample."""
        self._head = 0
        self._idle_until: float | None = None
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
        span = sample.end - sample.start
        area, covered = self._area, self._covered
        if area:
            area.append(area[-1] + sample.average * span)
            covered.append(covered[-1] + span)
        else:
            area.append(sample.average * span)
            covered.append(span)
        self._starts.append(sample.start)
        self._ends.append(sample.end)
        self._avgs.append(sample.average)
        ends, head = self._ends, self._head
        cutoff = sample.end - self._horizon
        while head < len(ends) and ends[head] <= cutoff:
            head += 1
        self._head = head
        if head > 512 and 2 * head > len(ends):
            self._compact()

    def _compact(self) -> None:
        """Drop the samples that left the windows, and rebase the running sums on them."""
        h = self._head
        base_area, base_covered = self._area[h - 1], self._covered[h - 1]
        self._area = [a - base_area for a in self._area[h:]]
        self._covered = [c - base_covered for c in self._covered[h:]]
        self._starts = self._starts[h:]
        self._ends = self._ends[h:]
        self._avgs = self._avgs[h:]
        self._head = 0

    def average(self, window_s: float, now: float) -> float:
        """Time-weighted average concurrency over ``[now - window_s, now]``."""
        lo = now - window_s
        ends = self._ends
        n = len(ends)
        head = self._head
        area = covered = 0.0
        last_end = lo
        if head < n:
            last_end = ends[n - 1]
            if last_end > now:
                return self._average_slowly(lo, now)
            # The first sample that ends inside the window: it may be cut at its start.
            i = bisect_right(ends, lo, head, n)
            if i < n:
                area = self._area[n - 1] - self._area[i]
                covered = self._covered[n - 1] - self._covered[i]
                start = self._starts[i]
                if start < lo:
                    start = lo
                overlap = ends[i] - start
                if overlap > 0:
                    area += self._avgs[i] * overlap
                    covered += overlap
        idle_until = self._idle_until
        if idle_until is not None:
            # Zeros from the latest sample on: they cover time but add no load.
            begin = last_end if last_end > lo else lo
            end = idle_until if idle_until < now else now
            if end > begin:
                covered += end - begin
        return area / covered if covered > 0 else 0.0

    def _average_slowly(self, lo: float, now: float) -> float:
        """The average over ``[lo, now]`` sample by sample (samples end after ``now``)."""
        area = covered = 0.0
        starts, ends, avgs = self._starts, self._ends, self._avgs
        for k in range(len(ends) - 1, self._head - 1, -1):
            if ends[k] <= lo:
                break
            end = now if ends[k] > now else ends[k]
            start = lo if starts[k] < lo else starts[k]
            overlap = end - start
            if overlap > 0:
                area += avgs[k] * overlap
                covered += overlap
        return area / covered if covered > 0 else 0.0

    def assuming_idle_until(self, until: float) -> LoadWindows:
        """These windows as they will read at ``until`` if only zero samples arrive before.

        A read-only view sharing this object's samples (valid until the next ``add``): the
        simulator asks the policy what it would decide at a later tick of a quiet app
        without feeding it the zeros in between.
        """
        view = LoadWindows(self.stable_window_s, self.panic_window_s)
        view._starts, view._ends, view._avgs = self._starts, self._ends, self._avgs
        view._area, view._covered, view._head = self._area, self._covered, self._head
        view._idle_until = until
        view.last_active = self.last_active
        return view

    def __deepcopy__(self, memo: dict[int, object]) -> LoadWindows:
        # Written out: in the compiled build (setup.py) copy's default, which makes the
        # object without calling __init__, is not available. Samples are plain floats.
        twin = LoadWindows(self.stable_window_s, self.panic_window_s)
        h = self._head
        twin._starts, twin._ends = self._starts[h:], self._ends[h:]
        twin._avgs, twin._area, twin._covered = self._avgs[h:], self._area[h:], self._covered[h:]
        twin._idle_until = self._idle_until
        twin.last_active = self.last_active
        return twin

    def stable(self, now: float) -> float:
        return self.average(self.stable_window_s, now)

    def panic(self, now: float) -> float:
        return self.average(self.panic_window_s, now)

    def __len__(self) -> int:
        return len(self._ends) - self._head

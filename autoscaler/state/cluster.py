"""What replicas share through Redis: their load, the leader's fleet view, wake requests.

Every replica writes one hash, ``{prefix}:replica:{id}``, every ``REPORT_S`` with a TTL of
``REPORT_TTL_S`` (so a dead replica's load disappears by itself), and keeps its id in the
set ``{prefix}:replicas``. The hash holds, per app, the replica's load as a JSON object:
``area`` (cumulative concurrency-seconds: the integral of in flight + held since the replica
started, read from the proxy's :class:`~autoscaler.scaling.window.ConcurrencyMeter`),
``level`` (in flight + held now), ``in_flight``, ``held``, ``peak`` (since its previous
report), ``at`` (when its last request came, on the replica's clock; the header's ``now``
is that clock when the report was written, so ``now - at`` is the idle time and no two
hosts' clocks are compared), ``machines`` (requests in flight per machine), ``long_lived``
(the WebSockets and streamed answers its proxy carries per machine: the leader's
scale-downs take the machines without any first, whichever replica carries them) and
``failing`` (the replica's ejections in a row per machine for the machine's own failures:
the leader restarts a machine that hangs for the requests of any replica). The leader adds its fleet
view per app (``fleet:{app}``: the machines it routes to, with state and cordon;
``seq:{app}``: the view's sequence number; ``crit:{app}``: the machines whose Fly health
checks are critical, which the followers' proxies take out of routing as the leader's
does; ``how:{app}``: how each machine's current or last start brings it up, ``resume`` or
``start``, which names the wake a follower's held requests waited for; ``sick:{app}``:
the machines that left ``started`` with their Fly checks critical, which Fly's list no
longer says, so that a follower's own wake, or its wakes once it leads, try them last as
the leader's do; ``miss:{app}``: its last wake of the app found that the Machines API has
no such app, and no list said otherwise since, so that a follower's wake that asked for it
fails as the leader's, and the held requests get their 502 at once; ``ours:{app}``: the
machines its drains cordoned, so that a follower names a wake that its leader served by
taking a drain back "uncordon", and one over another party's cordon lifted "none") and
its fencing token
(``fence``), so followers route without reading the Machines API themselves.
A replica whose lead is over (and its step-down done) says in ``settled`` the fencing
token of that lead and until when (Fly's time) a cordon request of its own may still
land: the next leader reads it off our cordon keys that name it (control/actions.py).
A replica that stops (a rolling restart) takes its report out, and leaves what it says
there under its boot id, ``{prefix}:settled:{boot}`` (listed in the set
``{prefix}:departed``), for as long as a key of its own may be waited for: the next
leader still reads it, and no reader counts the stopped replica as a member; its id
goes into ``{prefix}:gone`` (below), led or not. A member
whose report expired (it died) is unlisted by the first reader that finds it so, which
leaves its id in the sorted set ``{prefix}:gone``, scored by when (Redis's clock), for
``GONE_KEPT_S``, each id on its own: a replica that joins after that knows it gone too
(``Cluster.gone``), and adopts the machine leases it left. (The previous release kept
those ids in the set ``{prefix}:expired``, all as long as its latest addition: under
steady churn it never expired and grew; this code still reads it while a rolling upgrade
runs, and never writes it.)

With a thousand apps a report has thousands of fields, and nearly all of them stay the
same from one round to the next (an app at rest has the same load; a view changes when a
machine does). So a round writes only the fields that changed, and its header says which:
``gen`` numbers the writes, ``changed`` lists the fields written or deleted in the writes
since ``since`` (the last ``CHANGES_KEPT``). A reader reads every header, then only those
fields of a report it read at ``since - 1`` or later, and the whole report otherwise (its
first read, a replica restarted, a whole write: the first, and every one after a failed
write or an expired key).

The leader also *pushes* every change of its view at once, on the pub/sub channel
``{prefix}:view`` (:class:`ViewPush`: its id, its fencing token and the changed apps with
their sequence numbers); followers apply a push as it arrives and still read the report
every round, which is the fallback: a push lost (pub/sub delivers at most once, and not
to a replica that was disconnected) is repaired by the next read. A follower applies an
app's view only if its (fencing token, sequence) is newer than the one it applied last, so
a report written before a push never undoes it.

The leader's tick turns everyone's ``area`` into one sample (:class:`ClusterLoad`): the
difference of each replica's area since the previous tick, extrapolated from its report
to now with its ``level``; the sum over replicas divided by the span is the cluster's
average concurrency, which the policy reads exactly as it reads one process's meter.
Ages come from the hash's remaining TTL (``PTTL``), so no two hosts' clocks are compared.

Wake requests from followers are published on ``{prefix}:wake`` (the leader wakes at once,
through its single-flight path) and pushed on the list ``{prefix}:wakes``, which the leader
pops every round: the repair path for a request published while it was not listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from autoscaler.config import ClusterSettings, default_replica_id
from autoscaler.logs import get_logger
from autoscaler.scaling.window import ConcurrencyMeter, Sample
from autoscaler.state.claim import WakeClaims, claim_holder
from autoscaler.state.lease import Lease
from autoscaler.state.scripts import Script, raise_first_error

Clock = Callable[[], float]
_N = TypeVar("_N", int, float)
_log = get_logger("autoscaler.state.cluster")

REPORT_S = 0.25
"""How often each replica publishes its load (and reads everyone else's)."""
REPORT_TTL_S = 2.0
"""How long a report outlives its replica's last write."""
GONE_KEPT_S = 120.0
"""How long a replica that left is remembered as gone (``Cluster.gone``), from the last
read that found it so or a record that names it; and how long ``gone_key`` keeps each
id, from its addition (Redis's clock), whatever is added later (the key's own TTL too,
from its latest addition): for the leases it left on machines, which the others adopt
(control/leases.py). Its refreshes of them are fenced, so each lapses within its TTL
(30 s) of the replica's last lease or claim in Redis, well before this; and ids come and
go for good (``hostname:pid`` at each start)."""

_GONE_ADD = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local at = string.format('%d', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], at, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - tonumber(ARGV[1])))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
"""Add ``ARGV[2:]`` to ``gone_key`` scored by Redis's clock (ms: the one clock all
replicas share; ours is monotonic per process), drop the ids added ``ARGV[1]`` ms ago or
earlier, and keep the key itself that long (nobody adds: it goes whole). One script, so
the addition and the trim are atomic. Sent whole (``EVAL``): it runs inside transactions,
where a ``NOSCRIPT`` would come after the others ran (state/scripts.py), and only when a
replica leaves."""

_GONE_READ = Script(
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%d', now - tonumber(ARGV[1])), '+inf')
"""
)
"""The ids of ``gone_key`` added less than ``ARGV[1]`` ms ago (Redis's clock): one added
earlier is not read, though the key still holds it until the next addition or its TTL.
Read-only. Every round's read sends it by its digest (state/scripts.py)."""


HEADER = ("boot", "leader", "fence", "gen", "now", "changed", "since", "settled")
"""A report's own fields (the rest are per app)."""
CHANGES_KEPT = 8
"""How many of its last writes a report lists the changes of: a reader that missed up to
seven rounds (its rounds and the writer's drift apart) still reads only those."""


@dataclass(frozen=True, slots=True)
class AppLoad:
    """One replica's load on one app, as it reports it."""

    area: float
    level: int
    in_flight: int = 0
    held: int = 0
    peak: int = 0
    at: float | None = None
    """When its last request came, on the reporting replica's clock (None: never)."""
    machines: Mapping[str, int] = field(default_factory=dict)
    """Requests in flight per machine (machines with none left out)."""
    long_lived: Mapping[str, int] = field(default_factory=dict)
    """WebSockets (idle ones too, which are not in flight) and streamed answers still
    coming per machine that the replica's proxy carries (``Upstream.long_lived``;
    machines with none left out): a drain would end them, so the leader's scale-downs
    take the machines without any first, whichever replica carries them. Not said by a
    replica of the previous release (none read); the leader of that release ignores it."""
    failing: Mapping[str, int] = field(default_factory=dict)
    """The replica's ejections in a row per machine for the machine's own failures
    (``Upstream.failing``; machines with none left out): how the leader learns that a
    machine hangs when the requests to it go through other replicas."""

    def idle(self) -> bool:
        """Nothing in flight, held or seen since the previous report, no machine failing
        and no long-lived connection: the report of an app at rest, which stays the same
        from one round to the next (a failing count can drop without a request: a machine
        started again; a WebSocket idle for long can close without touching the view)."""
        return not (
            self.level
            or self.in_flight
            or self.held
            or self.peak
            or self.failing
            or self.long_lived
        )

    def to_json(self, now: float) -> str:
        return json.dumps(
            {
                "area": self.area,
                "level": self.level,
                "in_flight": self.in_flight,
                "held": self.held,
                "peak": self.peak,
                "at": self.at,
                # For a replica of the previous release (a rolling upgrade), which reads
                # only this: the idle time when the entry was written. The entry of an
                # app at rest is not written again, so it reads it as more recent than it
                # is, the safe side (it keeps the app up a little longer).
                "idle_s": idle_s(self.at, now),
                "machines": dict(self.machines),
                "long_lived": dict(self.long_lived),
                "failing": dict(self.failing),
            }
        )

    @classmethod
    def from_json(cls, text: str, now: float = 0.0) -> AppLoad:
        """Parse an entry; ``now`` is the report's clock (``now`` of its header), which
        turns the previous release's ``idle_s`` into ``at``."""
        d = json.loads(text)
        at = d.get("at")
        if at is None and d.get("idle_s") is not None:
            at = now - _amount(d["idle_s"])
        return cls(
            area=_amount(d["area"]),
            level=_count(d["level"]),
            in_flight=_count(d.get("in_flight", 0)),
            held=_count(d.get("held", 0)),
            peak=_count(d.get("peak", 0)),
            at=None if at is None else _finite(at),
            machines={str(k): _count(v) for k, v in (d.get("machines") or {}).items()},
            # None from a replica of the previous release: it counts none.
            long_lived={str(k): _count(v) for k, v in (d.get("long_lived") or {}).items()},
            failing={str(k): _count(v) for k, v in (d.get("failing") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class AppFleet:
    """The leader's view of one app's machines, as it publishes it: ``machines`` are
    ``[id, host, port, state, cordoned]`` lists; ``seq`` orders the leader's versions;
    ``critical`` names the machines whose Fly health checks are critical (apart from the
    lists, which a replica of the previous release unpacks as five fields)."""

    seq: int
    machines: list[list[Any]]
    critical: tuple[str, ...] = ()
    how: Mapping[str, str] = field(default_factory=dict)
    """Machine -> how its current start brings it up, or its last one did ("resume" or
    "start"; machines it is not known of left out): a follower labels the wake its held
    requests waited for by the machine that came up (a resume under way is listed
    ``starting``, as a cold start is)."""
    down_sick: tuple[str, ...] = ()
    """The machines that left ``started`` with their Fly checks critical
    (``AppRuntime.down_sick``): Fly's list forgets the checks of a machine that is not
    started, so a follower learns from the leader that its wakes should try them last."""
    missing: bool = False
    """The leader's last wake of the app found that the Machines API has no such app (a
    404 on its list), and no list since said otherwise: a follower's wake that asked for
    it fails with ``AppMissing`` as the leader's did."""
    ours: tuple[str, ...] = ()
    """The machines cordoned by a drain of the leader's (``MachineInfo.cordoned_by_us``;
    another party's cordon, and a hung machine held out, are ``cordoned`` in the lists
    only): a follower's held requests served by one of them once its cordon was lifted
    waited for a drain taken back ("uncordon"), by another party's lifted for no wake."""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "machines": self.machines,
            "critical": list(self.critical),
            "how": dict(self.how),
            "down_sick": list(self.down_sick),
            "missing": self.missing,
            "ours": list(self.ours),
        }

    @classmethod
    def from_json(cls, d: Any) -> AppFleet:
        return cls(
            seq=_count(d["seq"]),
            machines=_machines(d["machines"]),
            critical=_ids(d.get("critical")),  # None from a previous release's leader
            how=_how(d.get("how")),  # likewise
            down_sick=_ids(d.get("down_sick")),  # likewise
            missing=_flag(d.get("missing")),  # None from a previous release's leader
            ours=_ids(d.get("ours")),  # likewise
        )


def _ids(d: Any) -> tuple[str, ...]:
    """A published list of machine ids (``critical``, ``down_sick``, ``ours``); None (a leader of
    the previous release says none) is none. ValueError if it is not a list of strings:
    ``str`` of each took a number or a list for an id, and a value that is no list for
    none, where the machines' own ids are refused so (:func:`_machines`)."""
    if d is None:
        return ()
    if not isinstance(d, list) or not all(isinstance(m, str) for m in d):
        raise ValueError(f"not a list of machine ids: {d!r}")
    return tuple(d)


def _flag(d: Any) -> bool:
    """A published flag (``missing``); None (a leader of the previous release does not
    say) is False. ValueError if it is not a boolean: ``is True`` read "true", 1 or a
    list as False (the app there), where a malformed list of ids is refused (:func:`_ids`)."""
    if d is None:
        return False
    if not isinstance(d, bool):
        raise ValueError(f"not a boolean: {d!r}")
    return d


def _how(d: Any) -> dict[str, str]:
    """A published ``how`` map (None from a leader of the previous release: empty), only
    its known values kept (a later version's kind of start reads as not known).
    ValueError if it is not a map of machine ids to strings."""
    if d is None:
        return {}
    if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
        raise ValueError(f"not a map of machine ids to kinds of start: {d!r}")
    return {k: v for k, v in d.items() if v in ("resume", "start")}


@dataclass(frozen=True, slots=True)
class ViewPush:
    """One pushed change of the leader's view."""

    leader: str
    fence: int
    apps: Mapping[str, AppFleet]

    def to_json(self) -> str:
        return json.dumps(
            {
                "leader": self.leader,
                "fence": self.fence,
                "apps": {app: f.to_json() for app, f in self.apps.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ViewPush:
        d = json.loads(text)
        return cls(
            leader=str(d["leader"]),
            fence=_count(d["fence"]),
            apps={str(a): AppFleet.from_json(f) for a, f in d["apps"].items()},
        )


@dataclass(frozen=True, slots=True)
class Report:
    """One replica's last report, as read by another (``age_s`` at ``read_at``)."""

    replica: str
    boot: str
    leader: bool
    age_s: float
    read_at: float
    loads: Mapping[str, AppLoad]
    fleet: Mapping[str, AppFleet] = field(default_factory=dict)
    fence: int = 0
    now: float = 0.0
    """The replica's clock when it wrote the report (what its loads' ``at`` count from)."""
    fleet_changed: frozenset[str] | None = None
    """The apps of ``fleet`` that this read found changed (None: any may have)."""
    settled: tuple[int, float] | None = None
    """A replica whose lead is over (``Cluster.settled``): the fencing token of its last
    lead, and until when (Fly's time) a cordon request of its own may still land."""

    def idle_s(self, load: AppLoad) -> float | None:
        """How long before the report was written ``load``'s app had its last request."""
        return idle_s(load.at, self.now)


@dataclass(frozen=True, slots=True)
class _Header:
    """A report's header as read (``Cluster._readable``): each number parsed once, here,
    and None where it is not said or does not parse (a report of the previous release
    says none)."""

    boot: str
    leader: bool
    fence: int | None
    gen: int | None
    since: int | None
    now: float | None
    changed: str | None
    settled: str | None


class _Seen:
    """What this replica has read of another's report, kept between rounds so that only
    the fields the report lists as changed are read (and parsed) again."""

    def __init__(self, boot: str) -> None:
        self.boot = boot
        self.gen: int | None = None
        self.now = 0.0
        self.loads: dict[str, AppLoad] = {}
        self.fleet: dict[str, AppFleet] = {}

    def replace(self, data: Mapping[str, str], header: _Header, on_bad: _OnBad) -> None:
        """The whole report (``HGETALL``); ``fleet_changed`` is then None (any app)."""
        self.loads.clear()
        self.fleet.clear()
        self.update(data, header, on_bad)

    def update(
        self, data: Mapping[str, str | None], header: _Header, on_bad: _OnBad
    ) -> frozenset[str]:
        """The fields listed as changed (None: deleted); the apps whose fleet changed. An
        app's entry that does not parse (a later version's format, a hand edit) reads as
        not said, and goes to ``on_bad`` (field, value, error): one bad entry must not
        fail every replica's read."""
        self.now = header.now or 0.0
        fleet = set()
        for k, v in data.items():
            if k.startswith("load:"):
                self.loads.pop(k[5:], None)
                if v is not None:
                    try:
                        self.loads[k[5:]] = AppLoad.from_json(v, self.now)
                    except _UNREADABLE as exc:
                        on_bad(k, v, exc)
            elif k.startswith("fleet:"):
                app = k[6:]
                fleet.add(app)
                self.fleet.pop(app, None)
                if v is not None:
                    try:
                        self.fleet[app] = _fleet(app, v, data)
                    except _UNREADABLE as exc:
                        on_bad(k, v, exc)
        return frozenset(fleet)


_OnBad = Callable[[str, str, Exception], None]
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError)
"""What parsing a report's entry raises when it is not in this version's format."""


def _fleet(app: str, machines: str, data: Mapping[str, str | None]) -> AppFleet:
    """The leader's view of ``app`` in a report: its machines, and its fields beside."""
    listed = _machines(json.loads(machines))
    seq = data.get(f"seq:{app}")
    crit = data.get(f"crit:{app}")  # None from a previous release's leader
    how = data.get(f"how:{app}")  # likewise
    sick = data.get(f"sick:{app}")  # likewise
    miss = data.get(f"miss:{app}")  # likewise
    ours = data.get(f"ours:{app}")  # likewise
    return AppFleet(
        _count_text(seq or "0"),
        listed,
        _ids(json.loads(crit) if crit else None),
        _how(json.loads(how) if how else None),
        _ids(json.loads(sick) if sick else None),
        _flag(json.loads(miss) if miss else None),
        _ids(json.loads(ours) if ours else None),
    )


def _machines(listed: Any) -> list[list[Any]]:
    """A published list of machines, ``[id, host, port, state, cordoned]`` each, the port
    one the followers can route to. ValueError if it is not so."""
    if not isinstance(listed, list) or not all(isinstance(m, list) and len(m) == 5 for m in listed):
        raise ValueError("not a list of [id, host, port, state, cordoned] lists")
    machines = []
    for mid, host, port, state, cordoned in listed:
        number = _count(port)
        if not 0 < number < 65536:
            raise ValueError(f"not a port: {port!r}")
        # The follower's apply took str() of each and bool() of the cordon: a list or a
        # number passed for an id, a host or a state, and any truthy value (1, "no") cordoned.
        if not (isinstance(mid, str) and isinstance(host, str) and isinstance(state, str)):
            raise ValueError(f"not a machine's id, host and state: {[mid, host, state]!r}")
        if not isinstance(cordoned, bool):
            raise ValueError(f"not a cordon (true or false): {cordoned!r}")
        machines.append([mid, host, number, state, cordoned])
    return machines


def _finite(value: Any) -> float:
    """A number of a report's JSON: finite, and no boolean (Python's JSON reads ``true``
    as a number ``float`` takes for 1) nor string (``float`` reads ``"3"``; a header's
    text goes through :func:`_finite_text`)."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"not a number: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value}")
    return number


def _amount(value: Any) -> float:
    """A quantity of a report (an area of load, an idle time): finite, not negative. JSON
    as Python reads it says NaN and Infinity, and one such load made the leader's summed
    load of the app NaN or infinite, which the policy then decided on."""
    number = _finite(value)
    if number < 0:
        raise ValueError(f"a negative amount: {value}")
    return number


def _count(value: Any) -> int:
    """A count of a report (requests, ejections, a port, a sequence number, a fencing
    token), a JSON value or a header's text: a whole number, not negative; the one
    reader of every integer of a report. ValueError, not ``int``'s OverflowError, for an
    infinity: no reader caught that one, and one report failed every replica's read. Nor
    is a number that is not whole truncated (``int`` read 1.5 as 1), nor a boolean
    taken for 0 or 1: they read as not said, as any field that does not parse."""
    if isinstance(value, (bool, str)):  # a string: int() read "3" as 3; see _count_text
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, float) and not value.is_integer():  # NaN and infinities too
        raise ValueError(f"not a whole number: {value}")
    number = int(value)
    if number < 0:
        raise ValueError(f"a negative count: {value}")
    return number


def _count_text(text: str) -> int:
    """A count of a report written as text (a header's number, a view's ``seq:{app}``,
    ``settled``'s token): ASCII digits only, as the writer's ``str`` of an int spells it.
    ``int`` also read " 7", "+7", "7_0" (70) and other scripts' digits."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"not a count: {text!r}")
    return int(text)


_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?")
"""A float as ``repr`` writes it (finite), the only text a header's time is written as."""


def _finite_text(text: str) -> float:
    """A time of a report written as text (a header's ``now``, ``settled``'s time), as
    ``repr`` of a finite float spells it: ``float`` also read " 7", "7_0", "nan"..."""
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError(f"not a number: {text!r}")
    return _finite(float(text))


def _settled(text: str | None) -> tuple[int, float] | None:
    """``Cluster.settled`` as written; None if not said (or by an older version).
    ValueError if it does not parse (a format of a later version)."""
    if not text:
        return None
    token, until = text.split(" ")
    return _count_text(token), _finite_text(until)


class LocalLoad:
    """This replica's cumulative load per app, integrated from the proxy's meters."""

    def __init__(self) -> None:
        self.area: dict[str, float] = {}
        self._peaks: dict[str, int] = {}

    def take(
        self, app: str, meter: ConcurrencyMeter, now: float, *, sampled: bool = True
    ) -> tuple[float, int]:
        """Fold the meter's load since its previous take in; (cumulative area, the peak
        since the previous take). Reports and the leader's samples both take: the area is
        cumulative, so neither steals from the other. The peak is kept for the leader's
        next sample only if the app is ``sampled`` (one we scale): no sample took a
        static app's out, and the app, made scaled again, started from them."""
        s = meter.take(now)
        area = self.area.get(app, 0.0) + s.average * max(0.0, s.end - s.start)
        self.area[app] = area
        if sampled:
            self._peaks[app] = max(self._peaks.get(app, 0), s.peak)
        return area, s.peak

    def pop_peak(self, app: str) -> int:
        """The peak since the previous ``pop_peak`` (the leader's previous sample)."""
        return self._peaks.pop(app, 0)

    def forget(self, app: str) -> None:
        """Drop ``app`` (``Cluster.forget``)."""
        self.area.pop(app, None)
        self._peaks.pop(app, None)

    def drop_peaks(self) -> None:
        """Forget every peak (``Cluster.lead_begins``)."""
        self._peaks.clear()


class ClusterLoad:
    """The leader's view of the whole cluster's demand, one :class:`Sample` per tick."""

    def __init__(self) -> None:
        self._prev: dict[str, tuple[float, dict[str, float]]] = {}
        self._peaks: dict[str, dict[str, int]] = {}
        self._reporters: frozenset[str] = frozenset()
        """The replicas (``_reporter``) whose reports ``note_peaks`` saw last."""

    def note_peaks(self, reports: Mapping[str, Report], apps: Container[str] | None = None) -> None:
        """Remember each report's peak until the next sample (reports come every 250 ms,
        ticks less often: a burst between two ticks must not be lost). The peaks of a
        replica that is gone (or restarted: a new boot) are dropped, as a sample counts
        nothing of it: only a sample took peaks out, and only of the apps it samples (a
        follower's none, the leader's none of the apps it does not scale), so a peak was
        kept for good per boot of every replica ever read.

        With ``apps``, only the peaks of those (the apps we scale) are noted: during a
        rollout that removes an app, a replica still on the old config goes on reporting
        it, and its peaks, noted again after ``Cluster.forget``, were kept for good, and
        came back in the first sample of the app if it was added back (a burst long gone
        taken for activity now: the app kept up, or woken)."""
        reporters = frozenset(_reporter(report) for report in reports.values())
        if reporters != self._reporters:
            self._reporters = reporters
            for app, peaks in list(self._peaks.items()):
                for key in peaks.keys() - reporters:
                    del peaks[key]
                if not peaks:
                    del self._peaks[app]
        for report in reports.values():
            for app, load in report.loads.items():
                if not load.peak or (apps is not None and app not in apps):
                    continue
                key = _reporter(report)
                peaks = self._peaks.setdefault(app, {})
                peaks[key] = max(peaks.get(key, 0), load.peak)

    def forget(self, app: str) -> None:
        """Drop ``app`` (``Cluster.forget``): its next sample is a first one."""
        self._prev.pop(app, None)
        self._peaks.pop(app, None)

    def restart(self) -> None:
        """Every app's next sample is a first one, with only the peaks noted from now on
        (``Cluster.lead_begins``)."""
        self._prev.clear()
        self._peaks.clear()

    def sample(
        self,
        app: str,
        now: float,
        local: tuple[str, float, int, int],
        reports: Mapping[str, Report],
    ) -> Sample:
        """The cluster's load on ``app`` since the previous sample.

        ``local`` is this replica's (key, cumulative area, level now, peak); ``reports`` the
        others' latest. A replica seen for the first time counts its level over the whole
        span; one that vanished (its report expired) counts nothing.
        """
        key, area, level, peak = local
        areas = {key: area}
        levels = {key: level}
        peaks = self._peaks.pop(app, {})
        peaks[key] = max(peaks.get(key, 0), peak)
        for report in reports.values():
            load = report.loads.get(app)
            if load is None:
                continue
            rkey = _reporter(report)
            behind = max(0.0, report.age_s + (now - report.read_at))
            areas[rkey] = load.area + load.level * behind
            levels[rkey] = load.level
            peaks[rkey] = max(peaks.get(rkey, 0), load.peak, load.level)
        prev = self._prev.get(app)
        self._prev[app] = (now, areas)
        total_peak = sum(peaks.get(k, 0) for k in areas)
        if prev is None or now <= prev[0]:
            return Sample(now, now, float(sum(levels.values())), total_peak)
        since, before = prev
        span = now - since
        used = 0.0
        for k, a in areas.items():
            if k in before and a >= before[k]:
                used += a - before[k]
            else:
                used += levels[k] * span  # new (or restarted) replica: its level throughout
        return Sample(since, now, used / span, total_peak)


def _reporter(report: Report) -> str:
    """Whose load a report is: the replica, and its boot (a restarted replica counts from
    zero again)."""
    return _reporter_key(report.replica, report.boot)


def _reporter_key(replica: str, boot: str) -> str:
    return f"{replica}#{boot}"


def connect(url: str, ttl_s: float) -> Any:
    """A redis-py asyncio client (imported here: only cluster mode needs redis).

    Every command answers within a third of the lease, or fails: a hung Redis must not
    hold the lease loop past the lease's own deadline. No retries with backoff inside the
    client: the replica's next round (250 ms later) is the retry.

    The bound is ours (``asyncio.timeout`` around each command and each pipeline), not
    redis-py's ``socket_timeout``: with a socket timeout, redis-py sends every command
    under ``asyncio.wait_for``, which on Python 3.11 drops a cancellation that comes in
    the same turn of the loop as the send's end, so a task that sends commands could be
    cancelled over and over before it stopped (a loop of EVALs on loopback took up to
    minutes; tests/state/test_cancel.py). Reads under redis-py's own timeout use
    ``asyncio.timeout`` too, which keeps cancellations.
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    timeout = command_timeout_s(ttl_s)
    client = _bounded_redis().from_url(
        url,
        decode_responses=True,
        socket_timeout=None,  # not redis-py's default (5 s), which sends under wait_for
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    client.command_timeout_s = timeout
    return client


def command_timeout_s(ttl_s: float) -> float:
    """How long one Redis command may take: a third of the lease TTL."""
    return max(0.05, ttl_s / 3)


@functools.cache
def _bounded_redis() -> Any:
    """redis-py's client and pipeline with each command (each pipeline's execution)
    bounded by ``command_timeout_s`` through ``asyncio.timeout``."""
    import redis.asyncio as aioredis
    from redis.asyncio.client import Pipeline

    class BoundedPipeline(Pipeline):
        command_timeout_s: float | None = None

        async def execute(self, raise_on_error: bool = True) -> list[Any]:
            async with asyncio.timeout(self.command_timeout_s):
                return await super().execute(raise_on_error)

    class BoundedRedis(aioredis.Redis):
        command_timeout_s: float | None = None

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            async with asyncio.timeout(self.command_timeout_s):
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

        def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Any:
            pipe = BoundedPipeline(
                self.connection_pool, self.response_callbacks, transaction, shard_hint
            )
            pipe.command_timeout_s = self.command_timeout_s
            return pipe

    return BoundedRedis


class Cluster:
    """This replica's membership: its lease, its reports, and what it read of the others."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        redis: Any = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if settings.redis_url is None and redis is None:
            raise ValueError("cluster mode needs cluster.redis_url")
        self.settings = settings
        self.clock = clock
        self.replica_id = settings.replica_id or default_replica_id()
        self.prefix = settings.key_prefix
        self.redis = (
            redis
            if redis is not None
            else connect(settings.redis_url.get_secret_value(), settings.lease_ttl_s)  # type: ignore[union-attr]
        )
        self.boot = uuid.uuid4().hex[:12]
        self.lease = Lease(
            self.redis, self.prefix, self.replica_id, settings.lease_ttl_s, clock=clock
        )
        self.claims = WakeClaims(
            self.redis, self.prefix, self.replica_id, settings.lease_ttl_s, clock=clock
        )
        self.local = LocalLoad()
        self.load = ClusterLoad()
        self.others: dict[str, Report] = {}
        """The other replicas' latest reports (ours excluded)."""
        self.settled = ""
        """What our report says of a lead of ours that is over (the replica sets it):
        "<token> <until>", the fencing token of our last lead and until when (Fly's time)
        a cordon request of ours may still land (``Actuator.settled_until``); empty while
        we lead, step down, or never led. The next leader reads it off the keys that name
        us (``Report.settled``)."""
        self._arrivals: dict[tuple[str, str], tuple[float, float]] = {}
        """(replica, app) -> (its last request's time on its clock, that time on ours as
        first estimated): one request keeps one time, read after read."""
        self._gen = 0
        self._changes: deque[tuple[int, list[str]]] = deque(maxlen=CHANGES_KEPT)
        self._full_next = True
        self._sent_loads: dict[str, AppLoad] = {}
        self._sent_fleet: dict[str, int] = {}
        self._seen: dict[str, _Seen] = {}
        self._bad: dict[tuple[str, str], str] = {}
        """(replica, field of its report) -> the boot whose field we could not read, said
        once (``_said_once``)."""
        self.departed: dict[str, tuple[int, float]] = {}
        """Boot -> what a replica that stopped left in ``settled`` (:meth:`close`), read
        every round while it lasts: it is no member, but the next leader may be waiting
        on a cordon key of its own."""
        self.gone: dict[str, float] = {}
        """Replica id -> when (our clock) a read last found it had left: listed as a member
        with its report expired, read before and not now (another replica unlisted it, or
        it stopped), or named by a ``departed`` record or in ``gone_key`` (it left before
        we joined: we never read it; or in ``expired_key``, by a previous release). Not a
        member now, nor us; kept ``GONE_KEPT_S``. The machine leases it left are adopted
        (``Leases.former``)."""
        self.leader_id: str | None = None
        self.last_read_at: float | None = None
        self.last_report_at: float | None = None

    @property
    def replicas_key(self) -> str:
        return f"{self.prefix}:replicas"

    def report_key(self, replica: str) -> str:
        return f"{self.prefix}:replica:{replica}"

    @property
    def departed_key(self) -> str:
        return f"{self.prefix}:departed"

    @property
    def gone_key(self) -> str:
        """The ids of members whose report a reader found expired, and unlisted: for the
        replicas that join after that (``gone``). A sorted set, each id scored by when it
        was added (Redis's clock, ms) and kept ``GONE_KEPT_S`` from then."""
        return f"{self.prefix}:gone"

    @property
    def expired_key(self) -> str:
        """The previous release's ``gone_key``: a plain set, kept as a whole for
        ``GONE_KEPT_S`` from its latest addition. Its replicas still add to it in a
        rolling upgrade (a sorted set under this name would fail their ``SADD`` and
        ``SMEMBERS``), so this code reads it too, and writes only ``gone_key``; once no
        replica of that release is left, it expires by itself."""
        return f"{self.prefix}:expired"

    def settled_key(self, boot: str) -> str:
        return f"{self.prefix}:settled:{boot}"

    @property
    def wakes_key(self) -> str:
        return f"{self.prefix}:wakes"

    @property
    def view_channel(self) -> str:
        return f"{self.prefix}:view"

    async def publish(
        self,
        loads: Mapping[str, AppLoad],
        fleet: Mapping[str, AppFleet] | None,
        measured: Collection[str] | None = None,
    ) -> None:
        """Write this replica's report (and, from the leader, its fleet view).

        Only what changed since the previous report is written (the header lists it), so
        the apps at rest, nearly all of a thousand, cost nothing per round: neither here
        nor in the readers. The whole report is written again after any failure, and when
        the key had expired meanwhile (the partial write then found nothing to add to).
        ``measured`` names the only apps whose load may differ from the last report, new
        apps included (None: any may), so that the others' loads need not be compared."""
        full = self._full_next
        self._full_next = True  # until this write is known to have gone through
        key = self.report_key(self.replica_id)
        now = self.clock()
        fields, gone = self._diff(loads, fleet or {}, now, full, measured)
        await asyncio.sleep(0)  # the proxy's requests go in before the write is packed
        self._gen += 1
        if full:
            self._changes.clear()
        else:
            self._changes.append((self._gen, [*fields, *gone]))
        leading = self.lease.held()
        header = {
            "boot": self.boot,
            "leader": "1" if leading else "0",
            "fence": str(self.lease.token or 0) if leading else "0",
            "gen": str(self._gen),
            "now": repr(now),
            # What changed in the writes since ``since`` (this one included): a reader
            # that last read the report as written at ``since - 1`` or later reads those.
            "changed": "*"
            if full
            else json.dumps(list(dict.fromkeys(f for _, fs in self._changes for f in fs))),
            "since": str(self._changes[0][0] if self._changes else self._gen),
            "settled": self.settled,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            if full:
                pipe.delete(key)
            else:
                pipe.exists(key)
            pipe.hset(key, mapping={**header, **fields})
            if gone:
                pipe.hdel(key, *gone)
            pipe.pexpire(key, round(REPORT_TTL_S * 1000))
            pipe.sadd(self.replicas_key, self.replica_id)
            results = await pipe.execute()
        if not full and not results[0]:
            return await self.publish(loads, fleet, measured)  # expired: what we add to is gone
        self._full_next = False
        self._sent_loads = dict(loads)
        self._sent_fleet = {app: view.seq for app, view in (fleet or {}).items()}
        self.last_report_at = self.clock()

    def _diff(
        self,
        loads: Mapping[str, AppLoad],
        fleet: Mapping[str, AppFleet],
        now: float,
        full: bool,
        measured: Collection[str] | None,
    ) -> tuple[dict[str, str], list[str]]:
        """The fields to write (all of them if ``full``) and to delete."""
        fields: dict[str, str] = {}
        gone: list[str] = []
        sent_loads = {} if full else self._sent_loads
        for app in loads if full or measured is None else measured:
            load = loads.get(app)
            if load is None:
                continue
            if sent_loads.get(app) != load:
                fields[f"load:{app}"] = load.to_json(now)
        sent_fleet = {} if full else self._sent_fleet
        for app, view in fleet.items():
            if sent_fleet.get(app) != view.seq:
                # The machines as before, their sequence apart: a replica of the previous
                # release (a rolling upgrade) still reads the view.
                fields[f"fleet:{app}"] = json.dumps(view.machines)
                fields[f"seq:{app}"] = str(view.seq)
                fields[f"crit:{app}"] = json.dumps(list(view.critical))
                fields[f"how:{app}"] = json.dumps(dict(view.how))
                fields[f"sick:{app}"] = json.dumps(list(view.down_sick))
                fields[f"miss:{app}"] = json.dumps(view.missing)
                fields[f"ours:{app}"] = json.dumps(list(view.ours))
        if not full and sent_loads.keys() != loads.keys():
            gone += [f"load:{app}" for app in sent_loads if app not in loads]
        if not full and sent_fleet.keys() != fleet.keys():
            for app in sent_fleet:
                if app not in fleet:
                    gone += [
                        f"{f}:{app}"
                        for f in ("fleet", "seq", "crit", "how", "sick", "miss", "ours")
                    ]
        return fields, gone

    async def read(self, apps: Container[str] | None = None) -> dict[str, Report]:
        """Every other replica's report; forgets (and unlists) replicas whose report expired.

        Reads each report's header, then only the fields it lists as changed since the
        report was read last; the whole report when this replica missed more than
        ``CHANGES_KEPT`` of its writes or a whole write, or the report comes from a
        replica of the previous release (which writes no such header).

        ``apps``: the apps we scale (None: any). What the others report of another app (a
        replica still on a config that has it, while a rollout removes it) is read, as
        the report is, but keeps no state here between reads (``ClusterLoad.note_peaks``):
        what :meth:`forget` dropped does not come back."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(self.replicas_key)
            pipe.smembers(self.departed_key)
            gone_read = ((self.gone_key,), (round(GONE_KEPT_S * 1000),))
            _GONE_READ.queue(pipe, *gone_read)
            pipe.smembers(self.expired_key)
            answers = await pipe.execute(raise_on_error=False)
        answers[2] = await _GONE_READ.answer(self.redis, answers[2], *gone_read)
        raise_first_error(answers)
        members, departed, gone_ids, expired_ids = answers
        ids = sorted(members)
        boots = sorted(departed)
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hmget(self.report_key(rid), HEADER)
                pipe.pttl(self.report_key(rid))
            for boot in boots:
                pipe.hmget(self.settled_key(boot), ("replica", "settled"))
            pipe.get(self.lease.key)
            results = await pipe.execute()
        self.leader_id = results[-1]
        said_departed = results[2 * len(ids) : -1]
        expired = self._read_departed(boots, said_departed)
        fetch: list[tuple[str, _Header, list[str] | None]] = []
        ttls: dict[str, int] = {}
        gone = []
        for i, rid in enumerate(ids):
            said = dict(zip(HEADER, results[2 * i], strict=True))
            pttl = results[2 * i + 1]
            if said["boot"] is None or pttl is None or pttl < 0:
                gone.append(rid)
                self._seen.pop(rid, None)
                for key in [k for k in self._bad if k[0] == rid]:
                    del self._bad[key]
                continue
            if rid == self.replica_id:
                continue
            header = self._readable(rid, said)
            ttls[rid] = pttl
            fetch.append((rid, header, self._wanted(rid, header)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid, _, wanted in fetch:
                if wanted is None:
                    pipe.hgetall(self.report_key(rid))
                elif wanted:
                    pipe.hmget(self.report_key(rid), wanted)
            fetched = iter(await pipe.execute())
        now = self.clock()
        others: dict[str, Report] = {}
        for rid, header, wanted in fetch:
            on_bad = functools.partial(self._bad_field, rid, header.boot)
            seen = self._seen.get(rid)
            if wanted is None or seen is None:
                seen = self._seen[rid] = _Seen(header.boot)
                seen.replace(next(fetched), header, on_bad)
                changed: frozenset[str] | None = None
            elif wanted:
                changed = seen.update(dict(zip(wanted, next(fetched), strict=True)), header, on_bad)
            else:
                changed = frozenset()
            seen.gen = header.gen
            fence = header.fence or 0
            self.lease.observe(fence)
            others[rid] = Report(
                replica=rid,
                boot=seen.boot,
                leader=header.leader,
                age_s=max(0.0, REPORT_TTL_S - ttls[rid] / 1000),
                read_at=now,
                loads=dict(seen.loads),
                fleet=dict(seen.fleet),
                fence=fence,
                now=seen.now,
                fleet_changed=changed,
                settled=self._settled_of(rid, seen.boot, header.settled),
            )
        if gone:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.srem(self.replicas_key, *gone)
                # Unlisted, it would be known gone only to the replicas that saw it a
                # member: one that joins later waited out the machine leases it left.
                pipe.eval(_GONE_ADD, 1, self.gone_key, round(GONE_KEPT_S * 1000), *gone)
                await pipe.execute()
        if expired:
            await self.redis.srem(self.departed_key, *expired)
        self._note_gone(
            {
                *gone,
                *self.others,
                *(rid for rid, _ in said_departed if rid is not None),
                *gone_ids,
                *expired_ids,
            },
            others,
            now,
        )
        self.others = others
        for key in [k for k in self._arrivals if k[0] not in others]:
            del self._arrivals[key]
        self.last_read_at = now
        self.load.note_peaks(others, apps)
        return others

    def _note_gone(self, left: Collection[str], others: Mapping[str, Report], now: float) -> None:
        """Update ``gone``: ``left`` are the replicas that this read found not members
        (those the previous read found, the live ones among them taken out here)."""
        live = {*others, self.replica_id}
        for rid in left:
            if rid not in live:
                self.gone[rid] = now
        for rid in [r for r, at in self.gone.items() if r in live or now - at > GONE_KEPT_S]:
            del self.gone[rid]

    async def may_act(self, replica: str, app: str) -> bool:
        """Whether Redis still lets ``replica`` change ``app``'s machines: it holds the
        leader lease, or the app's wake claim (its calls' fence passes under either:
        control/fencing.py). Redis errors propagate: the caller's doubt."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.lease.key)
            pipe.get(self.claims.key(app))
            leader, claim = await pipe.execute()
        return replica in (leader, claim_holder(claim))

    def _read_departed(self, boots: list[str], said: list[list[str | None]]) -> list[str]:
        """Set ``departed`` as read; the boots whose record expired."""
        departed: dict[str, tuple[int, float]] = {}
        expired = []
        for boot, (rid, text) in zip(boots, said, strict=True):
            if rid is None:
                expired.append(boot)
            elif (settled := self._settled_of(rid, boot, text)) is not None:
                departed[boot] = settled
        self.departed = departed
        return expired

    def _settled_of(self, rid: str, boot: str, text: str | None) -> tuple[int, float] | None:
        """What ``rid``'s report says in ``settled``; None, as if not said, if it does not
        parse (a format of a later version): one bad report must not fail every
        replica's read. Logged once per boot of the replica."""
        try:
            return _settled(text)
        except ValueError as exc:
            if self._said_once(rid, "settled", boot):
                _log.warning("cluster_bad_settled", replica=rid, settled=text, error=str(exc))
            return None

    def _said_once(self, rid: str, name: str, boot: str) -> bool:
        """Whether a field ``name`` of ``rid``'s report that we cannot read is news: true
        once per boot of the replica (a bad field is logged once, not every round)."""
        if self._bad.get((rid, name)) == boot:
            return False
        self._bad[(rid, name)] = boot
        return True

    def _readable(self, rid: str, header: Mapping[str, str | None]) -> _Header:
        """``rid``'s header (``HEADER``, as read; ``boot`` said) with its numbers parsed,
        those that do not parse (a format of a later version, a hand edit) taken as not
        said, as a report of the previous release says none: one bad report must not
        fail every replica's read. Without ``gen`` or ``since`` the report is read whole;
        without ``fence`` it fences nothing (0); without ``now`` its requests count as
        just made (the app is kept up: the safe side). Logged once per boot of the
        replica."""
        boot = str(header["boot"])

        def number(name: str, parse: Callable[[str], _N]) -> _N | None:
            text = header[name]
            if text is None:
                return None
            try:
                return parse(text)
            except ValueError as exc:
                self._bad_field(rid, boot, name, text, exc)
                return None

        return _Header(
            boot=boot,
            leader=header["leader"] == "1",
            gen=number("gen", _count_text),
            fence=number("fence", _count_text),
            since=number("since", _count_text),
            now=number("now", _finite_text),
            changed=header["changed"],
            settled=header["settled"],
        )

    def _bad_field(self, rid: str, boot: str, name: str, text: str, exc: Exception) -> None:
        """A field of ``rid``'s report (of its boot ``boot``) that we read as not said:
        logged once per boot of the replica for a header field, and once for all its
        apps' entries of a kind (``load``, ``fleet``): a later version's format has them
        all so."""
        if self._said_once(rid, name.partition(":")[0], boot):
            _log.warning(
                "cluster_bad_field", replica=rid, field=name, value=text[:200], error=str(exc)
            )

    def _wanted(self, rid: str, header: _Header) -> list[str] | None:
        """The fields of ``rid``'s report to read: those its header lists as changed if we
        read the report just before (an empty list: nothing new), None for all of it."""
        seen = self._seen.get(rid)
        gen = header.gen
        if seen is None or gen is None or seen.boot != header.boot or seen.gen is None:
            return None
        if gen == seen.gen:
            return []
        since, text = header.since, header.changed
        if since is None or not since - 1 <= seen.gen < gen or text is None or text == "*":
            return None
        try:
            listed = json.loads(text)
            if not isinstance(listed, list):
                raise ValueError("not a list of fields")
        except ValueError as exc:  # read whole, as a report that lists nothing
            self._bad_field(rid, header.boot, "changed", text, exc)
            return None
        return [str(f) for f in listed]

    def sample(self, app: str, meter: ConcurrencyMeter, now: float) -> Sample:
        """The whole cluster's load on ``app`` since the previous call (the leader's tick)."""
        area, _ = self.local.take(app, meter, now)
        peak = self.local.pop_peak(app)
        key = _reporter_key(self.replica_id, self.boot)
        return self.load.sample(app, now, (key, area, meter.level, peak), self.others)

    def lead_begins(self) -> None:
        """We lead from now on: our samples begin anew. While we followed, our peaks and
        the others' were noted, and none taken out (only the leader samples): the first
        sample of our lead carried the largest peak of each app since we started (or
        last led), and spanned the time since our last lead's sample, however long ago.
        The load windows take a sample's peak for activity at its end (``last_active``):
        an app at rest for longer than its idle time was kept up for another one, or
        woken from zero for a request long gone. Its last request's time is known apart
        (``last_request_at``); the first sample of our lead is a baseline, the load now
        (as a new leader's, or a new app's)."""
        self.local.drop_peaks()
        self.load.restart()

    def forget(self, app: str) -> None:
        """Drop what we keep of ``app``'s load (our area and peaks, the leader's previous
        sample and the others' peaks, the others' last requests' times): the app is no
        longer ours (a reload took it away). Kept, it was one entry per app ever seen,
        and an app added back resumed from them: the leader's first sample of it spanned
        the time it was away (a baseline now, as for a new app)."""
        self.local.forget(app)
        self.load.forget(app)
        for rid in self.others:  # (the only replicas ``_arrivals`` names: ``read``)
            self._arrivals.pop((rid, app), None)

    def remote_in_flight(self, app: str) -> dict[str, int]:
        """The other replicas' requests in flight per machine of ``app``, summed."""
        return self._summed(app, lambda load: load.machines)

    def remote_long_lived(self, app: str) -> dict[str, int]:
        """The other replicas' long-lived connections per machine of ``app``, summed."""
        return self._summed(app, lambda load: load.long_lived)

    def _summed(
        self, app: str, per_machine: Callable[[AppLoad], Mapping[str, int]]
    ) -> dict[str, int]:
        """A per-machine count of the other replicas' loads on ``app``, summed."""
        counts: dict[str, int] = {}
        for report in self.others.values():
            load = report.loads.get(app)
            if load is not None:
                for mid, n in per_machine(load).items():
                    counts[mid] = counts.get(mid, 0) + n
        return counts

    def remote_failing(self, app: str) -> dict[str, dict[str, int]]:
        """The other replicas' ejections in a row per machine of ``app``: replica ->
        machine -> count, replicas that report none left out."""
        return {
            rid: dict(load.failing)
            for rid, report in self.others.items()
            if (load := report.loads.get(app)) is not None and load.failing
        }

    def remote_demand(self, app: str) -> int:
        """The other replicas' requests on ``app`` in flight or held, summed."""
        return sum(
            load.in_flight + load.held
            for report in self.others.values()
            if (load := report.loads.get(app)) is not None
        )

    def last_request_at(self, app: str, local: float | None, now: float) -> float | None:
        """The latest request of any replica on ``app``, on our clock. A request's time is
        estimated once (from the report's age when read): estimated again at each read,
        the latencies of the write and the read moved it by a millisecond or two, and a
        request that moved looked like a new one (a missed pre-warm judged a hit)."""
        latest = local
        for rid, report in self.others.items():
            load = report.loads.get(app)
            idle = None if load is None else report.idle_s(load)
            if load is None or load.at is None or idle is None:
                continue
            known = self._arrivals.get((rid, app))
            if known is not None and known[0] == load.at:
                at = known[1]
            else:
                at = report.read_at - report.age_s - idle
                self._arrivals[(rid, app)] = (load.at, at)
            latest = at if latest is None else max(latest, at)
        return latest

    def leader_fleet(
        self,
    ) -> tuple[int, Mapping[str, AppFleet], frozenset[str] | None] | None:
        """The fleet view the leader published last, with its fencing token and the apps
        the last read found changed (None: any); None when no leader's report is read."""
        for report in self.others.values():
            if report.leader and report.replica == self.leader_id:
                return report.fence, report.fleet, report.fleet_changed
        return None

    async def push_view(self, push: ViewPush) -> None:
        """Publish a change of the leader's view to every follower listening now."""
        await self.redis.publish(self.view_channel, push.to_json())

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:wake"

    async def watch_views(
        self,
        on_push: Callable[[ViewPush], None],
        on_subscribed: Callable[[], Awaitable[None]] | None = None,
        on_wake: Callable[[str], None] | None = None,
    ) -> None:
        """Deliver every pushed view change to ``on_push``, and every wake request
        published by a follower to ``on_wake``, for ever (cancel to stop).

        On a Redis error it subscribes again after ``REPORT_S``; what was pushed meanwhile
        is lost to this replica, and the report it reads every round repairs its view (as
        the wake list that the leader pops every round repairs a lost wake request).
        ``on_subscribed`` runs each time the subscription is in place."""
        failing = False
        channels = [self.view_channel] + ([self.wake_channel] if on_wake is not None else [])
        while True:
            pubsub = self.redis.pubsub()
            try:
                async with asyncio.timeout(command_timeout_s(self.settings.lease_ttl_s)):
                    await pubsub.subscribe(*channels)
                if failing:
                    _log.info("cluster_view_push_back", replica=self.replica_id)
                failing = False
                if on_subscribed is not None:
                    await on_subscribed()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    if message.get("channel") == self.wake_channel:
                        if on_wake is not None:
                            on_wake(str(message["data"]))
                        continue
                    try:
                        push = ViewPush.from_json(message["data"])
                    except _UNREADABLE as exc:
                        _log.warning("cluster_bad_view_push", error=str(exc))
                        continue
                    if push.leader != self.replica_id:
                        on_push(push)
            except asyncio.CancelledError:
                await _close_quietly(pubsub)
                raise
            except Exception as exc:  # redis' errors: the rounds' reads keep the view right
                if not failing:
                    _log.warning("cluster_view_push_lost", error=str(exc))
                failing = True
                await _close_quietly(pubsub)
                await asyncio.sleep(REPORT_S)

    async def request_wake(self, app: str) -> None:
        """Ask the leader to wake ``app``: at once through pub/sub, and in the list that
        it pops every round (a leader that was not listening still hears it)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.wakes_key, app)
            # Requests nobody serves (no leader for a while) must not pile up for ever.
            pipe.pexpire(self.wakes_key, round(4 * self.settings.lease_ttl_s * 1000))
            pipe.publish(self.wake_channel, app)
            await pipe.execute()

    async def pop_wakes(self) -> list[str]:
        """Every wake requested since the previous call, deduplicated (the leader)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(self.wakes_key, 0, -1)
            pipe.delete(self.wakes_key)
            apps, _ = await pipe.execute()
        return list(dict.fromkeys(apps))

    async def close(self, *, keep_settled_s: float = 0.0) -> None:
        """Leave the cluster: take our report out (we are no member any more) and give
        the lease up. With ``keep_settled_s``, what ``settled`` says stays that long
        under our boot id (``departed``, as the others read it): a cordon key of ours
        that the next leader finds names us, and it waits till the key's time unless we
        say that no request of ours can land any more. Written before the lease goes, so
        a next leader reads it from its first round.

        Our id goes into ``gone_key`` too, as a member's whose report expired: a lease of
        ours that the stop left on a machine (an acquire or a release cut off) is adopted
        by a replica that joins after we left, as by those that saw us a member, instead
        of waited out for its TTL. Without it, a follower that never led (no ``settled``
        to leave) was known gone only to the replicas that had read it a member."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.report_key(self.replica_id))
                pipe.srem(self.replicas_key, self.replica_id)
                pipe.eval(_GONE_ADD, 1, self.gone_key, round(GONE_KEPT_S * 1000), self.replica_id)
                if self.settled and keep_settled_s > 0:
                    ttl_ms = round(keep_settled_s * 1000)
                    key = self.settled_key(self.boot)
                    pipe.hset(key, mapping={"replica": self.replica_id, "settled": self.settled})
                    pipe.pexpire(key, ttl_ms)
                    pipe.sadd(self.departed_key, self.boot)
                    pipe.pexpire(self.departed_key, ttl_ms)  # each record lasts as long
                await pipe.execute()
        except Exception:  # noqa: S110 - the report expires by its TTL anyway
            pass
        await self.lease.release()
        await self.redis.aclose()

    def status(self, now: float) -> dict[str, Any]:
        """The ``cluster`` section of ``/status``."""
        me = {
            "id": self.replica_id,
            "leader": self.lease.held(),
            "report_age_s": None
            if self.last_report_at is None
            else round(max(0.0, now - self.last_report_at), 3),
        }
        replicas = [me]
        for report in self.others.values():
            replicas.append(
                {
                    "id": report.replica,
                    "leader": report.leader,
                    "report_age_s": round(report.age_s + (now - report.read_at), 3),
                    "apps": {
                        app: {
                            "in_flight": load.in_flight,
                            "held": load.held,
                            "idle_s": None
                            if (idle := report.idle_s(load)) is None
                            else round(idle, 3),
                        }
                        for app, load in report.loads.items()
                    },
                }
            )
        return {
            "replica": self.replica_id,
            "leader": self.leader_id,
            "leading": self.lease.held(),
            "fence_token": self.lease.token,
            "replicas": replicas,
        }


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def idle_s(last_request_at: float | None, now: float) -> float | None:
    return None if last_request_at is None else max(0.0, now - last_request_at)


__all__ = [
    "REPORT_S",
    "REPORT_TTL_S",
    "AppFleet",
    "AppLoad",
    "Cluster",
    "ClusterLoad",
    "LocalLoad",
    "Report",
    "ViewPush",
    "connect",
    "idle_s",
]

"""Replicas' reports against a real redis-server: each round writes, and each reader reads
and parses, only what changed, so a thousand apps at rest cost nothing per round; a reader
that missed a round, a report that expired and a replica of the previous release are read
whole, and right."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from autoscaler.config import ClusterSettings
from autoscaler.state import cluster as cluster_module
from autoscaler.state.cluster import GONE_KEPT_S, AppFleet, AppLoad, Cluster, Report, ViewPush

APPS = [f"app{i:03d}" for i in range(200)]


# (A report outlives any stall of a loaded machine: conftest.py.)
pytestmark = pytest.mark.usefixtures("reports_outlive_any_stall")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def member(url: str, prefix: str, rid: str, clock: Clock) -> Cluster:
    settings = ClusterSettings(redis_url=SecretStr(url), replica_id=rid, key_prefix=prefix)
    return Cluster(settings, clock=clock)


@pytest.fixture
async def pair(redis_server: str, key_prefix: str) -> AsyncIterator[tuple[Cluster, Cluster, Clock]]:
    clock = Clock()
    writer, reader = (member(redis_server, key_prefix, rid, clock) for rid in ("w", "r"))
    yield writer, reader, clock
    for c in (writer, reader):
        await c.close()


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The load entries the readers parse, in order."""
    seen: list[str] = []
    real = AppLoad.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[AppLoad], text: str, now: float = 0.0) -> AppLoad:
        seen.append(text)
        return real(cls, text, now)  # type: ignore[no-any-return]

    monkeypatch.setattr(cluster_module.AppLoad, "from_json", classmethod(counting))
    return seen


def at_rest(at: float | None = None) -> dict[str, AppLoad]:
    return {app: AppLoad(area=5.0, level=0, at=at) for app in APPS}


def fleet(seq: int) -> dict[str, AppFleet]:
    return {app: AppFleet(seq, [[f"{app}-m", "127.0.0.1", 8000, "started", False]]) for app in APPS}


async def test_a_round_reads_only_what_changed(
    pair: tuple[Cluster, Cluster, Clock], parsed: list[str]
) -> None:
    writer, reader, clock = pair
    loads = at_rest(at=990.0)
    views = fleet(1)
    await writer.publish(loads, views)
    report = (await reader.read())["w"]
    assert len(parsed) == len(APPS)  # the first read is whole
    assert report.fleet_changed is None
    assert report.fleet == views
    assert report.idle_s(report.loads[APPS[0]]) == pytest.approx(10.0)

    # Ten rounds with one app busy and one app's view changed: only those are read.
    for n in range(10):
        parsed.clear()
        clock.now += 0.25
        loads = {**loads, APPS[7]: AppLoad(area=6.0 + n, level=1, in_flight=1, at=clock.now)}
        views = {**views, APPS[3]: AppFleet(2 + n, [])}
        await writer.publish(loads, views)
        report = (await reader.read())["w"]
        assert len(parsed) == 1
        assert json.loads(parsed[0])["area"] == 6.0 + n
        assert report.fleet_changed == {APPS[3]}
        assert report.fleet == views
        assert report.loads == loads
    # The apps at rest were not written again, yet their idle time moves on.
    assert report.idle_s(report.loads[APPS[0]]) == pytest.approx(12.5)
    assert report.idle_s(report.loads[APPS[7]]) == 0.0

    # A round with nothing new since the last read reads nothing but the header.
    parsed.clear()
    report = (await reader.read())["w"]
    assert parsed == []
    assert report.fleet_changed == frozenset()


async def test_a_reader_that_missed_rounds_reads_what_they_changed(
    pair: tuple[Cluster, Cluster, Clock], parsed: list[str]
) -> None:
    writer, reader, clock = pair
    loads = at_rest()
    await writer.publish(loads, fleet(1))
    await reader.read()
    # Two writes between two reads: one app gone, one changed, a view dropped.
    del loads[APPS[0]]
    await writer.publish(loads, fleet(1))
    loads[APPS[1]] = AppLoad(area=9.0, level=2, in_flight=2, at=clock.now)
    views = fleet(1)
    del views[APPS[2]]
    await writer.publish(loads, views)
    parsed.clear()
    report = (await reader.read())["w"]
    assert len(parsed) == 1  # APPS[1]; the deletions read as such
    assert report.loads == loads
    assert report.fleet == views
    assert report.fleet_changed == {APPS[2]}
    # More writes missed than the report lists: the whole report.
    loads[APPS[3]] = AppLoad(area=1.0, level=1, in_flight=1, at=clock.now)
    for _ in range(cluster_module.CHANGES_KEPT + 1):
        await writer.publish(loads, {})
    parsed.clear()
    report = (await reader.read())["w"]
    assert len(parsed) == len(loads)
    assert report.fleet_changed is None
    assert report.loads == loads
    assert report.fleet == {}


async def test_a_report_that_expired_is_written_whole_again(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str
) -> None:
    writer, reader, _ = pair
    loads = at_rest()
    await writer.publish(loads, None)
    await reader.read()
    await writer.redis.delete(writer.report_key("w"))  # as if its TTL ran out
    loads[APPS[5]] = AppLoad(area=1.0, level=1, in_flight=1)
    await writer.publish(loads, None)
    assert len(await writer.redis.hkeys(writer.report_key("w"))) > len(APPS)
    report = (await reader.read())["w"]
    assert report.loads == loads


async def test_a_report_of_the_previous_release_is_read(
    pair: tuple[Cluster, Cluster, Clock],
) -> None:
    """A replica of the previous release writes no header but ``boot``, ``leader`` and
    ``fence``, and each app's idle time instead of the time of its last request."""
    writer, reader, clock = pair
    old: dict[str, Any] = {"area": 3.0, "level": 0, "idle_s": 4.0, "machines": {}}
    key = writer.report_key("old")
    await writer.redis.hset(
        key, mapping={"boot": "b", "leader": "0", "fence": "0", "load:web": json.dumps(old)}
    )
    await writer.redis.pexpire(key, round(cluster_module.REPORT_TTL_S * 1000))  # as we write
    await writer.redis.sadd(writer.replicas_key, "old")
    first = None
    for _ in range(2):  # every round reads it whole, and right
        report = (await reader.read())["old"]
        assert report.loads["web"].area == 3.0
        assert report.loads["web"].long_lived == {}  # it counts none
        assert report.idle_s(report.loads["web"]) == pytest.approx(4.0)
        at = reader.last_request_at("web", None, clock.now)
        if first is None:
            first = at
            assert at == pytest.approx(clock.now - report.age_s - 4.0, abs=0.01)
        # The same request keeps the time first estimated: the report's age moves (by the
        # time between the two reads, which a loaded machine makes more than 10 ms).
        assert at == first
    # And it reads ours: the idle time as of when the entry was written.
    await writer.publish({"web": AppLoad(area=1.0, level=0, at=clock.now - 7.0)}, None)
    raw = await writer.redis.hget(writer.report_key("w"), "load:web")
    assert json.loads(raw)["idle_s"] == pytest.approx(7.0)


def follower_report(written: float, age_ms: int, read_at: float, at: float) -> Report:
    """A follower's report as ``Cluster.read`` builds it: written at ``written`` (its
    clock), its TTL ``age_ms`` old by Redis's PTTL, read at ``read_at`` (ours); its one
    request came at ``at`` (its clock)."""
    pttl = round(cluster_module.REPORT_TTL_S * 1000) - age_ms
    return Report(
        replica="b",
        boot="x",
        leader=False,
        age_s=max(0.0, cluster_module.REPORT_TTL_S - pttl / 1000),
        read_at=read_at,
        loads={"web": AppLoad(area=1.0, level=0, at=at)},
        now=written,
    )


def test_one_request_of_a_follower_keeps_one_time_read_after_read() -> None:
    """Each read estimated the request's time on our clock anew from the report's age,
    which the write's and the read's latencies move by a millisecond or two: the same
    request looked later, as a new one (a missed pre-warm was judged a hit)."""
    cs = Cluster(ClusterSettings(replica_id="a"), redis=object())
    # The request came at 500.0 on the follower's clock (ours runs 10,000 s ahead).
    cs.others = {"b": follower_report(510.00, 199, 10510.2010, 500.0)}
    first = cs.last_request_at("web", None, 10510.5)
    cs.others = {"b": follower_report(510.25, 197, 10510.4508, 500.0)}  # 250 ms on
    assert cs.last_request_at("web", None, 10510.75) == first
    # A new request is a new time.
    cs.others = {"b": follower_report(520.0, 10, 10520.02, 519.0)}
    later = cs.last_request_at("web", None, 10520.1)
    assert first is not None
    assert later is not None
    assert later > first + 18


async def test_the_leader_s_view_carries_how_each_machine_comes_up(
    pair: tuple[Cluster, Cluster, Clock],
) -> None:
    """A machine coming up is listed ``starting`` whether it resumes or boots cold: the
    view says which (``how``), in a whole read, a partial one and a push alike, so that a
    follower labels its held requests as the leader does. It said nothing of it."""
    writer, reader, _ = pair
    up = [["m1", "127.0.0.1", 8000, "starting", False], ["m2", "127.0.0.1", 8001, "stopped", False]]
    first = {APPS[0]: AppFleet(1, up, (), {"m1": "resume"})}
    await writer.publish(at_rest(), first)
    report = (await reader.read())["w"]
    assert report.fleet_changed is None  # whole
    assert report.fleet[APPS[0]].how == {"m1": "resume"}
    second = {APPS[0]: AppFleet(2, up, (), {"m1": "start", "m2": "start"})}
    await writer.publish(at_rest(), second)
    report = (await reader.read())["w"]
    assert report.fleet_changed == {APPS[0]}  # partial
    assert report.fleet[APPS[0]].how == {"m1": "start", "m2": "start"}
    push = ViewPush("w", 3, second)
    assert ViewPush.from_json(push.to_json()).apps[APPS[0]].how == {"m1": "start", "m2": "start"}


@pytest.mark.parametrize(
    "said",
    [
        *("garbage", "7", "7 soon", "x 12.5", "7 12.5 later", "7 nan", "-7 12.5"),
        # What int() and float() read, and no writer writes (a count in ASCII digits, a
        # time as repr spells a float, one space between).
        *("+7 12.5", "7_0 12.5", "\u0667 12.5", "7  12.5", "7 1_2.5", "7 +12.5", "7 12.5\n"),
    ],
)
async def test_a_malformed_settled_is_not_said_and_logged_once(
    pair: tuple[Cluster, Cluster, Clock], said: str
) -> None:
    """A report whose ``settled`` does not parse (only a future format could write it)
    made ``Cluster.read`` raise: every replica's read failed, round after round, on one
    report. It reads as not said (the next leader waits for the key's time, as for a
    replica that said nothing), and is logged once, not every round."""
    writer, reader, _ = pair
    writer.settled = said
    await writer.publish(at_rest(), None)
    with capture_logs() as logs:
        for _ in range(2):
            report = (await reader.read())["w"]
            assert report.settled is None
            assert report.loads == at_rest()
    bad = [e for e in logs if e["event"] == "cluster_bad_settled"]
    assert [(e["replica"], e["settled"]) for e in bad] == [("w", said)]
    writer.settled = "7 12.5"  # as the replica writes it: read
    await writer.publish(at_rest(), None)
    assert (await reader.read())["w"].settled == (7, 12.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("gen", "x"),
        ("gen", "1.5"),
        ("fence", "soon"),
        ("since", "?"),
        ("now", "later"),
        ("now", "inf"),
        ("gen", "-1"),
        ("fence", "-3"),
        ("since", "-2"),
        ("changed", "[load:x"),
        ("changed", "{}"),
        # What int() and float() read, and no writer writes (a count in ASCII digits, a
        # time as repr spells a float): " 7", "+7", "7_0" (70), another script's digits.
        ("fence", " 7"),
        ("fence", "+7"),
        ("fence", "7_0"),
        ("fence", "\u0667"),
        ("gen", "7\n"),
        ("since", "+1"),
        ("now", " 1000.0"),
        ("now", "1_000.0"),
        ("now", "+1000"),
    ],
)
async def test_a_malformed_header_field_is_not_said_and_logged_once(
    pair: tuple[Cluster, Cluster, Clock], name: str, value: str
) -> None:
    """A report whose header holds a number (or a list of changes) that does not parse
    made ``Cluster.read`` raise (every replica's read failed, round after round, on one
    report), or read the wrong fields. The field reads as not said, as in a report of
    the previous release (the report is read whole, and right), logged once."""
    writer, reader, _ = pair
    await writer.publish(at_rest(), None)
    await reader.read()  # read before: the next read of the report may be partial
    busy = {**at_rest(), APPS[0]: AppLoad(area=9.0, level=1, in_flight=1, held=1)}
    await writer.publish(busy, None)
    await writer.redis.hset(writer.report_key("w"), name, value)
    with capture_logs() as logs:
        for _ in range(2):
            report = (await reader.read())["w"]
            assert report.loads == busy
            assert report.fence == 0
    bad = [e for e in logs if e["event"] == "cluster_bad_field"]
    assert [(e["replica"], e["field"], e["value"]) for e in bad] == [("w", name, value)]


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize(
    ("load", "fleet"),
    [
        ("garbage", "garbage"),
        ("{}", "{}"),
        ("[]", '[["m1", "h", "p", "s", 0]]'),
        ('{"area": NaN, "level": 0}', '[["m1", "h", Infinity, "s", false]]'),
        ('{"area": Infinity, "level": 0}', '[["m1", "h", NaN, "s", false]]'),
        ('{"area": -1.0, "level": 0}', '[["m1", "h", -1, "s", false]]'),
        ('{"area": 1.0, "level": Infinity}', '[["m1", "h", 65536, "s", false]]'),
        ('{"area": 1.0, "level": -1}', '[["m1", "h", 0, "s", false]]'),
        ('{"area": 1.0, "level": 0, "at": NaN}', '[["m1", "h", -Infinity, "s", false]]'),
        ('{"area": 1.0, "level": 0, "idle_s": -Infinity}', '[["m1", "h", 99999, "s", 0]]'),
        ('{"area": 1.0, "level": 1, "machines": {"m1": Infinity}}', '[["m1"]]'),
        ('{"area": 1.0, "level": 0, "failing": {"m1": -2}}', '[["m1", "h", "-80", "s", 0]]'),
        ('{"area": 1.0, "level": 1.5}', '[["m1", "h", 8000.5, "s", false]]'),
        ('{"area": 1.0, "level": true}', '[["m1", "h", true, "s", false]]'),
        ('{"area": 1.0, "level": 0, "peak": 0.5}', '[["m1", "h", 80.25, "s", false]]'),
        ('{"area": 1.0, "level": 1, "machines": {"m1": true}}', '[["m1", "h", false, "s", 0]]'),
        ('{"area": 1.0, "level": 0, "failing": {"m1": 2.5}}', '[["m1", "h", "1.5", "s", 0]]'),
        ('{"area": true, "level": 0}', '[["m1", "h", 0.5, "s", false]]'),
        ('{"area": 1.0, "level": 0, "at": false}', '[["m1", "h", 443.9, "s", false]]'),
        # A number as a JSON string (int() and float() read it), and a machine's id,
        # host, state that is not a string or a cordon that is not a boolean (the
        # follower took str() of each, and any truthy value for cordoned).
        ('{"area": 1.0, "level": "3"}', '[["m1", "h", "8000", "s", false]]'),
        ('{"area": "1.0", "level": 0}', '[["m1", "h", 8000, "started", 1]]'),
        ('{"area": 1.0, "level": 0, "at": "5"}', '[["m1", "h", 8000, "started", "no"]]'),
        ('{"area": 1.0, "level": 1, "machines": {"m1": "1"}}', '[[7, "h", 8000, "s", false]]'),
        ('{"area": 1.0, "level": 0, "peak": "0"}', '[["m1", ["h"], 8000, "s", false]]'),
        ('{"area": 1.0, "level": 0, "idle_s": "1"}', '[["m1", "h", 8000, null, true]]'),
    ],
)
async def test_a_malformed_app_entry_is_not_said_and_logged_once(
    pair: tuple[Cluster, Cluster, Clock], whole: bool, load: str, fleet: str
) -> None:
    """An app's load or view in a report that does not parse made ``Cluster.read`` raise
    on every replica, round after round, or (a view of another shape) a follower's round
    that applied it. The app's entry reads as not said; the rest of the report reads as
    written; logged once for the report's loads and once for its views. So do numbers
    that Python's JSON reads but no replica writes: NaN or an infinity (a load's NaN or
    infinite area made the leader's summed load so, and the policy decided on it; an
    infinite count or port made ``Cluster.read`` raise ``int``'s OverflowError), a
    negative one, a port out of range; and a count (or port) that is not whole, or a
    boolean where a number goes, which ``int`` and ``float`` took (1.5 read 1, true 1)."""
    writer, reader, _ = pair
    up = [["m1", "127.0.0.1", 8000, "started", False]]
    views = {app: AppFleet(1, up) for app in APPS[:2]}
    await writer.publish(at_rest(), views)
    if not whole:
        await reader.read()
        views = {app: AppFleet(2, up) for app in APPS[:2]}
        await writer.publish({**at_rest(), APPS[1]: AppLoad(area=9.0, level=1)}, views)
    key = writer.report_key("w")
    await writer.redis.hset(key, mapping={f"load:{APPS[1]}": load, f"fleet:{APPS[0]}": fleet})
    with capture_logs() as logs:
        for _ in range(2):
            report = (await reader.read())["w"]
            assert report.loads == {a: v for a, v in at_rest().items() if a != APPS[1]}
            assert report.fleet == {APPS[1]: views[APPS[1]]}
    bad = {(e["replica"], e["field"]) for e in logs if e["event"] == "cluster_bad_field"}
    assert bad == {("w", f"load:{APPS[1]}"), ("w", f"fleet:{APPS[0]}")}
    assert len([e for e in logs if e["event"] == "cluster_bad_field"]) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("crit", "[1]"),
        ("crit", '"m1"'),
        ("sick", '{"m1": 1}'),
        ("how", '{"m1": 1}'),
        ("miss", '"true"'),
        ("miss", "1"),
        ("ours", '{"m1": 1}'),
    ],
)
async def test_a_view_s_fields_that_are_not_of_their_kind_are_not_said(
    pair: tuple[Cluster, Cluster, Clock], name: str, value: str
) -> None:
    """``crit:{app}``, ``sick:{app}``, ``how:{app}``, ``miss:{app}`` and ``ours:{app}`` as a
    report holds them, checked as a push's are (``test_a_pushed_view_is_read_as_a_reports_view``):
    their ids went through ``str``, a map where a list goes read as none, and a ``miss``
    that is not a boolean ("true", 1) read as the app there. The app's view reads as not
    said, as another malformed ``fleet`` entry; the report's other views as written."""
    writer, reader, _ = pair
    up = [["m1", "127.0.0.1", 8000, "started", False]]
    views = {
        app: AppFleet(2, up, ("m1",), {"m1": "start"}, ("m1",), ours=("m1",)) for app in APPS[:2]
    }
    await writer.publish(at_rest(), views)
    await writer.redis.hset(writer.report_key("w"), f"{name}:{APPS[0]}", value)
    with capture_logs() as logs:
        assert (await reader.read())["w"].fleet == {APPS[1]: views[APPS[1]]}
    bad = [e["field"] for e in logs if e["event"] == "cluster_bad_field"]
    assert bad == [f"fleet:{APPS[0]}"]


@pytest.mark.parametrize("seq", [" 2", "+2", "2_0"])
async def test_a_view_s_sequence_that_is_not_ascii_digits_is_not_said(
    pair: tuple[Cluster, Cluster, Clock], seq: str
) -> None:
    """``seq:{app}`` is written as ``str`` of an int; ``int`` also read " 2", "+2" and
    "2_0" (20, a version far ahead that kept the followers from applying the next ones).
    The app's view reads as not said, as another malformed ``fleet`` entry."""
    writer, reader, _ = pair
    up = [["m1", "127.0.0.1", 8000, "started", False]]
    await writer.publish(at_rest(), {APPS[0]: AppFleet(2, up)})
    await writer.redis.hset(writer.report_key("w"), f"seq:{APPS[0]}", seq)
    with capture_logs() as logs:
        assert (await reader.read())["w"].fleet == {}
    bad = [(e["field"], e["value"]) for e in logs if e["event"] == "cluster_bad_field"]
    assert bad == [(f"fleet:{APPS[0]}", json.dumps(up))]


async def test_the_leader_s_view_says_when_its_wake_found_no_such_app(
    pair: tuple[Cluster, Cluster, Clock],
) -> None:
    """``AppFleet.missing`` (the leader's wake found that the Machines API has no such
    app) in a whole read, a partial one and a push alike; a view of the previous release
    (no such field) says the app is there."""
    writer, reader, _ = pair
    first = {APPS[0]: AppFleet(1, [], missing=True)}
    await writer.publish(at_rest(), first)
    report = (await reader.read())["w"]
    assert report.fleet_changed is None  # whole
    assert report.fleet[APPS[0]].missing
    await writer.publish(at_rest(), {APPS[0]: AppFleet(2, [])})
    report = (await reader.read())["w"]
    assert report.fleet_changed == {APPS[0]}  # partial
    assert not report.fleet[APPS[0]].missing
    push = ViewPush("w", 3, first)
    assert ViewPush.from_json(push.to_json()).apps[APPS[0]].missing
    assert not AppFleet.from_json({"seq": 1, "machines": []}).missing


@pytest.mark.parametrize(
    "app",
    [
        '{"seq": Infinity, "machines": []}',
        '{"seq": -1, "machines": []}',
        '{"seq": 1, "machines": [["m1"]]}',
        '{"seq": 1, "machines": [["m1", "h", Infinity, "started", false]]}',
        '{"seq": 1, "machines": [["m1", "h", 0, "started", false]]}',
        '{"seq": 1.5, "machines": []}',
        '{"seq": true, "machines": []}',
        '{"seq": 1, "machines": [["m1", "h", 8000.5, "started", false]]}',
        '{"seq": 1, "machines": [["m1", "h", true, "started", false]]}',
        '{"seq": "1", "machines": []}',
        '{"seq": 1, "machines": [["m1", "h", "8000", "started", false]]}',
        '{"seq": 1, "machines": [["m1", "h", 8000, "started", 0]]}',
        '{"seq": 1, "machines": [[null, "h", 8000, "started", false]]}',
        '{"seq": 1, "machines": [], "critical": [1]}',
        '{"seq": 1, "machines": [], "critical": "m1"}',
        '{"seq": 1, "machines": [], "down_sick": [["m1"]]}',
        '{"seq": 1, "machines": [], "down_sick": {"m1": 1}}',
        '{"seq": 1, "machines": [], "how": {"m1": 1}}',
        '{"seq": 1, "machines": [], "how": ["m1"]}',
        '{"seq": 1, "machines": [], "missing": "true"}',
        '{"seq": 1, "machines": [], "missing": 1}',
        '{"seq": 1, "machines": [], "ours": [1]}',
    ],
)
def test_a_pushed_view_is_read_as_a_reports_view(app: str) -> None:
    """A push's view is checked as a report's is (``cluster_bad_view_push``, skipped): a
    machine list of another shape was taken as it came, and the follower's round that
    applied it raised; an infinite number raised ``int``'s OverflowError, which the
    listener took for a lost connection (it subscribed again); a sequence, port or
    fencing token that is not whole, or a boolean, was truncated (1.5 read 1, true 1); a
    ``critical`` or ``down_sick`` id that is not a string went through ``str`` (1 read
    "1", "m1" read as the ids "m" and "1"), a ``down_sick`` or ``how`` that is not a list
    (a map) read as empty, a ``how`` that is not a string was dropped, and a ``missing``
    that is not a boolean read as False."""
    with pytest.raises(ValueError):  # noqa: PT011 - which ValueError is no matter
        ViewPush.from_json(f'{{"leader": "w", "fence": 1, "apps": {{"a": {app}}}}}')
    for fence in ("Infinity", "1.5", "true", '"1"'):
        with pytest.raises(ValueError):  # noqa: PT011
            ViewPush.from_json(f'{{"leader": "w", "fence": {fence}, "apps": {{}}}}')
    pushed = ViewPush.from_json(
        '{"leader": "w", "fence": 1, "apps": {"a": {"seq": 2, "machines":'
        ' [["m1", "h", 8000, "started", false]]}}}'
    )
    assert pushed.apps["a"].machines == [["m1", "h", 8000, "started", False]]


@pytest.mark.parametrize("said", ["7 12.5", ""])
async def test_a_stopped_replica_leaves_what_it_settled_for_a_while_and_no_member(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str, said: str
) -> None:
    """``close(keep_settled_s=...)`` takes the report out (no reader counts the replica),
    and leaves what ``settled`` says under the replica's boot id, with that TTL, read as
    ``departed``; a replica that never led (nothing said) leaves nothing. Once the record
    is gone (its TTL), its boot leaves the set that lists them."""
    _, reader, clock = pair
    gone = member(redis_server, key_prefix, "gone", clock)
    await gone.publish(at_rest(), None)
    assert "gone" in await reader.read()
    gone.settled = said
    await gone.close(keep_settled_s=90.0)
    assert "gone" not in await reader.read()
    key = reader.settled_key(gone.boot)
    if not said:
        assert reader.departed == {}
        assert not await reader.redis.exists(key, reader.departed_key)
        return
    assert reader.departed == {gone.boot: (7, 12.5)}
    assert 0 < await reader.redis.pttl(key) <= 90_000
    assert 0 < await reader.redis.pttl(reader.departed_key) <= 90_000
    await reader.redis.delete(key)  # as if its TTL ran out
    await reader.read()
    assert reader.departed == {}
    assert not await reader.redis.sismember(reader.departed_key, gone.boot)


async def test_a_replica_is_gone_once_it_left_until_it_is_back_or_long_gone(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str
) -> None:
    """``gone`` (whose machine leases the others adopt): a member whose report expired,
    and one that stopped; never a live one (a replica restarted under its configured id
    is live again), nor for longer than ``GONE_KEPT_S`` (after the record of it lapses)."""
    writer, reader, clock = pair
    died = member(redis_server, key_prefix, "died", clock)
    await died.publish(at_rest(), None)
    await writer.publish(at_rest(), None)
    await reader.read()
    assert reader.gone == {}
    await reader.redis.delete(reader.report_key("died"))  # as if its TTL ran out
    await writer.close()  # a clean stop
    await reader.read()
    assert reader.gone == {"died": clock.now, "w": clock.now}
    back = member(redis_server, key_prefix, "w", clock)
    try:
        await back.publish(at_rest(), None)
        clock.now += GONE_KEPT_S
        await reader.redis.delete(reader.gone_key)  # as if its TTL ran out meanwhile
        await reader.read()
        assert reader.gone == {"died": clock.now - GONE_KEPT_S}
        clock.now += 1
        await reader.read()
        assert reader.gone == {}
    finally:
        await back.close()
        await died.redis.aclose()


async def test_a_replica_that_died_before_a_reader_joined_is_gone_to_it_too(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str
) -> None:
    """The reader that finds a member's report expired unlists it: a replica that joins
    after that never saw it as a member, and waited out the machine leases it left (30 s)
    instead of adopting them. The unlisting leaves its id behind (``gone_key``) for
    ``GONE_KEPT_S``: every reader counts it gone, one that joins later too, unless it is
    live."""
    _, reader, clock = pair
    died = member(redis_server, key_prefix, "died", clock)
    await died.publish(at_rest(), None)
    await reader.read()
    await reader.redis.delete(reader.report_key("died"))  # as if its TTL ran out
    await reader.read()
    assert reader.gone == {"died": clock.now}
    assert not await reader.redis.sismember(reader.replicas_key, "died")  # unlisted
    late = member(redis_server, key_prefix, "late", clock)
    try:
        await late.read()
        assert late.gone == {"died": clock.now}
        assert 0 < await reader.redis.pttl(reader.gone_key) <= GONE_KEPT_S * 1000
        await died.publish(at_rest(), None)  # back (a configured id): live, not gone
        await late.read()
        assert late.gone == {}
    finally:
        await late.close()
        await died.close()


async def test_a_replica_that_stopped_before_a_reader_joined_is_gone_to_it_too(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str
) -> None:
    """A follower that never led stops cleanly (a rolling restart): it has no ``settled``
    to leave behind, and its report and listing go at once. A replica that joins after
    that knows it gone all the same (``gone_key``), and adopts a machine lease its stop
    left (an acquire or a release cut off) instead of waiting it out (30 s); before,
    only the replicas that had read it a member did."""
    _, reader, clock = pair
    follower = member(redis_server, key_prefix, "f", clock)
    await follower.publish(at_rest(), None)
    await reader.read()
    await follower.close()
    assert not await reader.redis.exists(reader.departed_key)  # nothing to say: no record
    late = member(redis_server, key_prefix, "late", clock)
    try:
        await late.read()
        assert late.gone == {"f": clock.now}
        await reader.read()
        assert reader.gone == {"f": clock.now}
    finally:
        await late.close()


async def dies(reader: Cluster, redis_server: str, key_prefix: str, rid: str) -> None:
    """``rid`` joins, then dies (its report expires), and ``reader`` unlists it."""
    settings = ClusterSettings(
        redis_url=SecretStr(redis_server), replica_id=rid, key_prefix=key_prefix
    )
    died = Cluster(settings, clock=reader.clock)
    try:
        await died.publish({}, None)
    finally:
        await died.redis.aclose()
    await reader.redis.delete(reader.report_key(rid))  # as if its TTL ran out
    await reader.read()
    assert await reader.redis.sismember(reader.replicas_key, rid) == 0  # unlisted


async def test_under_churn_each_gone_id_expires_on_its_own(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str
) -> None:
    """Replicas die one after another, less than ``GONE_KEPT_S`` apart (a crash-looping
    pod, autoscaled replicas): each id is read gone for ``GONE_KEPT_S`` from when it was
    unlisted (Redis's clock, in ms), however many are unlisted after it, and the next
    addition takes it out of the key. Before, each addition renewed the whole set: under
    steady churn it never expired, every id ever unlisted stayed in it, and every reader's
    read each round grew with them. ("a" is made older than the kept time by its score,
    as if that long had passed since it was unlisted: no wait on Redis's clock.)"""
    _, reader, clock = pair
    redis = reader.redis
    late = member(redis_server, key_prefix, "late", clock)
    try:
        await dies(reader, redis_server, key_prefix, "a")
        await dies(reader, redis_server, key_prefix, "b")  # renews nothing of "a"'s
        secs, micros = await redis.time()
        now_ms = secs * 1000 + micros // 1000
        unlisted = await redis.zscore(reader.gone_key, "a")
        assert unlisted is not None
        assert abs(unlisted - now_ms) < 60_000  # scored by Redis's clock, in ms
        kept_ms = GONE_KEPT_S * 1000
        await redis.zadd(reader.gone_key, {"a": now_ms - kept_ms - 1000})
        await late.read()
        assert late.gone == {"b": clock.now}
        assert await redis.zscore(reader.gone_key, "a") is not None  # till the next add
        await dies(reader, redis_server, key_prefix, "c")
        await late.read()
        assert late.gone == {"b": clock.now, "c": clock.now}
        assert set(await redis.zrange(reader.gone_key, 0, -1)) == {"b", "c"}
        assert 0 < await redis.pttl(reader.gone_key) <= kept_ms  # a backstop: from "c"
    finally:
        await late.close()


async def test_gone_ids_of_the_previous_release_are_read_and_its_set_left_to_it(
    pair: tuple[Cluster, Cluster, Clock], redis_server: str, key_prefix: str
) -> None:
    """A rolling upgrade: replicas of the previous release add the ids they unlist to the
    plain set ``expired_key`` and read it whole. This code keeps its own under another
    name (``gone_key``, a sorted set: under the old name the old replicas' ``SADD`` and
    ``SMEMBERS`` would fail with WRONGTYPE), and reads both: an id either release
    unlisted is gone to a replica that joins later. The old set is never written here,
    so it expires by itself once no old replica adds to it."""
    _, reader, clock = pair
    old = reader.redis
    await old.sadd(reader.expired_key, "died-old")  # as a reader of the previous release
    await old.pexpire(reader.expired_key, round(GONE_KEPT_S * 1000))
    await dies(reader, redis_server, key_prefix, "died-new")
    late = member(redis_server, key_prefix, "late", clock)
    try:
        await late.read()
        assert late.gone == {"died-old": clock.now, "died-new": clock.now}
        assert await old.smembers(reader.expired_key) == {"died-old"}  # not written here
        assert await old.type(reader.gone_key) == "zset"
        await old.sadd(reader.expired_key, "died-later")  # the old release goes on working
        await late.read()
        assert set(late.gone) == {"died-old", "died-new", "died-later"}
    finally:
        await late.close()

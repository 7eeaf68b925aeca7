"""Machine events as Fly shows them: a user event when a transition begins, the platform's
("flyd") when it ends, newest first, timestamps in milliseconds."""

from __future__ import annotations

import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from emu_helpers import new_machine, session, until_state, wait_ok
from structlog.testing import capture_logs

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import MAX_EVENTS


async def test_every_transition_records_the_real_event_pairs(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        base = f"/v1/apps/demo/machines/{m['id']}"
        record = emulator.machine("demo", m["id"])
        assert (await s.post(base + "/suspend")).status == 200
        await wait_ok(s, "demo", m["id"], "suspended")
        assert (await s.post(base + "/start")).status == 200
        await wait_ok(s, "demo", m["id"])
        assert (await s.post(base + "/stop")).status == 200
        await wait_ok(s, "demo", m["id"], "stopped")
        config = {**m["config"], "env": {"V": "2"}}
        assert (await s.post(base, json={"config": config})).status == 200
        await until_state(record, "stopped")
        assert (await s.delete(base)).status == 200
        await until_state(record, "destroyed")

    seen = [(e.type, e.status, e.source) for e in record.events]
    assert seen == [
        ("launch", "created", "user"),
        ("start", "started", "flyd"),  # a launch at create: no user "start" between
        ("suspend", "suspending", "user"),
        ("suspend", "suspended", "flyd"),
        ("start", "starting", "user"),
        ("start", "started", "flyd"),
        ("stop", "stopping", "user"),
        ("exit", "stopped", "flyd"),
        ("update", "updating", "user"),
        ("update", "stopped", "flyd"),
        ("destroy", "destroying", "user"),
        ("destroy", "destroyed", "flyd"),
    ]
    exit_event = next(e for e in record.events if e.type == "exit")
    # How the process ended: the demo app shuts down cleanly on the stop's SIGINT (a hung
    # app ends by the SIGKILL after the timeout: test_emulator_failures). It died of the
    # signal (130): the stop sent it twice, to the group and again by the walk for what
    # left the group, and aiohttp takes a second SIGINT during its shutdown for "quit now".
    assert exit_event.request == {
        "exit_event": {"exit_code": 0, "signal": None, "requested_stop": True}
    }
    stamps = [e.timestamp for e in record.events]
    assert stamps == sorted(stamps)
    assert all(t > 10**12 for t in stamps)  # milliseconds since the epoch


async def test_the_events_endpoint_is_newest_first_with_a_limit(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        url = f"/v1/apps/demo/machines/{m['id']}/events"
        events = await (await s.get(url)).json()
        assert [(e["type"], e["status"]) for e in events] == [
            ("start", "started"),
            ("launch", "created"),
        ]
        assert events == (await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json())["events"]
        newest = await (await s.get(url, params={"limit": "1"})).json()
        assert newest == events[:1]
        assert await (await s.get(url, params={"limit": "500"})).json() == events
        r = await s.get(url, params={"limit": "many"})
        assert r.status == 400
        assert "limit: expected a positive integer" in (await r.json())["error"]


async def test_a_skewed_emulator_keeps_every_time_it_shows_on_its_own_clock(
    emulator_settings: EmulatorSettings,
) -> None:
    """``Emulator(wall=)`` (tests of a skew between Fly's clock and ours): the events'
    times, ``created_at``, ``updated_at`` and the answers' ``Date`` are all on it."""
    hour = 3600.0
    async with (
        Emulator(
            emulator_settings, host="127.0.0.1", port=0, wall=lambda: time.time() - hour
        ) as emu,
        session(emu) as s,
    ):
        m = await new_machine(s)
        answer = await s.get(f"/v1/apps/demo/machines/{m['id']}")
        listed = await answer.json()
        date = parsedate_to_datetime(answer.headers["Date"]).timestamp()
    times = [e["timestamp"] / 1000 for e in listed["events"]]
    times += [date, _unix(listed["created_at"]), _unix(listed["updated_at"])]
    now = time.time()
    assert all(now - hour - 60 < t <= now - hour + 1 for t in times), times


def _unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_a_watcher_sees_every_event_also_past_the_50_a_machine_keeps(
    emulator: Emulator,
) -> None:
    """A machine keeps its last 50 events (the real API's most): ``watch_events`` hands
    over every one as it is recorded, so a count over a long run (the chaos soak's of
    Fly's restarts) loses none, until the watcher is taken off."""
    seen: list[tuple[str, str]] = []
    unwatch = emulator.watch_events(lambda m, e: seen.append((m.id, e.id)))
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        base = f"/v1/apps/demo/machines/{m['id']}"
        record = emulator.machine("demo", m["id"])
        for i in range(30):  # two events each: updating, then created again
            config = {**m["config"], "env": {"V": str(i)}}
            assert (await s.post(base, json={"config": config})).status == 200
            await until_state(record, "created")
        assert len(record.events) == MAX_EVENTS
        assert len(seen) == 1 + 2 * 30  # and the launch
        assert seen[-MAX_EVENTS:] == [(m["id"], e.id) for e in record.events]
        unwatch()
        assert (await s.post(base, json={"config": m["config"]})).status == 200
        await until_state(record, "created")
        assert len(seen) == 61


async def test_a_watcher_that_raises_breaks_neither_the_change_nor_the_other_watchers(
    emulator: Emulator,
) -> None:
    """A watcher ran inside the recording of the change: one that raised cut the change
    short (no health checks, no notice to ``/wait``) and the API call failed with a 500.
    Its error is logged; the change and the watchers after it go on."""
    seen: list[str] = []

    def broken(m: Any, e: Any) -> None:
        raise RuntimeError("a watcher's bug")

    unwatch = [
        emulator.watch_events(broken),
        emulator.watch_events(lambda m, e: seen.append(e.type)),
    ]
    with capture_logs() as logs:
        async with session(emulator) as s:
            m = await new_machine(s, start=False)
            record = emulator.machine("demo", m["id"])
            r = await s.post(f"/v1/apps/demo/machines/{m['id']}/start")
            assert r.status == 200
            await until_state(record, "started")
    for off in unwatch:
        off()
    assert "start" in seen
    failed = [e for e in logs if e["event"] == "emulator_event_watcher_failed"]
    assert failed
    assert all(e["machine"] == m["id"] for e in failed)

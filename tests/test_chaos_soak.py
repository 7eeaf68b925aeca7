"""benchmarks/chaos_soak.py's verdict: how it names the fault behind a failed request.

The soak itself takes minutes and is not part of the suite; its classification is plain
code on recorded windows, tested here on made-up ones."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import Event
from autoscaler.emulator.procs import pid_alive

REPO = Path(__file__).resolve().parent.parent


def _soak() -> ModuleType:
    """The script (not a package: loaded by path, registered for its dataclasses)."""
    name = "_bench_chaos_soak"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "chaos_soak.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _summarize(soak: ModuleType, run: Any, tmp_path: Path) -> dict[str, Any]:
    """The soak's verdict on ``run`` with an empty autoscaler log (no error lines)."""
    log = tmp_path / "autoscaler.log"
    log.write_text("")
    verdict: dict[str, Any] = soak.summarize(run, log)
    return verdict


def test_a_failure_is_put_down_to_the_fault_in_force_not_one_ended_before() -> None:
    """Seed 14: a 504 held through the outage (149.7-183.0) was put down to the 429
    storm that had ended at 139.0, within wake_timeout_s of the request: the first
    window in the list that could explain it, not the one in force."""
    soak = _soak()
    run = soak.Run(seed=14)
    run.windows = [
        soak.Window("rate_limit_storm", 124.0, 139.0),
        soak.Window("outage", 149.7, 183.0),
    ]
    assert run.fault_at(156.2, 176.2) == "outage"
    assert run.fault_at(140.0, 141.0) == "rate_limit_storm"  # only that one explains it
    assert run.fault_at(200.0, 201.0) == "outage"  # within wake_timeout_s of its end
    assert run.fault_at(230.0, 231.0) is None


def test_a_slow_suspend_explains_no_failure() -> None:
    soak = _soak()
    run = soak.Run(seed=1)
    run.windows = [
        soak.Window("outage", 10.0, 40.0),
        soak.Window("slow_suspends", 50.0, 80.0, api=False),
    ]
    assert run.fault_at(55.0, 56.0) == "outage"  # within wake_timeout_s of its end
    assert run.fault_at(70.0, 71.0) is None


def test_an_event_stream_a_drain_ended_between_events_is_no_breach(tmp_path: Path) -> None:
    """A drain ends an event stream on purpose, between two events (an EventSource
    reconnects), as it ends a WebSocket with 1001: with the API hanging instead of
    failing, a scale-down's drain ended one while the app's other machine served, and
    the verdict counted it a breach (a download cut, or an event cut mid-way, still is)."""
    soak = _soak()
    assert soak.stream_result("/events?n=3&ms=100", b"data: 0\n\ndata: 1\n\ndata: 2\n\n") == "ok"
    assert soak.stream_result("/events?n=30&ms=100", b"data: 0\n\ndata: 1\n\n") == "events_ended"
    assert soak.stream_result("/events?n=30&ms=100", b"data: 0\n\ndata: 1") == "stream_cut"
    assert soak.stream_result("/stream?n=30&ms=100", b"chunk 0\nchunk 1\n") == "stream_cut"
    assert soak.stream_result("/stream?n=2&ms=100", b"chunk 0\nchunk 1\n") == "ok"

    run = soak.Run(seed=15)
    ended = soak.Outcome("zero", "stream", 181.8, 183.6, "events_ended", served_throughout=True)
    cut = soak.Outcome("zero", "stream", 181.8, 183.6, "stream_cut", served_throughout=True)
    run.outcomes = [ended, cut]
    verdict = _summarize(soak, run, tmp_path)
    assert verdict["outcomes"] == {
        "zero/stream/events_ended (a drain)": 1,
        "zero/stream/stream_cut (a drain)": 1,
    }
    [breach] = verdict["breaches"]
    assert "stream_cut" in breach


def test_hang_turns_the_outage_into_calls_held_and_keeps_the_seeds_plan() -> None:
    """--hang: the outage holds every call (an API that times out, as a real outage
    often does) instead of answering 500; the seed's plan is otherwise the same."""
    soak = _soak()
    errors = soak.fault_plan(random.Random(16), (30.0, 60.0))  # noqa: S311 - a schedule
    hangs = soak.fault_plan(random.Random(16), (30.0, 60.0), hang=True)  # noqa: S311
    assert [(n, s) for n, _, s in errors] == [(n, s) for n, _, s in hangs]
    [down] = [change for name, change, _ in hangs if name == "outage"]
    assert down == {"latency_s": soak.HANG_S}
    assert soak.HANG_S > soak.WAKE_TIMEOUT_S
    assert soak.build_parser().parse_args(["--hang"]).hang


def test_a_drains_end_long_after_the_faults_is_not_an_app_left_dark(tmp_path: Path) -> None:
    """--hang, seed 16: 85 s after the last fault, `stopper`'s only load was a WebSocket
    quiet for connection_idle_s; the app went to sleep, as it should, and its drain sent
    the 1001. The rule for apps left dark (a failure well after the faults) counted it;
    a request that fails then still is one."""
    soak = _soak()
    run = soak.Run(seed=16)
    run.windows = [soak.Window("slow_suspends", 162.1, 192.1, api=False)]
    run.faults_over_at = 150.1
    run.outcomes = [
        soak.Outcome("stopper", "ws", 235.1, 245.0, "ws_close_1001"),
        soak.Outcome("stopper", "stream", 235.1, 245.0, "events_ended"),
        soak.Outcome("zero", "http", 236.0, 256.0, "504"),
    ]
    verdict = _summarize(soak, run, tmp_path)
    assert verdict["outcomes"] == {
        "stopper/ws/ws_close_1001 (a drain)": 1,
        "stopper/stream/events_ended (a drain)": 1,
    }
    [breach] = verdict["breaches"]
    assert "zero/http/504" in breach
    assert "dark" in breach


def test_machine_faults_are_the_seeds_and_leave_its_api_plan_alone() -> None:
    """--machine-faults: crashes, a hang, a host down or unreachable and cold resumes on
    a schedule of the seed's own, within the API plan's span; the API's plan (and so the
    traffic's generator) is drawn as without them."""
    soak = _soak()
    plan = soak.fault_plan(random.Random(21), (30.0, 60.0))  # noqa: S311 - a schedule
    machines = soak.machine_fault_plan(21, plan)
    assert machines == soak.machine_fault_plan(21, plan)
    assert machines != soak.machine_fault_plan(22, plan)
    assert sorted(kind for _, kind, _, _ in machines) == sorted(k for k, _ in soak.MACHINE_FAULTS)
    shortest = 15 + sum(s for _, _, s in plan) + 8 * len(plan)
    assert all(20 <= at <= shortest - 20 for at, _, _, _ in machines)
    assert plan == soak.fault_plan(random.Random(21), (30.0, 60.0))  # noqa: S311
    assert soak.build_parser().parse_args(["--machine-faults"]).machine_faults
    # what the machines' events show of them (counted in the verdict)
    cold = {"resume": False, "reason": "snapshot unusable (faults.resume_cold_rate)"}
    expired = {"resume": False, "reason": "snapshot expired (9.0s old)"}
    assert soak.landed(Event("1", "restart", "starting", "flyd", 0)) == "fly_restarts"
    assert soak.landed(Event("2", "launch", "started", "flyd", 0, cold)) == "cold_resumes"
    assert soak.landed(Event("3", "launch", "started", "flyd", 0, expired)) is None
    assert soak.landed(Event("4", "restart", "restarting", "user", 0)) is None


def test_a_machine_fault_explains_only_its_apps_failures_it_could_cause(tmp_path: Path) -> None:
    """A crash explains a failure in flight at it, of its app; a hang one while a machine
    of its app was started and hung. Either spares the breach of a failure while another
    machine served (the request may have gone to the broken one); a failure after the
    crash, or of another app, is still unexplained."""
    soak = _soak()
    run = soak.Run(seed=21)
    run.windows = [
        soak.Window("crash", 50.0, 50.0, api=False, app="zero"),
        soak.Window("hang", 80.0, None, api=False, app="adapt"),
        soak.Window("host_unreachable", 100.0, 120.0, api=False, app="stopper"),
    ]
    run.hung = {"adapt": [(79.75, False), (80.0, True), (86.0, True), (86.25, False)]}
    run.faults_over_at = 86.0
    run.outcomes = [
        soak.Outcome("zero", "http", 49.9, 50.1, "502", served_throughout=True),
        soak.Outcome("zero", "ws", 40.0, 52.0, "ServerDisconnectedError"),
        soak.Outcome("adapt", "http", 84.0, 89.0, "504", served_throughout=True),
        soak.Outcome("zero", "http", 50.2, 50.4, "502", served_throughout=True),
        soak.Outcome("adapt", "http", 88.0, 88.2, "502"),
        soak.Outcome("stopper", "http", 101.0, 101.5, "503"),
    ]
    verdict = _summarize(soak, run, tmp_path)
    assert verdict["outcomes"] == {
        "zero/http/502 (crash)": 1,
        "zero/ws/ServerDisconnectedError (crash)": 1,
        "adapt/http/504 (hang)": 1,
        "zero/http/502 UNEXPLAINED": 1,
        "adapt/http/502 UNEXPLAINED": 1,
        "stopper/http/503 UNEXPLAINED": 1,
    }
    breaches = verdict["breaches"]
    assert len(breaches) == 4  # zero's 502 after the crash twice (served throughout too)
    assert sum("zero/http/502" in b for b in breaches) == 2
    assert soak.faults_over_at(run) == 120.0  # the host back; the hang's last sample 86
    # --tail counts from the last fault's end, a slow suspend's too (as without the flag)
    run.windows.append(soak.Window("slow_suspends", 110.0, 140.0, api=False))
    assert (soak.faults_over_at(run), soak.tail_from(run)) == (120.0, 140.0)


def test_the_end_finds_a_lease_of_ours_and_not_anothers() -> None:
    """A lease is ours by its description (autoscaler.control.leases: the owner, then
    what it is for); one of someone else's (a deploy) is no breach of ours."""
    from autoscaler.control.leases import default_owner
    from autoscaler.emulator.leases import Leases

    soak = _soak()
    leases = Leases()
    leases.acquire("m1", "v1", 30, f"{default_owner()}: drain", None)
    leases.acquire("m2", "v1", 30, "fly deploy", None)
    machines = [SimpleNamespace(id=i) for i in ("m1", "m2", "m3")]
    emu = SimpleNamespace(
        lease=lambda app, mid: leases.current(mid),  # Emulator.lease's
        machines=lambda app: machines,
    )
    assert soak.our_leases(emu, "zero") == ["m1"]


def test_machine_faults_are_counted_from_every_event_not_the_50_a_machine_keeps() -> None:
    """The count of Fly's restarts (and cold resumes) watches the emulator's events as
    they are recorded (Emulator.watch_events): a sample of a machine's events lost what
    its last 50 no longer held, as a long soak's crash-looping machine's would."""
    soak = _soak()
    run = soak.Run(seed=1)
    seen = []
    emu = SimpleNamespace(watch_events=lambda watcher: seen.append(watcher) or (lambda: None))
    soak.watch_landed(run, emu)
    [watcher] = seen
    for i in range(60):
        watcher(None, Event(str(i), "restart", "starting", "flyd", i))
    watcher(None, Event("x", "restart", "restarting", "user", 0))
    assert run.landed == {"fly_restarts": 60}


def test_a_deploy_explains_the_failures_it_can_cause_and_no_other(tmp_path: Path) -> None:
    """--deploy: a deploy of `zero` held its machines 100-115 s and restarted a started
    one 102-106 s. It explains, of `zero` only: anything in flight at the restart (even
    while another machine served: the request may have been on that one), and a 503 or
    504 to a request held while its leases forbade a wake and no machine served. Not a
    502 with no restart in flight (it needs a machine that took the request), nor a
    failure while a started machine it did not touch served, nor another app's, nor one
    after it (which the rule for apps left dark then counts from its end)."""
    soak = _soak()
    run = soak.Run(seed=31)
    run.windows = [soak.Window("deploy", 100.0, 115.0, api=False, app="zero")]
    run.restarts = [("zero", "m1", 102.0, 106.0)]
    run.outcomes = [
        soak.Outcome("zero", "http", 103.0, 103.2, "502", served_throughout=True),
        soak.Outcome("zero", "ws", 95.0, 104.0, "ws_close_1006"),
        soak.Outcome("zero", "http", 108.0, 128.0, "504"),
        soak.Outcome("zero", "http", 110.0, 110.3, "502"),
        soak.Outcome("zero", "http", 111.0, 131.0, "504", served_throughout=True),
        soak.Outcome("adapt", "http", 108.0, 128.0, "504"),
        soak.Outcome("zero", "http", 125.0, 145.0, "504"),
    ]
    assert soak.faults_over_at(run) == 115.0
    run.faults_over_at = soak.faults_over_at(run)
    verdict = _summarize(soak, run, tmp_path)
    assert verdict["outcomes"] == {
        "zero/http/502 (deploy restart)": 1,
        "zero/ws/ws_close_1006 (deploy restart)": 1,
        "zero/http/504 (deploy leases)": 1,
        "zero/http/502 UNEXPLAINED": 1,
        "zero/http/504 UNEXPLAINED": 2,
        "adapt/http/504 UNEXPLAINED": 1,
    }
    breaches = verdict["breaches"]
    assert len(breaches) == 5  # the four unexplained, and the 504 while a machine served
    assert sum("while a started machine served [111.0" in b for b in breaches) == 1


def test_the_deploy_takes_a_slot_of_its_own_and_leaves_the_seeds_plan_alone() -> None:
    soak = _soak()
    plan = soak.fault_plan(random.Random(31), (30.0, 60.0))  # noqa: S311 - a schedule
    deployed = soak.with_deploy(31, plan)
    assert deployed == soak.with_deploy(31, plan)
    assert [entry for entry in deployed if entry[0] != "deploy"] == plan
    assert [entry for entry in deployed if entry[0] == "deploy"] == [("deploy", "deploy", 0.0)]
    slots = {[e[0] for e in soak.with_deploy(s, plan)].index("deploy") for s in range(40)}
    assert slots == set(range(len(plan) + 1))
    assert soak.build_parser().parse_args(["--deploy"]).deploy
    assert not soak.build_parser().parse_args([]).deploy


async def test_the_deploy_updates_every_machine_through_fly_s_leases(
    emulator_settings: EmulatorSettings,
) -> None:
    """The soak's deploy on the emulator: every machine of every app on the new config,
    the started one restarted (recorded for the verdict) and started again, one at rest
    left at rest; a lease someone else held is waited out, not a failure; no lease of
    the deploy's left."""
    soak = _soak()
    apps = [EmulatorApp(name=a, machines=n) for a, n in soak.MACHINES.items()]
    settings = emulator_settings.model_copy(update={"token": SecretStr(soak.TOKEN), "apps": apps})
    run = soak.Run(seed=31)
    auth = {"Authorization": f"Bearer {soak.TOKEN}"}
    async with (
        Emulator(settings, host="127.0.0.1", port=0) as emu,
        aiohttp.ClientSession(headers=auth) as http,
    ):
        zero = f"{emu.url}/v1/apps/zero/machines"
        started, rest = sorted(m.id for m in emu.machines("zero"))
        async with http.post(f"{zero}/{started}/start") as r:
            assert r.status == 200, await r.text()
        async with http.get(f"{zero}/{started}/wait", params={"state": "started"}) as r:
            assert r.status == 200, await r.text()
        other = {"ttl": 1, "description": "autoscaler@elsewhere: drain"}  # lapses in 1 s
        async with http.post(f"{zero}/{rest}/lease", json=other) as r:
            assert r.status in (200, 201), await r.text()

        await soak.deploy_all(run, emu)

        assert run.breaches == []
        for app in soak.MACHINES:
            for m in emu.machines(app):
                assert m.config["env"]["DEPLOY_VERSION"] == "v2-31", (app, m.id)
                assert emu.lease(app, m.id) is None, (app, m.id)
        states = {m.id: m.state for m in emu.machines("zero")}
        assert states == {started: "started", rest: "stopped"}
        assert [(app, mid) for app, mid, _, _ in run.restarts] == [("zero", started)]
        assert run.deploys["zero"]["restarted"] == 1
        assert run.deploys["zero"]["waited"]["lease 409"] > 0
        assert {a: d["updated"] for a, d in run.deploys.items()} == soak.MACHINES
        assert [(w.name, w.app) for w in run.windows] == [("deploy", a) for a in soak.MACHINES]
    alive = [pid for pid in emu.spawned_pids() if pid_alive(pid)]
    assert not alive


async def test_a_deploys_refresh_never_takes_back_a_machine_it_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh of the deploy's leases, in flight as the deploy released one, reached
    the API after the release: the API took it for an acquire (no lease held) and the
    machine was leased anew, to no one, until its TTL ran out (the autoscaler skipping
    it meanwhile). A refresh and a release of one lease now never cross."""
    soak = _soak()
    monkeypatch.setattr(soak, "DEPLOY_LEASE_TTL_S", 0)  # refresh at once
    answered = asyncio.Event()
    sent = asyncio.Event()

    class Api(soak.FlyDeploy):  # type: ignore[name-defined,misc]
        """The API as the emulator's: an acquire with no lease held takes one anew; a
        refresh's answer (and its effect) comes once ``answered`` is set."""

        held: dict[str, str]

        async def call(
            self, method: str, path: str, nonce: str | None = None, **kw: Any
        ) -> tuple[int, Any]:
            mid = path.split("/")[1]
            if method == "DELETE":
                self.held.pop(mid, None)
                return 200, {}
            sent.set()
            await answered.wait()
            self.held[mid] = nonce or "new"
            return 200, {"data": {"nonce": self.held[mid]}}

    deploy = Api(soak.Run(seed=31), None, "http://127.0.0.1:9", "zero")
    deploy.nonces = {"m1": "n1"}
    deploy.held = {"m1": "n1"}
    keeper = asyncio.create_task(deploy.keep())
    await sent.wait()
    release = asyncio.create_task(deploy.release("m1"))
    answered.set()
    await release
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)
    assert deploy.held == {}
    assert deploy.refused == []

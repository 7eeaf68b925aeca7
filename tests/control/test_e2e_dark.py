"""No app goes dark, end to end against the emulator's Fly-like timings and faults.

- A one-machine app whose boot fails comes back: the failed machine is started again
  after its backoff, and the held request is served.
- A one-machine app whose machine hangs comes back: the proxy ejects it, and the controller
  stops it and starts it again without waiting for a probe (fast timings and Fly's).
- A one-machine app whose process crashes under load, and whose restart policy has Fly
  start it again, is not restarted by us as well.
- Fly reports a machine `started` before its app listens: a wake's held request goes to
  it once the app listens, whatever a list said meanwhile; a machine that someone else
  started is served as soon as its app listens, not when the proxy's skip of the refusing
  machine ends.
- A wake whose first machine's host became unreachable (its start answers 503) starts
  another after one attempt (fast timings and Fly's).
- A machine whose host goes down (it hangs, and Fly cannot reach the host) is restarted
  once the host is back, not before; another machine serves meanwhile, and is not drained.
- An idle machine whose host Fly cannot reach stays up and serving (its suspend would
  fail), and sleeps once the host is back.
- A machine whose Fly health checks are critical is not counted as capacity: another
  machine is started in its place, then it is drained (fast timings and Fly's).
- A fresh machine whose first check ran before its app listened, and which our own run
  of the check clears soon after, gets no replacement (fast timings and Fly's).
- A wake through an API slower than a tick's bound on one call is served (fast timings:
  only the API's latency matters).
- A wake that meets an API outage tries again, and its request is served once the API
  answers.
- A request that arrives while the app's machine spends 15 s suspending is served by
  taking the suspend back, in about a resume, not after the suspend.
- An idle WebSocket lets the app sleep (its client pinging, its machine answering pongs):
  its drain closes it with 1001, then suspends.
- An API outage under steady load loses no request to a started machine; ``/readyz``
  stays ready while ``/readyz?control=1`` and ``autoscaler_control_healthy`` say the
  decisions are stale. 10 s by default, the issue's 60 s with ``--soak``.

All but the outage and the slow API (and those said to run on both) run with the
emulator's ``fly`` timing profile (the 15 s suspend sets its own suspend time); the whole
module is marked ``fly_profile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from structlog.testing import capture_logs
from testkit import fly_like, until

from autoscaler.admin import AdminServer
from autoscaler.config import (
    AdminSettings,
    EmulatorApp,
    EmulatorSettings,
    ProxySettings,
    TimingSettings,
)
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import Machine as EmulatedMachine
from autoscaler.emulator.procs import pid_alive
from autoscaler.scaling.policy import choose_wake

from .test_e2e import APP, HOST, Stack, running_stack

SUSPEND_S = 15.0
READINESS = {"kind": "readiness"}
"""What makes a machine check one that Fly routes by (a service's always are)."""
pytestmark = pytest.mark.fly_profile


@pytest.fixture
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fly's timings unless a test asks for the fast ones, and one machine unless it asks
    for more (indirect parametrization: "fast", "fly", "fast:2", ...)."""
    profile, _, machines = getattr(request, "param", "fly").partition(":")
    base = emulator_settings if profile == "fast" else fly_like(emulator_settings)
    apps = [EmulatorApp(name=APP, machines=int(machines or 1))]
    return base.model_copy(update={"apps": apps})


def restarts_ok(stack: Stack) -> float | None:
    """Our restarts of the app's machines that brought them up (None: none yet)."""
    labels = {"app": APP, "result": "ok"}
    return stack.metrics.registry.get_sample_value("autoscaler_machine_restarts_total", labels)


async def test_a_one_machine_app_whose_boot_failed_comes_back(emulator: Emulator) -> None:
    emulator.set_faults(boot_failure_rate=1.0)
    async with running_stack(emulator, wake_timeout_s=30) as stack:
        request = asyncio.ensure_future(stack.get("/"))
        await until(
            lambda: [m.state for m in emulator.machines(APP)] == ["failed"], what="a failed boot"
        )
        emulator.set_faults(boot_failure_rate=None)  # the trouble passes
        await request
        assert stack.failures == []
        assert stack.served == 1
        await stack.until(lambda: restarts_ok(stack) is not None)  # (counted after the probe)
        assert restarts_ok(stack) == 1
        assert [m.state for m in emulator.machines(APP)] == ["started"]


async def test_a_429_storm_spends_none_of_a_failed_machines_restart_budget(
    emulator: Emulator,
) -> None:
    """A storm of 429s on every call while a failed machine waits for its restart: the
    refused calls (the lease's first, here: the emulator refuses every operation alike)
    cost none of its budget (2 here), and once the storm passes the machine boots and the
    held request is served. (A refused start itself, which spent the budget before
    44f6ec3, is tested with the fake API: test_controller.py,
    test_start_calls_the_api_refused_cost_a_failed_machine_none_of_its_budget.)"""
    emulator.set_faults(boot_failure_rate=1.0)
    async with running_stack(emulator, wake_timeout_s=40, max_restart_attempts=2) as stack:
        request = asyncio.ensure_future(stack.get("/"))

        # The failed boot counted by the controller (not only seen by the emulator: a
        # storm that began before the boot's wait answered left it unknown, and nothing
        # was tried on the machine).
        def failed_boots() -> int:
            return sum(m.failures for m in stack.controller.status()[0].machines)

        await stack.until(lambda: failed_boots() == 1)
        emulator.set_faults(boot_failure_rate=None, rate_limit_rate=1.0)  # every call: 429
        registry = stack.metrics.registry

        def refused() -> float:
            return sum(
                registry.get_sample_value(
                    "autoscaler_api_requests_total", {"operation": op, "code": "429"}
                )
                or 0
                for op in ("acquire_machine_lease", "start_machine")
            )

        await stack.until(lambda: refused() >= 3)  # more than its budget of tries
        emulator.set_faults(rate_limit_rate=None)  # the storm passes
        await request
        assert (stack.served, stack.failures) == (1, [])
        await stack.until(lambda: restarts_ok(stack) is not None)
        exhausted = {"app": APP, "result": "exhausted"}
        assert not registry.get_sample_value("autoscaler_machine_restarts_total", exhausted)
        assert [m.state for m in emulator.machines(APP)] == ["started"]


@pytest.mark.parametrize("emulator_settings", ["fast", "fly"], indirect=True)
async def test_a_one_machine_app_whose_machine_hangs_is_restarted(emulator: Emulator) -> None:
    # Each request to the hung process times out (504) and the proxy takes the machine
    # out of routing: nothing else serves, so the controller stops it and starts it again
    # at once, and the new process serves. Before, the app answered 504 for as long as it
    # hung; then, until the probe after the ejection (30 s here) had timed out too.
    proxy = ProxySettings(upstream_timeout_s=0.5, eject_after=1, eject_base_s=30)
    async with running_stack(emulator, proxy, idle_to_zero_s=600, wake_timeout_s=30) as stack:
        await stack.get("/")
        assert (stack.served, stack.failures) == (1, [])
        [machine] = emulator.machines(APP)
        first = len(machine.events)
        emulator.set_faults(hung=[machine.id])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while stack.served < 2:
            assert loop.time() < deadline, stack.failures
            await stack.get("/")
        # The failures were the hang's: timeouts, and the requests held meanwhile.
        assert stack.failures
        assert all(f.split(":")[0] in ("502", "503", "504") for f in stack.failures)
        assert "504" in {f.split(":")[0] for f in stack.failures}
        kinds = [(e.type, e.source) for e in machine.events[first:]]
        assert ("stop", "user") in kinds
        assert kinds[-1] == ("start", "flyd")
        await stack.until(lambda: restarts_ok(stack) is not None)  # (counted after the probe)
        assert restarts_ok(stack) == 1
        assert emulator.faults.hung == []
        ejected = {"app": APP, "reason": "timeout"}
        registry = stack.metrics.registry
        assert registry.get_sample_value("autoscaler_machine_ejections_total", ejected) == 1
        # Served from now on.
        for _ in range(5):
            await stack.get("/")
        assert stack.served == 7


async def wake_choice(stack: Stack) -> str:
    """The machine a wake of the sleeping app would take, once the app was read."""
    await stack.until(lambda: len(stack.app.upstreams) == len(stack.emulator.machines(APP)))
    rt = stack.controller.apps[APP]
    action = choose_wake(rt.fleet(stack.app, urgent=True))
    assert action is not None
    return action.machine_id


async def test_a_crash_that_flys_restart_policy_repairs_is_not_restarted_again(
    emulator: Emulator,
) -> None:
    # A one-machine app under load whose process crashes; its restart policy (none, as
    # `fly launch` leaves it: Fly's default, on-failure) has Fly start it again. The
    # requests in flight are reset (the GETs sent again, refused, and held for the restart)
    # and the proxy ejects the machine, but a reset is a process that died, not one that
    # hangs: the ejection counts once (a timeout's would count as hung), and no restart of
    # ours follows Fly's (a stop and a cold start more).
    # One did when any first ejection of an app's last machine counted as hung: whenever
    # the controller's next read found the machine started.
    [machine] = emulator.machines(APP)
    assert "restart" not in machine.config
    proxy = ProxySettings(eject_after=1)  # the first reset ejects
    async with running_stack(emulator, proxy, idle_to_zero_s=600, wake_timeout_s=30) as stack:
        await stack.get("/")
        loop = asyncio.get_running_loop()
        done = loop.time() + 60
        first = len(machine.events)
        up = stack.app.upstreams[machine.id]
        counted: set[int] = set()
        # It has served a while: its refused connections count (those of a machine that
        # started less than wake_timeout_s ago do not: it may still be booting). A request
        # in flight at the crash is reset, or replayed and refused (a GET on a kept-alive
        # connection): either ejects it.
        up.started_at = stack.app.clock() - 60

        def back() -> bool:  # Fly started it again
            kinds = [(e.type, e.source) for e in machine.events[first:]]
            return ("restart", "flyd") in kinds and kinds[-1] == ("start", "flyd")

        async def client() -> None:
            while loop.time() < done:
                await stack.get("/work?ms=300")  # always in flight at the crash

        async def crash_then_watch() -> None:
            nonlocal done
            await until(lambda: up.in_flight == 5, what="every client's request in flight")
            assert emulator.kill_machine_process(APP, machine.id)
            while not back():  # the proxy notifies the view after each ejection
                counted.add(up.failing)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stack.app.changed(), 0.1)
            done = loop.time() + 1.5  # the controller ticks 7 times meanwhile

        await asyncio.gather(crash_then_watch(), *(client() for _ in range(5)))
        assert max(counted) == 1  # ejected once, counted once
        assert restarts_ok(stack) is None
        assert ("stop", "user") not in [(e.type, e.source) for e in machine.events[first:]]
        assert {f.split(":")[0] for f in stack.failures} <= {"502"}  # those in flight
        assert stack.served > 5


def listening_late(listen_s: float, machines: int = 1, profile: str = "fly") -> EmulatorSettings:
    """Fly's timings and rate limits (or ``profile``'s timings), one machine (or
    ``machines``), and its app listening ``listen_s`` after `started`."""
    return EmulatorSettings(
        profile=profile,
        timing=TimingSettings(listen_s=listen_s),
        rate_limits=profile == "fly",
        apps=[EmulatorApp(name=APP, machines=machines)],
    )


LISTS_EVERY_TICK = {"steady_list_s": 0, "idle_poll_s": 0.2}  # asleep or not


async def test_a_wake_routes_to_its_machine_once_the_app_listens_whatever_a_list_says() -> None:
    # Fly says `started` once the VM runs the app, before the app listens (the emulator's
    # timing.listen_s, 0.8 s here); the wake waits for the port. A list in between (one
    # every tick here) also says `started`, and must not send the held request to a port
    # that refuses it: the list keeps our record of a machine we act on (the runtime's
    # merge). Without that rule, a refused connection, then the proxy's skip.
    async with (
        Emulator(listening_late(0.8), host="127.0.0.1", port=0) as emulator,
        running_stack(emulator, None, LISTS_EVERY_TICK, idle_to_zero_s=600) as stack,
    ):
        with capture_logs() as logs:
            await stack.get("/")
        assert (stack.served, stack.failures) == (1, [])
        events = [e["event"] for e in logs if e.get("app") == APP]
        assert "machine_unreachable" not in events
        assert events.count("fly_api") > 10  # the lists went on meanwhile


async def test_a_machine_someone_else_started_is_served_as_soon_as_its_app_listens() -> None:
    # A machine started by someone else (a `fly deploy`, Fly's restart policy, another
    # tool), that a list shows started, gets requests at once; before its app listens
    # (0.8 s here) they are refused and the proxy skips the machine. A connect to it every
    # few tens of milliseconds brings it back as soon as the app listens, not when the
    # skip ends (30 s here, past the request's 20 s wait: without the watch, a 503).
    proxy = ProxySettings(unhealthy_backoff_s=30)
    async with (
        Emulator(listening_late(0.8), host="127.0.0.1", port=0) as emulator,
        running_stack(
            emulator, proxy, LISTS_EVERY_TICK, idle_to_zero_s=600, wake_timeout_s=20
        ) as stack,
    ):
        [machine] = emulator.machines(APP)
        await stack.until(lambda: machine.id in stack.app.upstreams)
        emulator.world.lifecycle.start(machine)  # not us
        await stack.until(lambda: stack.app.upstreams[machine.id].state == "started")
        with capture_logs() as logs:
            await stack.get("/")
        assert (stack.served, stack.failures) == (1, [])
        events = [e["event"] for e in logs if e.get("app") == APP]
        assert "machine_unreachable" in events  # refused at first
        assert events.count("machine_listening") == 1
        assert restarts_ok(stack) is None  # (nothing of ours started it)


def critical(machine: EmulatedMachine) -> bool:
    """Fly's last run of one of the machine's checks failed (as the emulator reports it)."""
    return any(c.status == "critical" for c in machine.checks.values())


# A check Fly first runs 500 ms after a start and then every minute: an app that listens
# later (listening_late) fails that first run and is critical until the next.
FIRST_RUN_FAILS = {"type": "http", "path": "/healthz", "grace_period": "500ms", "interval": "60s"}


@pytest.mark.parametrize(("profile", "where"), [("fast", "machine"), ("fly", "service")])
async def test_a_machine_whose_first_check_ran_before_its_app_listened_serves_at_once(
    profile: str, where: str
) -> None:
    # Fly runs a machine's checks grace_period after its start, then every interval. An
    # app that listens later than the grace (1.2 s against 0.5 s here) fails that first
    # run, and Fly says critical until the next one (60 s here). The controller runs the
    # check itself meanwhile: once it passes, the proxy routes to the machine and the
    # policy counts it, while Fly's list still says critical. Before, the proxy routed
    # only to one of the two (the last routable one is spared) and the policy counted
    # both as sick, for the whole interval. The check is a machine check, or its
    # service's (fly.toml's http_service.checks), which Fly lists under a name of its own.
    async with Emulator(
        listening_late(1.2, machines=2, profile=profile), host="127.0.0.1", port=0
    ) as emulator:
        name = "healthz" if where == "machine" else "servicecheck-00-http-8080"
        for machine in emulator.machines(APP):
            if where == "machine":  # one that routes (its kind is readiness), alone
                await set_checks(emulator, machine.id, {name: FIRST_RUN_FAILS | READINESS}, [])
            else:
                await set_checks(emulator, machine.id, {}, [FIRST_RUN_FAILS])
        async with running_stack(
            emulator, None, LISTS_EVERY_TICK, target_concurrency=1, idle_to_zero_s=600
        ) as stack:
            rt = stack.controller.apps[APP]
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    await stack.get("/work?ms=100")

            def rechecked() -> set[str]:
                return {e["machine"] for e in logs if e["event"] == "checks_passed_on_recheck"}

            with capture_logs() as logs:
                clients = [asyncio.create_task(client()) for _ in range(4)]
                try:
                    await until(
                        lambda: all(
                            m.state == "started" and critical(m) for m in emulator.machines(APP)
                        ),
                        what="both started, and Fly's first run of their check failed",
                    )
                    await until(lambda: len(rechecked()) == 2, what="our runs of them passed")
                    listed = rt.listed_at
                    await stack.until(lambda: rt.listed_at != listed)  # a list since
                    assert all(critical(m) for m in emulator.machines(APP))  # Fly's verdict
                    assert not rt.sick_since
                    assert not any(up.checks_critical for up in stack.app.upstreams.values())
                    rechecks = stack.metrics.registry.get_sample_value(
                        "autoscaler_check_rechecks_total", {"app": APP, "result": "passed"}
                    )
                    assert rechecks == 2
                    [status] = stack.controller.status()  # what /status shows
                    assert [m.checks_passed_on_recheck for m in status.machines] == [
                        (name,),
                        (name,),
                    ]
                    await stack.until(lambda: len(stack.app.routable()) == 2)
                finally:
                    stop.set()
                    await asyncio.gather(*clients)
        assert stack.failures == []


@pytest.mark.parametrize("profile", ["fast", "fly"])
async def test_a_fresh_machine_whose_first_check_ran_before_its_app_listened_is_not_replaced(
    profile: str,
) -> None:
    # The wake's machine fails Fly's first run of its check (the app listens 1.2 s after
    # `started`, the check runs 0.5 s after it) and our own run passes soon after. The
    # policy gives it that long (control/recheck.py, SICK_GRACE_S) before it counts as
    # sick: before, the tick that listed it critical started another machine in its
    # place, a start too many, drained again later.
    async with Emulator(
        listening_late(1.2, machines=2, profile=profile), host="127.0.0.1", port=0
    ) as emulator:
        for machine in emulator.machines(APP):
            await set_checks(emulator, machine.id, {"healthz": FIRST_RUN_FAILS | READINESS})
        async with running_stack(
            emulator, None, LISTS_EVERY_TICK, idle_to_zero_s=600, wake_timeout_s=30
        ) as stack:
            rt = stack.controller.apps[APP]
            with capture_logs() as logs:
                await stack.get("/")
                [woken] = [m for m in emulator.machines(APP) if m.state == "started"]
                await until(lambda: critical(woken), what="Fly's first run of its check failed")
                await until(
                    lambda: any(e["event"] == "checks_passed_on_recheck" for e in logs),
                    what="our run of it passed",
                )
                listed = rt.listed_at
                await stack.until(lambda: rt.listed_at != listed)  # a tick since
                await stack.get("/")
            assert (stack.served, stack.failures) == (2, [])
            started = [
                m.id for m in emulator.machines(APP) if any(e.type == "start" for e in m.events)
            ]
            assert started == [woken.id]


@pytest.mark.parametrize("emulator_settings", ["fast:2", "fly:2"], indirect=True)
async def test_a_wake_moves_past_a_machine_whose_host_became_unreachable(
    emulator: Emulator,
) -> None:
    # The host of the machine the wake would take is lost after the app's last list:
    # its start answers 503. The wake makes one attempt and starts the other machine.
    # Before, the client's retries spent 3.5 s on it (six 503s) first.
    async with running_stack(emulator, idle_to_zero_s=600, wake_timeout_s=30) as stack:
        first = await wake_choice(stack)
        rt = stack.controller.apps[APP]
        emulator.set_faults(host_unreachable=[first])
        await stack.get("/")
        assert (stack.served, stack.failures) == (1, [])
        refused = stack.metrics.registry.get_sample_value(
            "autoscaler_api_requests_total", {"operation": "start_machine", "code": "503"}
        )
        assert refused == 1
        states = {m.id: m.state for m in emulator.machines(APP)}
        assert states.pop(first) == "stopped"
        assert list(states.values()) == ["started"]
        # The next list says so, and the next wakes and scale-ups try it last.
        await stack.until(lambda: rt.machines[first].host_unreachable)


@pytest.mark.parametrize("emulator_settings", ["fly:2"], indirect=True)
async def test_a_machine_whose_host_goes_down_is_restarted_once_the_host_is_back(
    emulator: Emulator,
) -> None:
    # The serving machine's host goes down: the process hangs and Fly cannot reach the
    # host (every action on it answers 503). The other machine serves; the hung one is
    # not restarted while its stop would fail (that would spend the restart budget), and
    # is restarted once the host is back. Its ejection outlasts the test (no probe): it is
    # hung from its first ejection, nothing else serving then, and stays so once the other
    # machine serves (else it would count as capacity again, and the scale-down that
    # followed would drain the other machine, the only one it may take).
    proxy = ProxySettings(upstream_timeout_s=0.5, eject_after=1, eject_base_s=60)
    lists = {"steady_list_s": 1}  # the host's return is seen within a second
    async with running_stack(
        emulator, proxy, lists, idle_to_zero_s=600, wake_timeout_s=30
    ) as stack:
        await stack.get("/")
        [down] = [m for m in emulator.machines(APP) if m.state == "started"]
        emulator.set_faults(hung=[down.id], host_unreachable=[down.id])
        rt = stack.controller.apps[APP]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while stack.served < 2:  # the hang's timeouts, then the other machine
            assert loop.time() < deadline, stack.failures
            await stack.get("/")
        assert {f.split(":")[0] for f in stack.failures} <= {"502", "503", "504"}
        registry = stack.metrics.registry

        def refused(op: str) -> float:
            labels = {"operation": op, "code": "503"}
            return registry.get_sample_value("autoscaler_api_requests_total", labels) or 0.0

        def hung() -> bool:
            return any(m.hung for m in rt.fleet(stack.app).machines)

        # Requests go on (the proxy probes the hung machine with one of them when its
        # ejection ends) until the policy has seen it hung on an unreachable host.
        while not (hung() and "waits for its host" in rt.last_reason):
            assert loop.time() < deadline, rt.last_reason
            await stack.get("/")
            await asyncio.sleep(0.05)
        assert refused("stop_machine") == 0
        assert "waits for its host" in rt.last_reason
        for _ in range(15):  # longer than scale_down_delay_s: the other machine stays
            await stack.get("/")
            await asyncio.sleep(0.1)
            assert hung()
        drains = {"app": APP, "action": "cordon", "result": "ok"}
        assert registry.get_sample_value("autoscaler_scaling_actions_total", drains) is None
        emulator.set_faults(host_unreachable=None)  # the host is back; the process hangs

        # (The emulator forgets the hang at the new boot, before the restart has probed
        # the new process and counted itself.)
        await stack.until(lambda: restarts_ok(stack) is not None, timeout_s=30)
        assert restarts_ok(stack) == 1
        assert emulator.faults.hung == []
        assert refused("stop_machine") == 0


async def test_an_idle_machine_whose_host_is_unreachable_sleeps_once_the_host_is_back(
    emulator: Emulator,
) -> None:
    # Fly cannot reach the idle machine's host: its suspend would answer 503 after the
    # cordon, tick after tick. It stays up and serving, and sleeps once the host is back.
    lists = {"steady_list_s": 1}  # the lost host, then its return, seen within a second
    async with running_stack(emulator, None, lists, idle_to_zero_s=1, wake_timeout_s=30) as stack:
        await stack.get("/")
        [machine] = emulator.machines(APP)
        rt = stack.controller.apps[APP]
        emulator.set_faults(host_unreachable=[machine.id])
        await stack.until(lambda: rt.machines[machine.id].host_unreachable)
        await stack.until(lambda: "host unreachable" in rt.last_reason)  # idle, it waits
        await stack.get("/")  # served by it, no wake
        assert (stack.served, stack.failures) == (2, [])
        suspends = stack.metrics.registry.get_sample_value(
            "autoscaler_api_requests_total", {"operation": "suspend_machine", "code": "503"}
        )
        assert suspends is None
        assert machine.state == "started"
        emulator.set_faults(host_unreachable=None)
        await stack.until(lambda: machine.state in ("suspending", "suspended"))


async def set_checks(
    emulator: Emulator, mid: str, checks: dict[str, Any], service: list[Any] | None = None
) -> None:
    """Give a (stopped) machine new health checks (and its service ``service``'s), as an
    update of its config would."""
    async with aiohttp.ClientSession(
        base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.token}"}
    ) as s:
        config = (await (await s.get(f"/v1/apps/{APP}/machines/{mid}")).json())["config"]
        config["checks"] = checks
        if service is not None:
            config["services"][0]["checks"] = service
        r = await s.post(f"/v1/apps/{APP}/machines/{mid}", json={"config": config})
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("emulator_settings", ["fast:2", "fly:2"], indirect=True)
async def test_a_machine_whose_checks_are_critical_is_replaced_then_drained(
    emulator: Emulator,
) -> None:
    # The machine a wake takes comes up with its Fly health check critical (a bad deploy
    # of that machine: its check asks for a path the app does not have). The proxy still
    # routes to it as the last routable one. The policy does not count it as capacity:
    # it starts the other machine, the proxy moves the traffic there, and the sick one
    # is drained and stopped (not suspended: a resume would restore its trouble). Before,
    # the healthy machine stayed stopped for as long as the app ran.
    # The proxy never lists the sick one out of rotation for its checks once it is not
    # started (the list says critical until the next one): /status did, for seconds.
    async with running_stack(emulator, idle_to_zero_s=600, wake_timeout_s=30) as stack:
        sick = await wake_choice(stack)
        bad = {"type": "http", "path": "/missing", "interval": "1s", "grace_period": "0s"}
        await set_checks(emulator, sick, {"web": bad | READINESS})
        [healthy] = [m.id for m in emulator.machines(APP) if m.id != sick]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        critical = False  # its check was seen critical while it served
        listed: set[str] = set()  # states in which /status listed it out for its checks

        def look() -> None:
            state = stack.app.upstreams[sick].state
            for e in stack.proxy.health.report():
                if e["machine"] == sick and e["reason"] == "checks" and state != "started":
                    listed.add(state)

        while not (
            [u.id for u in stack.app.routable()] == [healthy]
            and emulator.machine(APP, sick).state in ("stopping", "stopped")
        ):
            assert loop.time() < deadline, [(m.id, m.state) for m in emulator.machines(APP)]
            await stack.get("/")
            checks = emulator.machine(APP, sick).checks.values()
            critical = critical or any(c.status == "critical" for c in checks)
            look()
            await asyncio.sleep(0.1)
        assert critical
        assert stack.failures == []
        while stack.app.upstreams[sick].checks_critical:  # until a list says otherwise
            assert loop.time() < deadline
            look()
            await asyncio.sleep(0.05)
        look()
        assert listed == set()


@pytest.mark.parametrize("emulator_settings", ["fast:2", "fly:2"], indirect=True)
async def test_a_sick_machines_replacement_exceeds_max_machines_only_until_it_serves(
    emulator: Emulator,
) -> None:
    """Under ``max_machines: 1`` the machine a wake takes turns sick; its replacement is
    started beside it (one over the cap while it boots), and once it serves the sick one
    is drained and stopped at once: not ``scale_down_delay_s`` (600 s here) after it
    turned sick, two machines running all that time."""
    knobs = {"max_machines": 1, "scale_down_delay_s": 600, "idle_to_zero_s": 600}
    async with running_stack(emulator, wake_timeout_s=30, **knobs) as stack:
        sick = await wake_choice(stack)
        bad = {"type": "http", "path": "/missing", "interval": "1s", "grace_period": "0s"}
        await set_checks(emulator, sick, {"web": bad | READINESS})
        [healthy] = [m.id for m in emulator.machines(APP) if m.id != sick]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (
            [u.id for u in stack.app.routable()] == [healthy]
            and emulator.machine(APP, sick).state in ("stopping", "stopped")
        ):
            assert loop.time() < deadline, [(m.id, m.state) for m in emulator.machines(APP)]
            await stack.get("/")
            await asyncio.sleep(0.1)
        assert stack.failures == []
        # The replacement started before the sick one was stopped (no gap without one).
        started = min(
            e.timestamp for e in emulator.machine(APP, healthy).events if e.type == "start"
        )
        stopped = min(e.timestamp for e in emulator.machine(APP, sick).events if e.type == "stop")
        assert started <= stopped


@pytest.mark.parametrize("emulator_settings", ["fast"], indirect=True)
async def test_a_wake_through_an_api_slower_than_a_ticks_bound_is_served(
    emulator: Emulator,
) -> None:
    """Every API call takes 0.8 s, longer than a tick's bound on one call
    (``control.api_timeout_s`` 0.5 here; 5 s and a 6 s API by default): the ticks fail,
    but the wake's calls may take what is left of ``wake_timeout_s``, and it is served."""
    async with running_stack(emulator, control={"api_timeout_s": 0.5}, wake_timeout_s=30) as stack:
        await stack.until(lambda: len(stack.app.upstreams) == 1)  # the app was read
        emulator.set_faults(latency_s=0.8)
        await stack.get("/")
        assert (stack.served, stack.failures) == (1, [])


async def test_a_wake_through_a_short_api_outage_is_served_when_the_api_answers(
    emulator: Emulator,
) -> None:
    """Every API call answers 500 when a request wakes a one-machine app: the machine is
    tried again (0.25 s, doubling up to 1 s) and the request is served once the API
    answers, within wake_timeout_s."""
    async with running_stack(emulator, wake_timeout_s=30) as stack:
        await stack.until(lambda: len(stack.app.upstreams) == 1)  # the app was read
        emulator.set_faults(error_rate=1.0)
        registry = stack.metrics.registry

        def refused_leases() -> float:
            labels = {"operation": "acquire_machine_lease", "code": "500"}
            return registry.get_sample_value("autoscaler_api_requests_total", labels) or 0.0

        request = asyncio.ensure_future(stack.get("/"))
        # Each try of the wake begins with the machine's lease: two refused, two tries.
        await until(lambda: refused_leases() >= 2, what="two tries of the wake")
        assert not request.done()  # still held
        emulator.set_faults(error_rate=None)  # the outage ends
        await request
        assert stack.failures == []
        assert stack.served == 1
        assert [m.state for m in emulator.machines(APP)] == ["started"]


async def test_a_request_during_a_15s_suspend_waits_a_resume_not_the_suspend() -> None:
    settings = EmulatorSettings(
        profile="fly",
        timing=TimingSettings(suspend_s=SUSPEND_S),
        apps=[EmulatorApp(name=APP, machines=1)],
    )
    async with (
        Emulator(settings, host="127.0.0.1", port=0) as emulator,
        running_stack(emulator) as stack,
    ):
        await stack.get("/")  # a cold start; then the app idles and is drained
        await until(
            lambda: [m.state for m in emulator.machines(APP)] == ["suspending"],
            timeout_s=30,
            what="the idle machine to start suspending",
        )
        t0 = time.monotonic()
        url = f"http://127.0.0.1:{stack.proxy.port}/"
        async with stack.session.get(url, headers={"Host": HOST}) as resp:
            await resp.read()
            waited = time.monotonic() - t0
            assert resp.status == 200
            # Served by taking the suspend back: the machine never reached "suspended".
            assert resp.headers["fly-autoscaler-wake"] == "resume"
        [machine] = emulator.machines(APP)
        assert machine.state == "started"
        assert not any(e.status == "suspended" for e in machine.events)
        # The bound the issue sets (a resume plus a tick) with room for a loaded
        # machine; the point is that it is nowhere near the suspend's 15 s.
        assert waited < SUSPEND_S / 3, f"waited {waited:.2f}s"
        print(f"held request during a {SUSPEND_S:g}s suspend waited {waited:.3f}s")
    assert not [pid for pid in emulator.spawned_pids() if pid_alive(pid)]


async def test_an_idle_websocket_lets_the_app_sleep_and_its_drain_closes_it(
    emulator: Emulator,
) -> None:
    async with running_stack(emulator, connection_idle_s=1, idle_to_zero_s=2) as stack:
        url = f"http://127.0.0.1:{stack.proxy.port}/ws"
        async with stack.session.ws_connect(url, headers={"Host": HOST}) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str() == "hello"
            assert stack.app.in_flight == 1

            async def keep_alive() -> None:
                # A ping every 0.25 s, each answered with a pong by the machine, as
                # uvicorn's or a browser library's keep-alives do: control frames, not use.
                # (By hand: aiohttp's heartbeat would also give up on a pong 0.125 s late.)
                while not ws.closed:
                    await ws.ping()
                    await asyncio.sleep(0.25)

            pings = asyncio.create_task(keep_alive())
            try:
                msg = await asyncio.wait_for(ws.receive(), timeout=60)  # pongs pass unseen
            finally:
                pings.cancel()
                await asyncio.gather(pings, return_exceptions=True)
            assert msg.type is WSMsgType.CLOSE
            assert msg.data == 1001  # going away: reconnect (and wake the app)
        # Its suspend begun is enough: on Fly's timings it lasts up to 18 s more, which the
        # emulator's own tests cover.
        await until(
            lambda: [m.state for m in emulator.machines(APP)] in (["suspending"], ["suspended"]),
            timeout_s=60,
            what="the app going to sleep",
        )
        assert stack.app.in_flight == 0


@pytest.mark.parametrize("emulator_settings", ["fast"], indirect=True)  # timing plays no part
async def test_an_api_outage_loses_no_request_to_a_started_machine(
    emulator: Emulator, request: pytest.FixtureRequest
) -> None:
    soak = request.config.getoption("--soak") or os.environ.get("AUTOSCALER_SOAK") == "1"
    outage_s = 60.0 if soak else 10.0
    async with running_stack(emulator, min_machines=1) as stack:
        admin = AdminServer(
            AdminSettings(), stack.metrics, stack.controller, tick_s=0.2, max_tick_age_s=2
        )
        await admin.start("127.0.0.1", 0)
        host, port = admin.address
        base = f"http://{host}:{port}"
        try:
            await until(lambda: len(stack.app.routable()) == 1, 30, "a started machine")

            async def ready(control: bool) -> int:
                path = "/readyz?control=1" if control else "/readyz"
                async with stack.session.get(base + path) as resp:
                    return resp.status

            stop = asyncio.Event()

            async def steady() -> None:
                while not stop.is_set():
                    await stack.get("/work?ms=20")

            clients = [asyncio.create_task(steady()) for _ in range(4)]
            emulator.set_faults(error_rate=1.0)
            readiness: list[int] = []
            loop = asyncio.get_running_loop()
            end = loop.time() + outage_s
            while loop.time() < end:
                readiness.append(await ready(control=False))
                await asyncio.sleep(0.5)
            stale = await ready(control=True)
            healthy = stack.metrics.registry.get_sample_value("autoscaler_control_healthy")
            emulator.set_faults(error_rate=None)
            await until(lambda: stack.controller.status()[0].last_error is None, 30, "recovery")
            stop.set()
            await asyncio.gather(*clients)
            assert stack.failures == []
            assert stack.served > 10
            assert set(readiness) == {200}
            assert stale == 503
            assert healthy == 0.0
            await until(
                lambda: (
                    stack.metrics.registry.get_sample_value("autoscaler_control_healthy") == 1.0
                ),
                10,
                "control healthy again",
            )
            assert await ready(control=True) == 200
            print(f"{outage_s:g}s API outage: {stack.served} requests served, none lost")
        finally:
            await admin.stop()


async def test_a_deploy_that_moves_a_sleeping_machines_port_does_not_darken_the_app(
    emulator: Emulator,
) -> None:
    """A deploy changes the internal_port of a machine that sleeps, after our last list
    of it (a sleeping app is listed every idle_poll_s): the wake probed the old port until
    its 60 s bound, every request answered 504 meanwhile. A port shut for a second makes
    it read the machine again and route to the new one."""
    [machine] = emulator.machines(APP)
    async with running_stack(emulator, wake_timeout_s=10) as stack:
        await stack.until(lambda: bool(stack.app.upstreams))  # our record: its old port
        base = f"{emulator.url}/v1/apps/{APP}/machines/{machine.id}"
        auth = {"Authorization": f"Bearer {emulator.token}"}
        async with stack.session.get(base, headers=auth) as resp:
            config = (await resp.json())["config"]
        old_port = config["services"][0]["internal_port"]
        config["services"][0]["internal_port"] = old_port + 1  # `fly deploy` of a new port
        async with stack.session.post(base, headers=auth, json={"config": config}) as resp:
            assert resp.status == 200, await resp.text()
        await until(lambda: machine.state == "stopped", what="the update")
        await stack.get("/")
        assert stack.failures == []
        assert machine.internal_port == old_port + 1
        [upstream] = stack.app.routable()
        assert upstream.port == old_port + 1

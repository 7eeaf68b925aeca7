"""When our own run of a machine's critical checks overrules Fly's (control/recheck.py).

The run itself is end to end in test_e2e_dark.py (a passing one) and the replaced-sick
test there (a check that fails for us too); here, the rule: which results a pass covers,
how long, and which machines qualify.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from testkit import canned_http

from autoscaler.config import AppConfig
from autoscaler.control.recheck import RECHECK_FIRST_S, RECHECK_MAX_S, Rechecker, recheck_until
from autoscaler.control.runtime import AppRuntime, MachineRecord
from autoscaler.fly.models import Machine

FIRST = datetime(2026, 12, 6, 1, 0, 0, tzinfo=UTC)  # Fly's first run of the check
SECOND = datetime(2026, 12, 6, 1, 0, 15, tzinfo=UTC)  # its next run
CHECK = {"type": "http", "path": "/healthz", "grace_period": "1s", "interval": "15s"}
READY = {**CHECK, "kind": "readiness"}
"""A machine check that routes (the others do not: control/runtime.py, ``routes``)."""


def listed(
    status: str = "critical",
    at: datetime = FIRST,
    state: str = "started",
    checks: dict[str, Any] | None = None,
) -> Machine:
    return Machine.model_validate(
        {
            "id": "m1",
            "state": state,
            "private_ip": "127.0.0.2",
            "config": {"image": "app", "checks": {"web": READY} if checks is None else checks},
            "checks": [{"name": "web", "status": status, "updated_at": at.isoformat()}]
            if state == "started"
            else None,
        }
    )


def runtime(*machines: Machine, now: float = 100.0) -> AppRuntime:
    rt = AppRuntime.of(AppConfig(name="web"))
    rt.merge(machines, now, now)
    return rt


def test_a_pass_of_ours_covers_the_results_fly_listed_until_fly_runs_the_check_again() -> None:
    rt = runtime(listed())
    assert rt.machines["m1"].checks_critical
    assert "m1" in rt.sick_since
    rt.rechecked["m1"] = frozenset(rt.machines["m1"].critical)  # what a passing run records

    rt.merge([listed()], 101.0, 101.0)  # the same result of Fly's: still overruled
    assert not rt.machines["m1"].checks_critical
    assert "m1" not in rt.sick_since

    rt.merge([listed(at=SECOND)], 102.0, 102.0)  # Fly ran it again, critical: Fly rules
    assert rt.machines["m1"].checks_critical
    assert "m1" in rt.sick_since
    assert "m1" not in rt.rechecked


@pytest.mark.parametrize(
    ("next_list", "why"),
    [
        (listed(status="passing", at=SECOND), "Fly's next run passed"),
        (listed(state="suspended"), "it left started"),
    ],
)
def test_an_overruled_result_is_forgotten_once_it_is_no_longer_listed(
    next_list: Machine, why: str
) -> None:
    rt = runtime(listed())
    rt.rechecked["m1"] = frozenset(rt.machines["m1"].critical)
    rt.merge([next_list], 101.0, 101.0)
    assert "m1" not in rt.rechecked, why
    rt.merge([listed()], 102.0, 102.0)  # a critical result again (a new start): not covered
    assert rt.machines["m1"].checks_critical


def test_a_pass_covers_only_the_checks_it_ran() -> None:
    two = Machine.model_validate(
        {
            **listed().model_dump(mode="json", exclude_none=True),
            "checks": [
                {"name": "web", "status": "critical", "updated_at": FIRST.isoformat()},
                {"name": "db", "status": "critical", "updated_at": FIRST.isoformat()},
            ],
        }
    )
    rt = runtime(two)
    rt.rechecked["m1"] = frozenset({("web", FIRST)})
    rt.merge([two], 101.0, 101.0)
    assert rt.machines["m1"].checks_critical  # "db" is still critical


def test_the_window_is_the_first_round_of_the_checks_since_the_machine_was_seen_started() -> None:
    rt = runtime(listed(), now=100.0)
    # grace 1 s + interval 15 s + Fly's default timeout 2 s: Fly's second run is listed by then
    assert recheck_until(rt, rt.machines["m1"]) == pytest.approx(118.0)


@pytest.mark.parametrize(
    ("machine", "why"),
    [
        (listed(status="passing"), "Fly's checks pass"),
        (listed(status="warning"), "no result yet"),
        (listed(checks={}), "a check its config does not define (a service's, say)"),
        (listed(checks={"web": {**READY, "type": "grpc"}}), "a type of check we do not run"),
    ],
)
def test_machines_whose_checks_are_not_ours_to_run_again(machine: Machine, why: str) -> None:
    rt = runtime(machine)
    assert recheck_until(rt, rt.machines["m1"]) is None, why


def test_a_machine_without_an_address_is_not_checked() -> None:
    machine = listed()
    machine.private_ip = None
    rt = runtime(machine)
    assert recheck_until(rt, rt.machines["m1"]) is None


def with_service_checks(*checks: dict[str, Any], name: str) -> Machine:
    """A machine whose only checks are its service's (fly.toml's http_service.checks)."""
    machine = listed(checks={}).model_dump(mode="json", exclude_none=True)
    machine["config"]["services"] = [{"internal_port": 8080, "checks": list(checks)}]
    machine["checks"] = [{"name": name, "status": "critical", "updated_at": FIRST.isoformat()}]
    return Machine.model_validate(machine)


def test_a_services_check_is_found_by_the_name_fly_gives_it() -> None:
    tcp = {"type": "tcp", "port": 9090}
    rt = runtime(with_service_checks(tcp, CHECK, name="servicecheck-00-http-8080"))
    [spec] = rt.machines["m1"].critical_specs
    assert (spec.kind, spec.port, spec.path) == ("http", 8080, "/healthz")
    assert recheck_until(rt, rt.machines["m1"]) is not None


@pytest.mark.parametrize(
    ("checks", "name"),
    [
        ([CHECK, {**CHECK, "path": "/ready"}], "servicecheck-01-http-8080"),  # which one?
        ([CHECK], "servicecheck-00-http-9090"),  # no http check on that port
        ([CHECK], "servicecheck-00-tcp-8080"),
    ],
)
def test_a_services_check_that_is_not_one_of_a_kind_is_left_to_fly(
    checks: list[dict[str, Any]], name: str
) -> None:
    rt = runtime(with_service_checks(*checks, name=name))
    assert rt.machines["m1"].critical_specs == ()
    assert recheck_until(rt, rt.machines["m1"]) is None


async def test_a_check_that_fails_for_us_too_overrules_nothing_and_ends_with_its_round() -> None:
    broken = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    async with canned_http("127.0.0.1", broken) as (port, answers):
        machine = listed(checks={"web": {**READY, "port": port}})
        machine.private_ip = "127.0.0.1"
        rt = runtime(machine, now=100.0)
        clock = [100.0]

        async def sleep(seconds: float) -> None:  # the test's clock: each pause moves it on
            clock[0] += seconds

        done: list[bool] = []

        def on_done(_rt: AppRuntime, _machine: MachineRecord, passed: bool) -> None:
            done.append(passed)

        Rechecker(lambda: clock[0], sleep, on_done).follow(rt, 100.0)
        await asyncio.gather(*rt.rechecks.values())
    assert done == [False]  # at the end of its round: grace 1 s + interval 15 s + timeout 2 s
    # Runs at 0, 0.25, 0.75, 1.75, 3.75, then every 2 s up to 17.75 s.
    assert (RECHECK_FIRST_S, RECHECK_MAX_S) == (0.25, 2.0)
    assert len(answers) == 12
    assert rt.machines["m1"].checks_critical
    assert "m1" in rt.sick_since
    assert rt.rechecked == {}
    assert rt.rechecks == {}

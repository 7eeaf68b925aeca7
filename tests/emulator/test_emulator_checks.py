"""Health checks: run against the machine's process while it is started, reported in the
machine JSON as the real API does, stopped with the machine and with the emulator."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from emu_helpers import create_app, new_machine, session, until, wait_ok

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import Machine

FAST = {"interval": "100ms", "timeout": "500ms", "grace_period": "0s"}


def status(m: Machine, name: str) -> str | None:
    result = m.checks.get(name)
    return result.status if result else None


async def checks_of(s: Any, mid: str) -> dict[str, dict[str, Any]]:
    body = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
    return {c["name"]: c for c in body.get("checks", [])}


async def test_checks_pass_and_wait_for_their_grace_period(emulator: Emulator) -> None:
    async with session(emulator) as s:
        checks = {
            "web": {"type": "http", "path": "/healthz", **FAST},
            "port": {"type": "tcp", **FAST},
            "later": {"type": "http", "path": "/healthz", **FAST, "grace_period": "1h"},
        }
        m = await new_machine(s, checks=checks)
        record = emulator.machine("demo", m["id"])
        await until(record, lambda x: status(x, "web") == status(x, "port") == "passing")
        got = await checks_of(s, m["id"])
        assert set(got) == {"web", "port", "later"}
        assert set(got["web"]) == {"name", "status", "output", "updated_at"}
        assert got["web"]["output"].startswith(f"GET http://{m['private_ip']}:8080/healthz: 200")
        # Before its first result a check is a warning: neither passing nor failing.
        assert got["later"]["status"] == "warning"
        assert got["later"]["output"] == "waiting for the first check"


async def test_a_services_checks_run_under_the_names_fly_gives_them(emulator: Emulator) -> None:
    async with session(emulator) as s:
        services = [
            {
                "protocol": "tcp",
                "internal_port": 8080,
                "checks": [{"type": "tcp", **FAST}, {"type": "http", "path": "/nope", **FAST}],
            }
        ]
        m = await new_machine(s, services=services, checks={"web": {"type": "tcp", **FAST}})
        record = emulator.machine("demo", m["id"])
        await until(record, lambda x: status(x, "servicecheck-01-http-8080") == "critical")
        got = await checks_of(s, m["id"])
        assert {name: c["status"] for name, c in got.items()} == {
            "web": "passing",
            "servicecheck-00-tcp-8080": "passing",
            "servicecheck-01-http-8080": "critical",
        }
        bad = {"protocol": "tcp", "internal_port": 8080, "checks": [{"type": "udp"}]}
        r = await s.post(
            "/v1/apps/demo/machines", json={"config": {"image": "x", "services": [bad]}}
        )
        assert r.status == 400
        assert "config.services[0].checks[0].type" in (await r.json())["error"]


async def test_a_hung_process_turns_critical_and_recovers(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, checks={"web": {"type": "http", "path": "/healthz", **FAST}})
        record = emulator.machine("demo", m["id"])
        await until(record, lambda x: status(x, "web") == "passing")
        # Frozen: the kernel still accepts its connections, nothing answers them.
        emulator.kill_machine_process("demo", m["id"], signal.SIGSTOP)
        await until(record, lambda x: status(x, "web") == "critical")
        assert record.state == "started"  # the state does not say it; the check does
        assert "timed out after 0.5s" in record.checks["web"].output
        emulator.kill_machine_process("demo", m["id"], signal.SIGCONT)
        await until(record, lambda x: status(x, "web") == "passing")


async def test_an_error_status_is_critical(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, checks={"web": {"type": "http", "path": "/missing", **FAST}})
        record = emulator.machine("demo", m["id"])
        await until(record, lambda x: status(x, "web") == "critical")
        assert ": 404 Not Found" in record.checks["web"].output


async def test_an_https_check_of_the_demo_app_is_critical(emulator: Emulator) -> None:
    """It runs, over TLS, and fails as on Fly: the demo app speaks plain HTTP."""
    https = {"type": "http", "path": "/healthz", "protocol": "https", "tls_skip_verify": True}
    async with session(emulator) as s:
        m = await new_machine(s, checks={"web": {**https, **FAST}})
        record = emulator.machine("demo", m["id"])
        await until(record, lambda x: status(x, "web") == "critical")
        assert record.checks["web"].output.startswith("http check of ")


async def test_checks_run_only_while_the_machine_is_started(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, checks={"web": {"type": "http", "path": "/healthz", **FAST}})
        mid, base = m["id"], f"/v1/apps/demo/machines/{m['id']}"
        record = emulator.machine("demo", mid)
        running = emulator.world.lifecycle.checks.running
        await until(record, lambda x: status(x, "web") == "passing")
        assert running() == [mid]
        assert (await s.post(base + "/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        assert running() == []
        assert (await checks_of(s, mid))["web"]["status"] == "warning"
        assert record.checks["web"].output == "the machine is suspended"
        assert (await s.post(base + "/start")).status == 200
        await until(record, lambda x: status(x, "web") == "passing")
        assert running() == [mid]
        assert (await s.delete(base, params={"force": "true"})).status == 200
        await wait_ok(s, "demo", mid, "destroyed")
        assert running() == []


async def test_a_machine_created_without_checks_has_none(emulator: Emulator) -> None:
    """As on Fly: no check runs that its config does not declare, the demo image's too."""
    async with session(emulator) as s:
        m = await new_machine(s)  # started, with no checks in its config
        record = emulator.machine("demo", m["id"])
        assert "checks" not in record.config
        assert emulator.world.lifecycle.checks.running() == []
        assert record.checks == {}
        assert "checks" not in await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json()


async def test_seeded_demo_machines_declare_their_healthz_check_and_run_it(
    emulator_settings: EmulatorSettings,
) -> None:
    # A check of the service, as fly.toml's [[http_service.checks]] declares one.
    settings = emulator_settings.model_copy(update={"apps": [EmulatorApp(name="demo", machines=1)]})
    async with Emulator(settings, host="127.0.0.1", port=0) as emulator, session(emulator) as s:
        (record,) = emulator.machines("demo")
        [service] = record.config["services"]
        assert service["checks"] == [{"type": "http", "path": "/healthz"}]
        assert "checks" not in record.config
        assert (await s.post(f"/v1/apps/demo/machines/{record.id}/start")).status == 200
        name = "servicecheck-00-http-8080"
        await until(record, lambda x: status(x, name) == "passing")
        assert "/healthz: 200" in (await checks_of(s, record.id))[name]["output"]


async def test_closing_the_emulator_cancels_every_check() -> None:
    emu = Emulator(EmulatorSettings(rate_limits=False, demo_boot_delay_s=0.05), port=0)
    async with emu, session(emu) as s:
        await create_app(s)
        m = await new_machine_in(s, "demo")
        await until(emu.machine("demo", m), lambda x: status(x, "web") == "passing")
        checks = emu.world.lifecycle.checks
        assert checks.running() == [m]
    assert checks.running() == []
    names = [t.get_coro().__qualname__ for t in asyncio.all_tasks()]  # type: ignore[union-attr]
    assert not [n for n in names if n.startswith("HealthChecks.")]


async def new_machine_in(s: Any, app: str) -> str:
    body = {"config": {"image": "me/any", "checks": {"web": {"type": "tcp", **FAST}}}}
    r = await s.post(f"/v1/apps/{app}/machines", json=body)
    assert r.status == 200, await r.text()
    mid: str = (await r.json())["id"]
    return mid


async def test_check_configs_are_validated(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        bad = [
            ({"type": "udp"}, "config.checks.c.type: expected one of tcp, http"),
            ({"interval": "soon"}, 'config.checks.c.interval: expected a duration like "15s"'),
            ({"interval": "nan"}, 'config.checks.c.interval: expected a duration like "15s"'),
            ({"timeout": "1e999s"}, 'config.checks.c.timeout: expected a duration like "15s"'),
            ({"interval": "0s"}, "config.checks.c.interval: must be more than 0"),
            ({"path": "healthz"}, "config.checks.c.path: expected a path starting with /"),
            ({"port": 70000}, "config.checks.c.port: must be at most 65535"),
            ({"method": "FETCH"}, "config.checks.c.method: expected one of GET"),
            ({"kind": "liveness"}, "config.checks.c.kind: expected one of informational"),
        ]
        for check, text in bad:
            body = {"config": {"image": "autoscaler/demo-app", "checks": {"c": check}}}
            r = await s.post("/v1/apps/demo/machines", json=body)
            assert r.status == 400, check
            assert text in (await r.json())["error"], check

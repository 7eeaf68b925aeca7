"""End to end with machines on IPv6, as on Fly (``private_ip`` fdaa:..., 6PN): the emulator's
``ipv6`` option puts the app's machine on ::1. From zero, a request wakes the machine and is
proxied to it over ::1, and so is a WebSocket; the app then goes back to sleep."""

from __future__ import annotations

import pytest
from testkit import NEEDS_IPV6_LOOPBACK, free_port

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator

from .test_e2e import APP, HOST, running_stack

pytestmark = NEEDS_IPV6_LOOPBACK


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    # A free port of ::1, which every machine shares with this host's other programs (and
    # the parallel test processes' emulators).
    app = EmulatorApp(name=APP, machines=1, internal_port=free_port("::1"))
    return emulator_settings.model_copy(update={"ipv6": True, "apps": [app]})


async def test_a_request_and_a_websocket_wake_and_reach_a_machine_on_ipv6(
    emulator: Emulator,
) -> None:
    [machine] = emulator.machines(APP)
    assert machine.private_ip == "::1"
    async with running_stack(emulator, max_machines=1) as stack:
        base = f"http://127.0.0.1:{stack.proxy.port}"
        async with stack.session.get(f"{base}/", headers={"Host": HOST}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["machine_id"] == machine.id
        assert machine.state == "started"
        async with stack.session.ws_connect(f"{base}/ws", headers={"Host": HOST}) as ws:
            await ws.send_str("over ::1")
            assert await ws.receive_str() == "over ::1"
        await stack.until(lambda: emulator.machine(APP, machine.id).state == "suspended")

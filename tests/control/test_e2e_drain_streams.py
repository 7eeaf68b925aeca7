"""End to end, on the emulator's Fly-like timings: what a scale-down's drain does to the
long-lived connections its machine still carries, before the machine is suspended.

A machine carries at once a WebSocket, an event stream (``text/event-stream``), a slow
chunked download that outlasts ``drain_timeout_s`` and a GET that it has not begun to
answer by then; a second machine serves the app's other requests. Demand wants one
machine, the policy drains the first, and:

- the WebSocket gets a close frame 1001 (going away: reconnect elsewhere);
- the event stream ends cleanly at the drain's start, while the download still runs;
- the download gets the drain's time, then is cut (its client's connection dropped, so
  the truncated body is never taken for whole);
- the GET is cut then too, and sent again, once, to the other machine, which answers it
  (not the cut's 502);
- the machine ends suspended (stopped, if drained sick); every request meanwhile is
  served by the other machine, and nothing is left held: no request in flight, no
  stream or tunnel, no buffered byte.

The proxy-level tests of the same promises are tests/proxy/test_long_lived.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from testkit import fly_like, until

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator

from .test_e2e import APP, HOST, Stack, running_stack

pytestmark = pytest.mark.fly_profile

# Demand wants one machine however the test's requests are spread (at most 10 in flight):
# with two up, one goes. Neither is drained before min_lifetime_s: the first machine
# reaches it while the second, started later, is still short of it (or not even up).
# The download outlasts the drain.
KNOBS: dict[str, Any] = {
    "target_concurrency": 10,
    "target_utilization": 1.0,
    "scale_down_delay_s": 1,
    "min_lifetime_s": 5,
    "idle_to_zero_s": 600,
    "drain_timeout_s": 1.5,
    "wake_timeout_s": 30,
}
ASLEEP = ("suspended", "stopped")
"""How a drain ends: suspended, or stopped when the machine was sick (its first check ran
before its app listened, on a busy VM) when the drain began."""
HEAD_START_S = 1.0
"""How much older than the second machine the first one is at least."""


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    return fly_like(emulator_settings).model_copy(
        update={"apps": [EmulatorApp(name=APP, machines=2)]}
    )


async def start_elsewhere(stack: Stack, mid: str) -> None:
    """Start a machine behind our back (``fly machine start``), unless the controller did:
    on Fly's timings a busy VM may start the first machine's app after its first check,
    and a tick that saw that check critical started another machine in its place."""
    emulator = stack.emulator
    url = f"{emulator.url}/v1/apps/{APP}/machines/{mid}/start"
    headers = {"Authorization": f"Bearer {emulator.token}"}
    if emulator.machine(APP, mid).state == "stopped":
        async with stack.session.post(url, headers=headers) as resp:
            assert resp.status == 200 or emulator.machine(APP, mid).state != "stopped"


async def read_lines(response: aiohttp.ClientResponse, lines: list[bytes]) -> None:
    while line := await response.content.readline():
        lines.append(line)


async def test_a_drain_closes_websockets_ends_event_streams_and_cuts_downloads(
    emulator: Emulator,
) -> None:
    async with running_stack(emulator, control={"steady_list_s": 0}, **KNOBS) as stack:
        base = f"http://127.0.0.1:{stack.proxy.port}"
        host = {"Host": HOST}
        session = stack.session
        states = stack.states
        tasks: list[asyncio.Future[Any]] = []

        # 1. From zero, the three long-lived connections wake one machine, and stay on it.
        ws = await session.ws_connect(f"{base}/ws", headers=host)
        events = await session.get(f"{base}/events?n=10000&ms=100", headers=host)
        download = await session.get(f"{base}/stream?n=10000&ms=100", headers=host)
        try:
            await ws.send_str("hello")
            assert await ws.receive_str() == "hello"
            assert events.headers["Content-Type"] == "text/event-stream"
            assert (await events.content.readuntil(b"\n\n")).startswith(b"data: ")
            lines: list[bytes] = []
            downloading = asyncio.ensure_future(read_lines(download, lines))
            tasks.append(downloading)
            await until(lambda: bool(lines), what="the download's first chunk")
            [first] = [u for u in stack.app.upstreams.values() if u.in_flight]
            assert first.in_flight == 3
            drained = first.id
            [other] = [mid for mid in states() if mid != drained]

            # A GET slow on this machine alone (quick where it is sent again): still
            # unanswered at the drain's deadline.
            async def slow_get() -> tuple[int, str]:
                path = f"{base}/work?ms=120000&on={drained}"
                async with session.get(path, headers=host) as resp:
                    if resp.status != 200:
                        return resp.status, await resp.text()
                    return resp.status, (await resp.json())["machine_id"]

            slow = asyncio.ensure_future(slow_get())
            tasks.append(slow)
            # (On the first machine, unless the controller started the other one already:
            # see start_elsewhere. That one answers it at once.)
            await until(lambda: first.in_flight == 4 or slow.done(), what="the slow GET sent")

            # 2. Someone else starts the other machine, later: the first one reaches
            #    min_lifetime_s first, and is the one to go.
            await stack.until(lambda: stack.app.clock() - (first.started_at or 0) >= HEAD_START_S)
            await start_elsewhere(stack, other)

            # 3. The drain begins: the machine leaves the routing. Requests go on, from
            #    when the other machine is up, until the drained one sleeps.
            await stack.until(lambda: first.cordoned, timeout_s=30)
            served_by: list[str] = []
            asleep = asyncio.Event()

            async def trickle() -> None:
                await stack.until(lambda: any(u.id == other for u in stack.app.routable()))
                while not asleep.is_set():
                    async with session.get(f"{base}/work?ms=20", headers=host) as resp:
                        if resp.status != 200:
                            stack.failures.append(f"{resp.status}: {await resp.text()}")
                            continue
                        served_by.append((await resp.json())["machine_id"])

            trickler = asyncio.ensure_future(trickle())
            tasks.append(trickler)

            # The event stream ends cleanly (a cut chunked body would raise here), at the
            # drain's start: the download still runs, the machine is not suspending yet.
            async with asyncio.timeout(30):
                await events.read()
            assert not downloading.done()
            assert states()[drained] == "started"
            at_drain_start = len(lines)
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)

            # The download gets the drain's time, then is cut, never ended as if whole.
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(downloading, 30)
            assert len(lines) > at_drain_start
            # The GET, cut at the same time, is answered by the other machine.
            assert await asyncio.wait_for(slow, 30) == (200, other)

            # 4. The machine ends suspended; the other one served everything meanwhile.
            await stack.until(lambda: states()[drained] in ASLEEP, timeout_s=40)
            asleep.set()
            await trickler
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ws.close()
            events.release()
            download.release()
        assert states()[other] == "started"
        assert stack.failures == []
        assert served_by
        assert set(served_by) == {other}

        # 5. Nothing is left held: slots, streams, tunnels, buffered bytes, the drain.
        await stack.until(lambda: not stack.controller.apps[APP].running)
        assert stack.app.in_flight == 0
        assert [u.in_flight for u in stack.app.upstreams.values()] == [0, 0]
        assert stack.proxy._streams == {}
        assert stack.proxy._tunnels == set()
        assert stack.proxy._budget.held == 0
        assert not emulator.machine(APP, drained).cordoned

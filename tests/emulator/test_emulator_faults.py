"""Faults switched while the emulator runs: /_emulator/faults, its client, set_faults."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest
from emu_helpers import new_machine, session, until_state
from testkit import until

from autoscaler.config import CHANGING_MACHINE_CALLS, FaultSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.api import ROUTES
from autoscaler.emulator.faults import FaultsError, RemoteFaults


async def list_apps(s: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    r = await s.get("/v1/apps", params={"org_slug": "personal"})
    await r.read()
    return r


async def test_the_faults_endpoint_needs_the_token(emulator: Emulator) -> None:
    async with session(emulator, token="wrong") as s:
        assert (await s.get("/_emulator/faults")).status == 401
        r = await s.post("/_emulator/faults", json={"error_rate": 1.0})
        assert r.status == 401
    assert emulator.faults.error_rate == 0.0


async def test_an_outage_switched_on_and_off_over_http(emulator: Emulator) -> None:
    async with session(emulator) as s:
        r = await s.get("/_emulator/faults")
        assert r.status == 200
        assert await r.json() == FaultSettings().model_dump(mode="json")

        r = await s.post("/_emulator/faults", json={"error_rate": 1.0, "latency_s": "10ms"})
        assert r.status == 200
        shown = await r.json()
        assert (shown["error_rate"], shown["latency_s"]) == (1.0, 0.01)
        assert (await list_apps(s)).status == 500  # at once, on the next call
        # The switches themselves are never faulty: the outage can be ended.
        assert (await s.get("/_emulator/faults")).status == 200
        r = await s.post("/_emulator/faults", json={"error_rate": None})
        assert (await r.json())["error_rate"] == 0.0
        assert (await r.json())["latency_s"] == 0.01  # the others stay
        assert (await list_apps(s)).status == 200


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"eror_rate": 1}, "eror_rate: unknown fault"),
        # pydantic's own lines, capitalised ("Input should be ..."), are said as the
        # settings' errors are: lowercase, the key, what was expected, what came.
        ({"error_rate": 2}, "error_rate: input should be less than or equal to 1, got 2"),
        ({"latency_s": -1}, "latency_s: input should be greater than or equal to 0, got -1"),
        ({"hung": {"a": "b"}}, "hung: input should be a valid list, got a mapping"),
        # NaN fails every bound: it was called "less than or equal to 1".
        ({"hang_rate": float("nan")}, "hang_rate: expected a number, got nan (not a number)"),
        ({"error_rate": "NaN"}, "error_rate: expected a number, got nan (not a number)"),
        ([1, 2], "expected a JSON object"),
        # A boolean is no number: it was called "unable to parse string as a number, got
        # 'true'" (the settings pass true on as text, for YAML's yes/no/on/off).
        ({"error_rate": True}, "error_rate: expected a number, got true (a JSON boolean"),
        ({"latency_s": False}, "latency_s: expected a number, got false (a JSON boolean"),
        ({"answer_lost_rate": "nan"}, "answer_lost_rate: expected a number, got nan"),
        ({"answer_lost_rate": 1.5}, "answer_lost_rate: input should be less than or equal to 1"),
        # A name mistyped would lose no answer, and the test that set it prove nothing.
        ({"answer_lost_calls": ["startmachine"]}, "'startmachine' is no call that changes"),
        ({"answer_lost_calls": ["getMachine"]}, "'getMachine' is no call that changes"),
    ],
)
async def test_a_bad_fault_is_refused_with_its_name(
    emulator: Emulator, body: object, says: str
) -> None:
    async with session(emulator) as s:
        r = await s.post("/_emulator/faults", json=body)
        assert r.status == 400
        error = (await r.json())["error"]
        assert says in error
        assert "string" not in error
        assert "Input" not in error
    assert emulator.faults == FaultSettings()


async def test_remote_faults_client_makes_a_429_storm(emulator: Emulator) -> None:
    async with RemoteFaults(emulator.url, emulator.token) as faults, session(emulator) as s:
        assert emulator.token not in repr(faults)
        got = await faults.set(rate_limit_rate=1.0)
        assert got.rate_limit_rate == 1.0
        r = await list_apps(s)
        assert r.status == 429
        assert r.headers["Retry-After"]
        assert (await faults.get()).rate_limit_rate == 1.0
        with pytest.raises(FaultsError, match="400"):
            await faults.set(hang_rate=-1)
        assert await faults.clear() == FaultSettings()
        assert (await list_apps(s)).status == 200
    async with RemoteFaults(emulator.url, "wrong") as faults:
        with pytest.raises(FaultsError, match="401"):
            await faults.get()


async def test_an_outage_ends_a_wait_already_waiting_with_its_500(emulator: Emulator) -> None:
    """A control-plane outage drops Fly's long polls in flight too: a /wait that began
    before it ends with the outage's 500, not an answer from a control plane that is down
    (it waited on, and answered 200 or 408 as if nothing had happened)."""
    async with session(emulator) as s:
        mid = (await new_machine(s, start=False))["id"]
        waiter = asyncio.ensure_future(
            s.get(f"/v1/apps/demo/machines/{mid}/wait", params={"state": "started", "timeout": 20})
        )
        await until(lambda: len(emulator.machine("demo", mid).changed._waiters) > 0)
        emulator.set_faults(error_rate=1.0)
        got = await waiter
        assert got.status == 500
        assert await got.json() == {"error": "injected fault: internal server error", "status": 500}
        emulator.set_faults(error_rate=None)
        # A change of faults that does not raise the error rate leaves a wait alone: it answers when
        # the machine gets there.
        waiter = asyncio.ensure_future(
            s.get(f"/v1/apps/demo/machines/{mid}/wait", params={"state": "started", "timeout": 60})
        )
        await until(lambda: len(emulator.machine("demo", mid).changed._waiters) > 0)
        emulator.set_faults(rate_limit_rate=1.0, latency_s=0.01)
        emulator.set_faults(rate_limit_rate=None, latency_s=None)
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        got = await waiter
        assert (got.status, (await got.json())["state"]) == (200, "started")


async def test_set_faults_in_process_changes_only_what_it_names(emulator: Emulator) -> None:
    emulator.set_faults(FaultSettings(latency_s=0.01, error_rate=1.0))
    assert emulator.set_faults(error_rate=None) == FaultSettings(latency_s=0.01)
    async with aiohttp.ClientSession() as c:
        r = await c.get(emulator.url + "/_emulator/faults")
        assert r.status == 401


async def test_a_lost_answer_comes_after_the_call_was_carried_out(emulator: Emulator) -> None:
    """``answer_lost_rate``: the start is done (the machine boots, its events say so),
    the client gets no answer (the connection closed); reads keep theirs."""
    async with session(emulator) as s:
        mid = (await new_machine(s, start=False))["id"]
        emulator.set_faults(answer_lost_rate=1.0)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await s.post(f"/v1/apps/demo/machines/{mid}/start")
        m = emulator.machine("demo", mid)
        await until_state(m, "started")
        assert [(e.type, e.status) for e in m.events].count(("start", "starting")) == 1
        got = await s.get(f"/v1/apps/demo/machines/{mid}")  # a read: answered
        assert got.status == 200
        assert (await got.json())["state"] == "started"
        # A call refused keeps its answer: it did nothing, and says so.
        again = await s.post(f"/v1/apps/demo/machines/{mid}/start")
        assert again.status == 412


async def test_lost_answers_only_of_the_calls_named(emulator: Emulator) -> None:
    """``answer_lost_calls`` picks the calls: a lease taken without an answer is held all
    the same (its nonce unknown to the client), a stop not named is answered. Over httpx,
    the autoscaler's client: aiohttp's sends a DELETE again when its connection closes
    without an answer, and would show the second call's."""
    async with session(emulator) as s:
        mid = (await new_machine(s))["id"]
    emulator.set_faults(answer_lost_rate=1.0, answer_lost_calls=["createMachineLease"])
    auth = {"Authorization": f"Bearer {emulator.token}"}
    machine = f"/v1/apps/demo/machines/{mid}"
    async with httpx.AsyncClient(base_url=emulator.url, headers=auth) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(f"{machine}/lease", json={"ttl": 30, "description": "me: drain"})
        lease = await c.get(f"{machine}/lease")
        assert lease.status_code == 200
        assert lease.json()["data"]["description"] == "me: drain"
        stop = await c.post(f"{machine}/stop")  # without the nonce: refused, and said so
        assert stop.status_code == 409
        emulator.set_faults(answer_lost_calls=["releaseMachineLease"])
        nonce = lease.json()["data"]["nonce"]
        with pytest.raises(httpx.RemoteProtocolError):
            await c.delete(f"{machine}/lease", headers={"fly-machine-lease-nonce": nonce})
        assert (await c.get(f"{machine}/lease")).status_code == 404  # released
        stop = await c.post(f"{machine}/stop")
        assert stop.status_code == 200
    await until_state(emulator.machine("demo", mid), "stopped")


def test_the_calls_whose_answer_can_be_lost_are_those_that_change_a_machine() -> None:
    """``CHANGING_MACHINE_CALLS`` names routes (a renamed route would leave a name that
    loses nothing): every POST and DELETE on a machine, and its creation."""
    changing = {
        name
        for method, path, _, name in ROUTES
        if method in ("POST", "DELETE") and "/machines" in path
    }
    assert set(CHANGING_MACHINE_CALLS) == changing

"""Faults switched while the emulator runs: /_emulator/faults, its client, set_faults."""

from __future__ import annotations

import aiohttp
import pytest
from emu_helpers import session

from autoscaler.config import FaultSettings
from autoscaler.emulator import Emulator
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


async def test_set_faults_in_process_changes_only_what_it_names(emulator: Emulator) -> None:
    emulator.set_faults(FaultSettings(latency_s=0.01, error_rate=1.0))
    assert emulator.set_faults(error_rate=None) == FaultSettings(latency_s=0.01)
    async with aiohttp.ClientSession() as c:
        r = await c.get(emulator.url + "/_emulator/faults")
        assert r.status == 401

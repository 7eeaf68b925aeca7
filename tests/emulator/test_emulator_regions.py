"""Regions and process groups: honoured on create, filtered on list, spread at start-up."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from emu_helpers import create_app, create_machine, session, wait_ok

from autoscaler.config import ConfigError, EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.main import settings_from

DEMO = "autoscaler/demo-app"


async def test_region_and_process_group_are_kept_and_filter_the_list(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        made = {}
        for region, group in (("ord", "web"), ("cdg", "worker"), (None, "web")):
            body: dict[str, object] = {
                "config": {"image": DEMO, "metadata": {"fly_process_group": group}},
                "skip_launch": True,
            }
            if region:
                body["region"] = region
            r = await s.post("/v1/apps/demo/machines", json=body)
            assert r.status == 200, await r.text()
            m = await r.json()
            made[m["id"]] = m
        assert sorted(m["region"] for m in made.values()) == ["cdg", "iad", "ord"]

        async def listed(**params: str) -> list[str]:
            r = await s.get("/v1/apps/demo/machines", params=params)
            assert r.status == 200, await r.text()
            return sorted(m["region"] for m in await r.json())

        assert await listed(region="ord") == ["ord"]
        assert await listed(region="syd") == []
        assert await listed(**{"metadata.fly_process_group": "web"}) == ["iad", "ord"]
        assert await listed(**{"metadata.fly_process_group": "web", "region": "iad"}) == ["iad"]
        assert await listed(**{"metadata.fly_process_group": "db"}) == []
        summary = await (await s.get("/v1/apps/demo/machines", params={"summary": "true"})).json()
        assert all("config" not in m and "events" not in m for m in summary)
        assert {m["id"] for m in summary} == set(made)

        r = await s.post("/v1/apps/demo/machines", json={"config": {"image": DEMO}, "region": "X"})
        assert r.status == 400
        assert "region: expected a region code like iad" in (await r.json())["error"]


async def test_include_deleted_lists_destroyed_machines(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        gone = await create_machine(s, start=False)
        kept = await create_machine(s, start=False)
        assert (await s.delete(f"/v1/apps/demo/machines/{gone['id']}")).status == 200
        await wait_ok(s, "demo", gone["id"], "destroyed")
        plain = await (await s.get("/v1/apps/demo/machines")).json()
        assert [m["id"] for m in plain] == [kept["id"]]
        r = await s.get("/v1/apps/demo/machines", params={"include_deleted": "true"})
        states = {m["id"]: m["state"] for m in await r.json()}
        assert states == {gone["id"]: "destroyed", kept["id"]: "created"}


def test_the_app_flag_takes_regions_and_keeps_image_tags_and_digests() -> None:
    apps = settings_from(
        None,
        environ={},
        apps=["web=4:nginx:1.27@iad,cdg", "api=2@ord", "raw=1:img@sha256:abc", "plain=3"],
    ).apps
    got = {a.name: (a.machines, a.image, a.regions) for a in apps}
    assert got == {
        "web": (4, "nginx:1.27", ["iad", "cdg"]),
        "api": (2, DEMO, ["ord"]),
        "raw": (1, "img@sha256:abc", []),
        "plain": (3, DEMO, []),
    }


@pytest.mark.parametrize(
    ("flag", "message"),
    [("web=2@IAD", "expected regions like iad,cdg after @"),
     ("web=three", "expected NAME=N[:IMAGE][@REGION,...]"),
     ("web=-2", "expected NAME=N"),
     ("web=1.5", "expected NAME=N"),
     ("web", "expected NAME=N"),
     ("=2", "expected NAME=N"),
     # created the app "Web_Bad!", which no Fly app can be called
     ("Web_Bad!=2", "NAME: expected a Fly app name: 1-63 lowercase letters, digits and dashes"),
     ("web-=1", "NAME: expected a Fly app name"),
     # the demo image, said nowhere (a variable unset: web=2:$IMAGE)
     ("web=2:", "IMAGE: empty after ':'"),
     ("web=2:@iad", "IMAGE: empty after ':'")],
)  # fmt: skip
def test_a_bad_app_flag_is_an_error_not_one_machine(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"--app {flag}: {message}")):
        settings_from(None, environ={}, apps=[flag])


def test_an_app_given_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^--app: expected each app once, got web"):
        settings_from(None, environ={}, apps=["web=1", "web=2"])


async def test_start_up_apps_spread_their_machines_over_the_regions() -> None:
    settings = EmulatorSettings(
        rate_limits=False, apps=[EmulatorApp(name="web", machines=5, regions=["iad", "cdg"])]
    )
    async with Emulator(settings, port=0) as emu:
        regions = Counter(m.region for m in emu.machines("web"))
        assert regions == {"iad": 3, "cdg": 2}


async def test_the_process_sees_its_region_and_process_group(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        body = {
            "config": {"image": DEMO, "metadata": {"fly_process_group": "worker"}},
            "region": "cdg",
            "skip_launch": True,
        }
        m = await (await s.post("/v1/apps/demo/machines", json=body)).json()
        env = emulator.world.lifecycle.environment(emulator.machine("demo", m["id"]))
        assert (env["FLY_REGION"], env["FLY_PROCESS_GROUP"]) == ("cdg", "worker")


async def test_start_up_machines_carry_what_fly_deploy_writes() -> None:
    """As `fly deploy` writes fly.toml's primary_region and the default group, `app`, into
    every machine's config (the first region is the primary); the app's own env wins."""
    apps = [
        EmulatorApp(name="web", machines=2, regions=["cdg", "iad"]),
        EmulatorApp(name="api", machines=1, env={"PRIMARY_REGION": "ord"}),
    ]
    async with Emulator(EmulatorSettings(rate_limits=False, apps=apps), port=0) as emu:
        for m in emu.machines("web"):
            assert m.config["env"]["PRIMARY_REGION"] == "cdg"
            assert m.config["env"]["FLY_PROCESS_GROUP"] == "app"
            assert m.config["metadata"] == {"fly_process_group": "app"}
            env = emu.world.lifecycle.environment(m)
            assert (env["PRIMARY_REGION"], env["FLY_PROCESS_GROUP"]) == ("cdg", "app")
        (api,) = emu.machines("api")
        assert api.config["env"]["PRIMARY_REGION"] == "ord"

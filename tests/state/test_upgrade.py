"""A rolling upgrade of a cluster: a replica of the previous release and one of this code,
side by side on one Redis, as while the replicas are replaced one at a time.

The previous release is the last one that landed before the report format changed
(``PREVIOUS``): its replicas write their whole report every round with no header of
changes, report each app's idle time instead of the time of its last request, and hear
wake requests on a list only (this code also publishes them). Its code comes from this
repository's history (``git archive``) and runs from a directory of its own, as real
processes: the previous release leads, a replica of this code follows, routes on the old
leader's view and asks it for a wake; then the old replica stops and the new one leads.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from reliability.harness import write_config
from reliability.test_restart import Autoscaler
from testkit import PROFILES, free_port, on_profile

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
PREVIOUS = "0fd6e7748ca83c7c15ab34d456eebd05cf4fe2a6"
"""The last landed release with the reports written whole (fdebb17 changed them)."""


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fly's timings too: a cold start there takes about as long as ``self_wake_after_s``,
    so the old leader's wake and the new follower's own bound on waiting meet."""
    return on_profile(emulator_settings, request.param, apps=[EmulatorApp(name="web", machines=2)])


def previous_release(into: Path) -> Path:
    """The previous release's ``autoscaler`` package, from git, in a directory of its own."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs this repository's git history (git archive)")
    found = subprocess.run(
        [git, "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        pytest.skip(f"the previous release ({PREVIOUS[:7]}) is not in this clone's history")
    archive = subprocess.run(
        [git, "-C", str(REPO), "archive", "--format=tar", PREVIOUS, "autoscaler"],
        capture_output=True,
        check=True,
    )
    into.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(into, filter="data")
        else:  # this repository's own files
            tar.extractall(into)  # noqa: S202
    return into


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (another process's metrics: nothing to await) until it holds."""
    try:
        async with asyncio.timeout(30):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def leads(http: aiohttp.ClientSession, replica: Autoscaler) -> bool:
    async with http.get(f"{replica.admin}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "autoscaler_cluster_leader":
            return any(s.value == 1 for s in family.samples)
    return False


async def get(http: aiohttp.ClientSession, proxy_port: int) -> tuple[int, str | None]:
    url = f"http://127.0.0.1:{proxy_port}/"
    async with http.get(url, headers={"Host": "web.test"}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("fly-autoscaler-wake")


async def test_a_replica_of_the_previous_release_and_one_of_this_code_serve_together(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    old_tree = previous_release(tmp_path / "previous")
    file = write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"shutdown_timeout_s": 2},
            "control": {"tick_s": 0.2},
            "cluster": {"redis_url": redis_server, "lease_ttl_s": 1, "key_prefix": key_prefix},
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60}],
        },
    )
    old_ports, new_ports = (free_port(), free_port()), (free_port(), free_port())
    old = Autoscaler(file, *old_ports, cwd=old_tree)
    new = Autoscaler(file, *new_ports)
    try:
        async with aiohttp.ClientSession() as http:
            await old.start(http)
            await eventually(lambda: leads(http, old), "the previous release to lead")
            await new.start(http)  # ready: it routes on the old leader's view
            assert not await leads(http, new)
            # The app sleeps: this code's follower asks the old leader for the wake, on
            # the list the old release reads, and routes once the old view shows it.
            assert await get(http, new_ports[0]) == (200, "start")
            async with http.get(f"{new.admin}/status") as resp:
                cluster = (await resp.json())["cluster"]
            assert cluster["self_wakes"] == 0  # the old leader woke it
            async with http.get(f"{old.admin}/status") as resp:
                # What runs there is the previous release (cluster.lead came after it).
                assert "may_lead" not in (await resp.json())["cluster"]
            assert "may_lead" in cluster
            assert (await get(http, old_ports[0]))[0] == 200
            # The old replica goes (its replacement would come next): the new one leads.
            # Its stop may hang: the previous release carries redis-py's dropped
            # cancellations on Python 3.11 (fixed since: 2f180cf, 396f656, 504a861), which
            # under load held a stop for minutes. A platform kills such a replica after its
            # kill timeout, and so does this test; this code's replica leads either way.
            code = await old.stop(timeout_s=20, kill_on_timeout=True)
            assert code in (0, -signal.SIGKILL), old.output.decode()[-3000:]
            await eventually(lambda: leads(http, new), "this code's replica to lead")
            assert (await get(http, new_ports[0]))[0] == 200
            assert await new.stop() == 0, new.output.decode()[-3000:]
    finally:
        await old.reap()
        await new.reap()

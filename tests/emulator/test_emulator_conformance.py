"""Schemathesis against a live emulator with the seed spec: the emulator conforms.

Checks: not_a_server_error, status_code_conformance, content_type_conformance and
response_schema_conformance. The only widenings of the seed (made here, on the loaded
schema): Machine.state also takes the real moving states, and responses may carry extra
fields (the seed never forbids them; the patch says so explicitly). The YAML 1.1 `no` of
the restart policy enum is turned back into the string "no".

How the run is bounded and why:
- positive mode only: the seed documents 400 on a few operations, but the issue asks for a
  clear 400 on every invalid input, so negative data would "fail" status conformance on
  operations whose 400 the seed leaves out, by design;
- one app exists ("conformance") and every path below /v1/apps/{app_name}/ uses it, so
  create machine / create volume reach their logic (the seed has no 404 for them);
  deleteApp runs in a second pass without that override (schemathesis reuses a shared
  parameter's value across operations and would delete the app mid-run);
- one worker: CPython 3.11.7's ast module is not thread-safe (gh-106905) and Hypothesis
  parses lambda sources while drawing, so two worker threads fail at random inside
  Hypothesis ("AST constructor recursion depth mismatch");
- rate limits are off (429 is not in the seed) and the run has a hard timeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import ALL_STATES

SEED = Path(__file__).resolve().parents[2] / "spec" / "fly-machines-seed.yml"
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)
RUN_TIMEOUT_S = 110  # first pass; the second (one operation) gets 40: the whole < 3 min

pytestmark = [
    pytest.mark.slow,
]


def patched_seed() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    schemas = spec["components"]["schemas"]
    policy = schemas["MachineRestart"]["properties"]["policy"]
    policy["enum"] = ["no" if value is False else value for value in policy["enum"]]
    state = schemas["Machine"]["properties"]["state"]
    state["enum"] = sorted(set(state["enum"]) | ALL_STATES)
    for schema in schemas.values():
        if schema.get("type") == "object":
            schema["additionalProperties"] = True
    return spec


def test_patch_fixes_the_yaml_no_and_widens_only_state() -> None:
    spec = patched_seed()
    schemas = spec["components"]["schemas"]
    assert schemas["MachineRestart"]["properties"]["policy"]["enum"] == [
        "no",
        "on-failure",
        "always",
    ]
    assert {"starting", "stopping", "created", "failed"} <= set(
        schemas["Machine"]["properties"]["state"]["enum"]
    )


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    # The seed's /wait rules (timeout up to 300 s, no version needed for "stopped"), and
    # random image names refused as before: otherwise every generated image boots a real
    # process, and the stateful phase goes on to stop them with timeouts the seed allows
    # (negative ones) but the emulator refuses with a 400 the seed does not list.
    return EmulatorSettings(
        demo_boot_delay_s=0.0, rate_limits=False, seed_wait_limits=True, strict_images=True
    )


async def _schemathesis(args: list[str], cwd: Path, limit_s: float) -> tuple[int, str]:
    binary = Path(sys.executable).with_name("schemathesis")
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"schemathesis did not finish within {limit_s:g}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


async def test_emulator_conforms_to_the_seed(emulator: Emulator, tmp_path: Path) -> None:
    spec_file = tmp_path / "seed.json"
    spec_file.write_text(json.dumps(patched_seed()), encoding="utf-8")
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[[operations]]\ninclude-path-regex = "^/v1/apps/\\\\{app_name\\\\}/"\n'
        'parameters = { "app_name" = "conformance" }\n',
        encoding="utf-8",
    )
    emulator.world.create_app("conformance", "personal")
    common = [
        "run",
        str(spec_file),
        "--url",
        emulator.url,
        "-H",
        f"Authorization: Bearer {emulator.token}",
        "--checks",
        CHECKS,
        "--mode",
        "positive",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "15",
        "--seed",
        "4280",
        "--workers",  # one: CPython 3.11.7's ast is not thread-safe (gh-106905), and
        "1",  # Hypothesis parses lambdas with it while drawing
        "--no-color",
    ]
    code, out = await _schemathesis(
        ["--config-file", str(config), *common, "--exclude-operation-id", "deleteApp"],
        tmp_path,
        RUN_TIMEOUT_S,
    )
    assert code == 0, out[-6000:]
    assert "27 selected" not in out  # deleteApp is the second pass
    assert "Tested: 26" in out or "26 selected" in out, out[-2000:]
    code, out = await _schemathesis([*common, "--include-operation-id", "deleteApp"], tmp_path, 40)
    assert code == 0, out[-6000:]
    assert "conformance" in emulator.world.apps  # the first pass never deleted it

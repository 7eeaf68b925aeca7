"""Item 6: hostile input to the emulator gets 4xx, never 5xx.

The emulator runs as its own process (``python -m autoscaler emulator``) so that the
fuzzers can be plain synchronous code. Two attackers:

- schemathesis in negative mode (data that violates the seed spec: wrong types, missing
  required fields, bad path and query parameters), checked with ``not_a_server_error``;
- Hypothesis-generated bodies (arbitrary JSON documents, arbitrary bytes, wrong content
  types) posted to every operation that takes a body, and fuzzed query strings on the
  wait endpoint: every answer below 500.

Both are bounded (a fixed number of examples, a hard timeout) to stay well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import free_port

from .harness import FLY_TOKEN, Figures, child_env

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "spec" / "fly-machines-seed.yml"
SCHEMATHESIS_TIMEOUT_S = 90
APP = "fuzz"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    """An emulator process with app ``fuzz`` (one machine); stopped and reaped after."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoscaler",
            "emulator",
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            FLY_TOKEN,
            "--no-rate-limits",
            "--app",
            f"{APP}=1",
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while not any("listening on" in line for line in seen):
            line = proc.stdout.readline()  # blocks until it says more (or dies: "")
            assert line, "the emulator exited before it listened: " + "".join(seen)
            seen.append(line)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def api(emulator_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=emulator_url, headers={"Authorization": f"Bearer {FLY_TOKEN}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture(scope="module")
def machine_id(api: httpx.Client) -> str:
    resp = api.get(f"/v1/apps/{APP}/machines")
    assert resp.status_code == 200, resp.text
    return str(resp.json()[0]["id"])


def _patched_seed() -> dict[str, Any]:
    """The seed with the two fixes the conformance test makes (YAML's ``no``; states)."""
    spec: dict[str, Any] = yaml.safe_load(SEED.read_text(encoding="utf-8"))
    policy = spec["components"]["schemas"]["MachineRestart"]["properties"]["policy"]
    policy["enum"] = ["no" if value is False else value for value in policy["enum"]]
    return spec


@pytest.mark.skipif(not SEED.exists(), reason=f"seed spec not found at {SEED}")
def test_schemathesis_negative_data_gets_no_5xx(
    emulator_url: str, tmp_path: Path, figures: Figures
) -> None:
    spec = tmp_path / "seed.json"
    spec.write_text(json.dumps(_patched_seed()), encoding="utf-8")
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[[operations]]\ninclude-path-regex = "^/v1/apps/\\\\{app_name\\\\}/"\n'
        f'parameters = {{ "app_name" = "{APP}" }}\n',
        encoding="utf-8",
    )
    binary = Path(sys.executable).with_name("schemathesis")
    args = [
        str(binary), "--config-file", str(config), "run", str(spec),
        "--url", emulator_url,
        "-H", f"Authorization: Bearer {FLY_TOKEN}",
        "--checks", "not_a_server_error",
        "--mode", "negative",
        "--phases", "coverage,fuzzing",
        "--max-examples", "15",
        "--seed", "10",
        "--workers", "2",
        "--exclude-operation-id", "deleteApp",
        "--no-color",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            args,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=SCHEMATHESIS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"schemathesis did not finish within {SCHEMATHESIS_TIMEOUT_S}s")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "26 selected" in out or "Tested: 26" in out or "26 total" in out, out[-3000:]
    summary = [line.strip() for line in out.splitlines() if "passed" in line or "cases" in line]
    figures.record("emulator_schemathesis", mode="negative", summary=summary[-3:])


SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
# Keys the emulator's handlers look at, so the fuzz reaches past "not an object".
KNOWN = st.fixed_dictionaries(
    {},
    optional={
        "app_name": JSON, "org_slug": JSON, "config": JSON | st.dictionaries(
            st.sampled_from(["image", "services", "env", "guest", "restart", "metadata"]), JSON
        ),
        "name": JSON, "region": JSON, "signal": JSON, "ttl": JSON, "value": JSON,
        "size_gb": JSON, "skip_launch": JSON, "lease_ttl": JSON, "timeout": JSON,
    },
)  # fmt: skip
BODY_PATHS = (
    "/v1/apps",
    f"/v1/apps/{APP}/machines",
    f"/v1/apps/{APP}/machines/{{m}}",
    f"/v1/apps/{APP}/machines/{{m}}/stop",
    f"/v1/apps/{APP}/machines/{{m}}/signal",
    f"/v1/apps/{APP}/machines/{{m}}/lease",
    f"/v1/apps/{APP}/machines/{{m}}/metadata/k",
    f"/v1/apps/{APP}/volumes",
    "/v1/tokens/oidc",
)
COUNTS: dict[str, int] = {}


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    path=st.sampled_from(BODY_PATHS),
    body=st.one_of(
        KNOWN.map(lambda d: ("application/json", json.dumps(d).encode())),
        JSON.map(lambda d: ("application/json", json.dumps(d).encode())),
        st.binary(max_size=200).map(lambda b: ("application/json", b)),
        st.binary(max_size=200).map(lambda b: ("application/octet-stream", b)),
    ),
)
def test_fuzzed_bodies_get_no_5xx(
    api: httpx.Client, machine_id: str, path: str, body: tuple[str, bytes]
) -> None:
    content_type, data = body
    resp = api.post(path.format(m=machine_id), content=data, headers={"Content-Type": content_type})
    COUNTS[str(resp.status_code)] = COUNTS.get(str(resp.status_code), 0) + 1
    assert resp.status_code < 500, f"{path} {data[:200]!r}: {resp.status_code} {resp.text[:300]}"
    if resp.status_code == 200 and path.endswith("/machines"):
        # A fuzzed body made a real machine: destroy it so no process outlives the test.
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            created = resp.json()["id"]
            api.delete(f"/v1/apps/{APP}/machines/{created}", params={"force": "true"})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    state=st.text(max_size=30),
    timeout=st.text(max_size=12) | st.integers(-(10**12), 10**12).map(str),
    instance=st.text(min_size=1, max_size=30),  # never a real version: no long wait
)
def test_fuzzed_wait_queries_get_no_5xx(
    api: httpx.Client, machine_id: str, state: str, timeout: str, instance: str
) -> None:
    params = {"state": state, "timeout": timeout, "instance_id": instance}
    resp = api.get(f"/v1/apps/{APP}/machines/{machine_id}/wait", params=params)
    COUNTS[str(resp.status_code)] = COUNTS.get(str(resp.status_code), 0) + 1
    assert resp.status_code < 500, f"{params}: {resp.status_code} {resp.text[:300]}"


@pytest.fixture(scope="module", autouse=True)
def _fuzz_figures(figures: Figures) -> Iterator[None]:
    """After this module's tests, whichever of them ran: the fuzz outcomes go to the
    figures. (Each fuzzed request already asserted it got no 5xx.)"""
    yield
    if COUNTS:
        figures.record("emulator_fuzz", requests=sum(COUNTS.values()), statuses=dict(COUNTS))

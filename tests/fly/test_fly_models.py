"""Lenient models: unknown fields kept, every real state parses, both error body shapes."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from autoscaler.fly import models as m

REAL_STATES = [
    "created", "started", "stopped", "suspended", "failed",
    "creating", "starting", "stopping", "restarting", "suspending", "destroying", "updating",
    "replacing", "launch_failed",
    "destroyed", "replaced", "migrated",
]  # fmt: skip


@pytest.mark.parametrize("state", REAL_STATES)
def test_every_real_state_parses_and_is_classified(state: str) -> None:
    machine = m.Machine.model_validate({"id": "m1", "state": state})
    assert machine.state == state
    assert machine.known_state == m.MachineState(state)
    kinds = [machine.resting, machine.moving, machine.gone]
    assert kinds.count(True) == 1, kinds


def test_state_sets_match_the_notes() -> None:
    assert {s.value for s in m.RESTING_STATES} == set(REAL_STATES[:5])
    assert {s.value for s in m.MOVING_STATES} == set(REAL_STATES[5:14])
    assert {s.value for s in m.FINAL_STATES} == set(REAL_STATES[14:])


def test_unknown_state_still_parses() -> None:
    machine = m.Machine.model_validate({"id": "m1", "state": "hibernating"})
    assert machine.state == "hibernating"
    assert machine.known_state is None
    assert machine.moving
    assert not machine.resting


def test_unknown_fields_are_kept_at_every_level() -> None:
    data = {
        "id": "m1",
        "state": "started",
        "private_ip_v7": "fdaa::1",
        "image_ref": {"registry": "r", "repository": "x"},
        "config": {
            "image": "nginx",
            "stop_config": {"signal": "SIGTERM"},
            "services": [
                {"internal_port": 8080, "autostop": True, "force_instance_key": "k"},
            ],
            "guest": {"cpus": 2, "cpu_kind": "a100-80gb", "gpus": 1},
        },
    }
    machine = m.Machine.model_validate(data)
    assert machine.model_extra == {"private_ip_v7": "fdaa::1", "image_ref": data["image_ref"]}
    assert machine.config is not None
    assert machine.config.services is not None
    assert machine.config.services[0].autostop is True
    assert machine.config.services[0].model_extra == {"force_instance_key": "k"}
    assert machine.config.guest is not None
    assert machine.config.guest.cpu_kind == "a100-80gb"
    assert machine.model_dump(mode="json", exclude_none=True) == data


def test_timestamps_parse_and_bad_ones_do_not_break_the_machine() -> None:
    good = m.Machine.model_validate({"id": "m", "created_at": "2024-05-01T10:00:00Z"})
    assert good.created_at == datetime(2024, 5, 1, 10, tzinfo=UTC)
    bad = m.Machine.model_validate({"id": "m", "created_at": "yesterday", "updated_at": 5})
    assert bad.created_at is None
    assert bad.updated_at is None


def test_restart_policy_no_survives_yaml_1_1() -> None:
    assert m.MachineRestart.model_validate({"policy": False}).policy == "no"
    assert m.MachineRestart.model_validate({"policy": "always"}).policy == "always"


@pytest.mark.parametrize(
    ("body", "text", "status"),
    [
        ({"error": "not found", "status": 404}, "not found", 404),
        ({"error": "full", "status": "insufficient_capacity"}, "full", "insufficient_capacity"),
        ({"message": "taken"}, "taken", None),
    ],
)
def test_error_response_shapes(body: dict[str, object], text: str, status: object) -> None:
    err = m.ErrorResponse.model_validate(body)
    assert err.text == text
    assert err.status == status


def test_request_bodies_leave_out_unset_fields_and_keep_extras() -> None:
    body = m.CreateMachineRequest(
        config=m.MachineConfig(image="nginx"), region="iad", lease_ttl=30
    ).to_json()
    assert body == {"config": {"image": "nginx"}, "region": "iad", "lease_ttl": 30}
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        m.CreateVolumeRequest(name="d", size_gb=0, region="iad")


def test_internal_port_helper() -> None:
    machine = m.Machine.model_validate(
        {"id": "m", "config": {"image": "x", "services": [{"internal_port": 9000}]}}
    )
    assert machine.internal_port == 9000
    assert m.Machine(id="n").internal_port is None


T0 = 1_800_000_000.0  # a Unix time (2027): when the machines below were created


def _event(kind: str, status: str, at: float) -> dict[str, Any]:
    return {"id": "e", "type": kind, "status": status, "source": "user", "timestamp": at}


START = _event("start", "starting", (T0 + 60) * 1000)
STOPPED = _event("exit", "stopped", (T0 + 30) * 1000)
SUSPENDED = _event("suspend", "suspended", (T0 + 30) * 1000)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"events": [START, STOPPED]}, (T0 + 60, False)),
        ({"events": [STOPPED, START]}, (T0 + 60, False)),  # whatever the list's order
        ({"events": [START, SUSPENDED]}, (T0 + 60, True)),  # a resume
        (
            {"events": [START, _event("suspend", "suspending", (T0 + 30) * 1000)]},
            (T0 + 60, True),  # a start that took back a suspend under way
        ),
        ({"events": [_event("launch", "created", (T0 + 60) * 1000)]}, (T0 + 60, False)),
        (
            {"state": "restarting", "events": [_event("restart", "restarting", (T0 + 60) * 1000)]},
            (T0 + 60, False),
        ),
        ({"events": [_event("restart", "starting", (T0 + 60) * 1000), STOPPED]}, (T0 + 60, False)),
        # updated_at later than the event: the state moved since (a restart's boot)
        ({"events": [START], "updated_at": "2027-01-15T08:02:00Z"}, (T0 + 120, False)),
        ({"events": [START], "updated_at": "2027-01-15T07:59:00Z"}, (T0 + 60, False)),
        # a start Fly recorded no event of (an update's boot): not timed by an older one
        ({"events": [_event("update", "updating", (T0 + 90) * 1000), START]}, None),
        ({"events": [STOPPED]}, None),
        ({"events": []}, None),
        ({}, None),
        ({"events": "nonsense"}, None),
        ({"events": [{"type": "start", "status": "starting", "timestamp": "soon"}]}, None),
        ({"events": [{"type": "start", "status": "starting", "timestamp": True}]}, None),
        ({"events": [START, _event("start", "starting", 10**400)]}, (T0 + 60, False)),
        ({"events": [START, _event("start", "starting", math.nan)]}, (T0 + 60, False)),
        ({"events": [{**START, "type": ["start"]}]}, None),
        ({"events": [_event("start", "starting", T0 + 60)]}, None),  # seconds, not ms
        ({"events": [_event("start", "starting", (T0 - 3600) * 1000)]}, None),  # before created
        ({"state": "started", "events": [START]}, None),
        ({"state": "stopped", "events": [START]}, None),
    ],
    ids=[
        "start",
        "start, oldest first",
        "resume",
        "resume of a suspend under way",
        "launch",
        "restart",
        "restart by policy",
        "updated_at later",
        "updated_at earlier",
        "an update's boot",
        "newest not a start",
        "no events",
        "none",
        "not a list",
        "not a number",
        "a bool",
        "too large for a float",
        "NaN",
        "a type not a string",
        "seconds",
        "before created",
        "started",
        "stopped",
    ],
)
def test_the_time_fly_began_a_machine_s_current_start(
    fields: dict[str, Any], expected: tuple[float, bool] | None
) -> None:
    """From the newest of the machine's events, if it began a start (docs/fly-api-notes.md,
    "Machine events"); ``updated_at`` when later; nothing when the events do not say."""
    created = datetime.fromtimestamp(T0, tz=UTC).isoformat()
    machine = m.Machine.model_validate(
        {"id": "m1", "state": "starting", "created_at": created, **fields}
    )
    assert machine.current_start() == expected


def _ev(kind: str, status: str, at: int, request: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": kind, "status": status, "timestamp": at}
    if request is not None:
        event["request"] = request
    return event


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # What the emulator records (docs/emulator.md, "Interrupting a transition").
        ([_ev("start", "started", 3, {"resume": True}), _ev("start", "starting", 2)], "resume"),
        (
            [
                _ev("launch", "started", 3, {"resume": False, "reason": "no snapshot"}),
                _ev("start", "starting", 2),
                _ev("suspend", "suspended", 1),
            ],
            "start",
        ),
        ([_ev("start", "started", 3, {"resume": False}), _ev("start", "starting", 2)], "start"),
        # No word of a resume in the end: what the start began from.
        (
            [
                _ev("start", "started", 3),
                _ev("start", "starting", 2),
                _ev("suspend", "suspended", 1),
            ],
            "resume",
        ),
        (
            [_ev("start", "started", 3), _ev("start", "starting", 2), _ev("exit", "stopped", 1)],
            "start",
        ),
        ([_ev("start", "started", 3), _ev("restart", "restarting", 2)], "start"),
        ([_ev("start", "started", 3), _ev("launch", "created", 2)], "start"),
        # Nothing to go by.
        ([_ev("start", "started", 3), _ev("start", "starting", 2)], None),
        ([_ev("start", "started", 3)], None),
        ([_ev("update", "started", 3), _ev("start", "starting", 2)], None),
        ([_ev("exit", "stopped", 3)], None),
        ([], None),
        # Not a string where one is expected (a TypeError, as in current_start).
        ([_ev("start", "started", 3), {**_ev("start", "starting", 2), "type": ["start"]}], None),
        ([_ev("start", "started", 3), {**_ev("launch", "created", 2), "status": {}}], None),
    ],
    ids=[
        "resumed",
        "fell back (launch)",
        "fell back (resume false)",
        "from suspended",
        "from stopped",
        "a restart",
        "a create",
        "began from what is no longer listed",
        "only its end",
        "newest ended no start",
        "newest not a start's end",
        "no events",
        "a type not a string",
        "a status not a string",
    ],
)
def test_how_a_started_machine_came_up(events: list[dict[str, Any]], expected: str | None) -> None:
    """A resume, or a cold boot (a resume that fell back to one included), as the events
    of a started machine say; nothing when they do not."""
    machine = m.Machine.model_validate({"id": "m1", "state": "started", "events": events})
    assert machine.last_boot() == expected
    starting = m.Machine.model_validate({"id": "m1", "state": "starting", "events": events})
    assert starting.last_boot() is None


# -- every schema of the seed has a model with every one of its properties -----------------

SEED = Path(__file__).resolve().parents[2] / "spec" / "fly-machines-seed.yml"
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "ErrorResponse": m.ErrorResponse,
    "App": m.App,
    "Organization": m.Organization,
    "CreateAppRequest": m.CreateAppRequest,
    "Machine": m.Machine,
    "MachineConfig": m.MachineConfig,
    "MachineGuest": m.MachineGuest,
    "MachineService": m.MachineService,
    "MachinePort": m.MachinePort,
    "MachineServiceConcurrency": m.MachineServiceConcurrency,
    "MachineCheck": m.MachineCheck,
    "MachineMount": m.MachineMount,
    "MachineInit": m.MachineInit,
    "MachineRestart": m.MachineRestart,
    "CreateMachineRequest": m.CreateMachineRequest,
    "Volume": m.Volume,
    "CreateVolumeRequest": m.CreateVolumeRequest,
    "VolumeSnapshot": m.VolumeSnapshot,
}
# Inline request and response bodies: (path, method, where) → model.
INLINE_MODELS: dict[tuple[str, str, str], type[BaseModel]] = {
    ("/v1/apps", "get", "response"): m.AppList,
    ("/v1/apps/{app_name}/machines/{machine_id}/stop", "post", "request"): m.StopRequest,
    ("/v1/apps/{app_name}/volumes/{volume_id}", "put", "request"): m.UpdateVolumeRequest,
    ("/v1/apps/{app_name}/volumes/{volume_id}/extend", "put", "request"): m.ExtendVolumeRequest,
    ("/v1/tokens/oidc", "post", "request"): m.OidcTokenRequest,
}


def _seed() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SEED.read_text())
    return data


def test_every_seed_schema_has_a_model() -> None:
    schemas = _seed()["components"]["schemas"]
    assert set(schemas) == set(SCHEMA_MODELS)
    for name, schema in schemas.items():
        fields = set(SCHEMA_MODELS[name].model_fields)
        assert set(schema.get("properties", {})) <= fields, name


def test_every_inline_body_has_a_model() -> None:
    paths = _seed()["paths"]
    for (path, method, where), model in INLINE_MODELS.items():
        op = paths[path][method]
        if where == "request":
            schema = op["requestBody"]["content"]["application/json"]["schema"]
        else:
            schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) <= set(model.model_fields), (path, method)


def test_seed_examples_of_required_fields_are_required() -> None:
    """What the seed requires, the request models require too."""
    schemas = _seed()["components"]["schemas"]
    for name in ("CreateAppRequest", "CreateMachineRequest", "CreateVolumeRequest"):
        required = {k for k, f in SCHEMA_MODELS[name].model_fields.items() if f.is_required()}
        assert required == set(schemas[name]["required"]), name

"""Lenient models: unknown fields kept, every real state parses, both error body shapes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

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
        "host_status": "ok",
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
    assert machine.model_extra == {"host_status": "ok", "image_ref": data["image_ref"]}
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

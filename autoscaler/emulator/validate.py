"""Strict checks of request bodies and parameters; each failure is one clear sentence (400).

Written by hand rather than with the client's models: the emulator must not trust the code
it is there to test, and its messages should read like an API's, naming the field, what
was expected and what came. Unknown fields are kept, as the real API has many more.
"""

from __future__ import annotations

import math
import re
import signal
from typing import Any

from autoscaler.config import FLY_APP_NAME_RE, FLY_APP_NAME_RULE, parse_duration

REGION_RE = re.compile(r"^[a-z]{3}$")  # Fly's region codes
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")
RESTART_POLICIES = ("no", "on-failure", "always")
SCHEDULES = ("hourly", "daily", "weekly", "monthly")
HANDLERS = ("http", "tls", "tcp", "proxy_proto")
CHECK_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class BadRequest(Exception):
    """An invalid body, parameter or name (HTTP 400)."""


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> None:
    ok = isinstance(value, kind) and not (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    )
    if not ok:
        raise BadRequest(f"{where}: expected {what}, got {_type_name(value)}")


def _object(value: object, where: str, what: str = "an object") -> dict[str, Any]:
    _expect(value, dict, where, what)
    assert isinstance(value, dict)
    return value


def _body(body: object) -> dict[str, Any]:
    return _object(body, "body", "a JSON object")


def _section(parent: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``parent[key]`` checked to be an object (``dict``) or an array (``list``); None when
    absent or null."""
    value = parent.get(key)
    if value is not None:
        _expect(value, kind, f"{where}.{key}", "an object" if kind is dict else "an array")
    return value


def _int(value: object, where: str, low: int | None = None, high: int | None = None) -> int:
    _expect(value, int, where, "an integer")
    assert isinstance(value, int)
    if low is not None and value < low:
        raise BadRequest(f"{where}: must be at least {low}, got {value}")
    if high is not None and value > high:
        raise BadRequest(f"{where}: must be at most {high}, got {value}")
    return value


def _list(value: object, where: str) -> list[Any]:
    """An optional array: its items, none when absent."""
    if value is None:
        return []
    _expect(value, list, where, "an array")
    assert isinstance(value, list)
    return value


def _enum(value: object, choices: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _str_map(value: object, where: str) -> dict[str, str]:
    value = _object(value, where, "an object of strings")
    for key, item in value.items():
        _expect(item, str, f"{where}.{key}", "a string")
    return value


def _str_list(value: object, where: str) -> list[str]:
    _expect(value, list, where, "an array of strings")
    assert isinstance(value, list)
    for i, item in enumerate(value):
        _expect(item, str, f"{where}[{i}]", "a string")
    return value


def app_name(name: object, where: str = "app_name") -> str:
    if not isinstance(name, str) or not FLY_APP_NAME_RE.fullmatch(name):
        raise BadRequest(f"{where}: expected {FLY_APP_NAME_RULE}, got {name!r}")
    return name


def create_app(body: object) -> tuple[str, str, str | None]:
    """(name, org_slug, network); the real API's ``name`` is accepted for ``app_name``."""
    body = _body(body)
    name = body.get("app_name", body.get("name"))
    if name is None:
        raise BadRequest("app_name: required")
    org = body.get("org_slug")
    if org is None:
        raise BadRequest("org_slug: required")
    _expect(org, str, "org_slug", "a string")
    if "enable_subdomains" in body:
        _expect(body["enable_subdomains"], bool, "enable_subdomains", "a boolean")
    network = body.get("network")
    if network is not None:
        _expect(network, str, "network", "a string")
    return app_name(name), org, network


def _service(svc: object, where: str) -> None:
    svc = _object(svc, where)
    if "protocol" in svc:
        _enum(svc["protocol"], ("tcp", "udp"), f"{where}.protocol")
    if "internal_port" in svc:
        _int(svc["internal_port"], f"{where}.internal_port", 1, 65535)
    for i, port in enumerate(_list(svc.get("ports"), f"{where}.ports")):
        pw = f"{where}.ports[{i}]"
        _expect(port, dict, pw, "an object")
        if "port" in port:
            _int(port["port"], f"{pw}.port", 1, 65535)
        for j, handler in enumerate(_list(port.get("handlers"), f"{pw}.handlers")):
            _enum(handler, HANDLERS, f"{pw}.handlers[{j}]")
        if "force_https" in port:
            _expect(port["force_https"], bool, f"{pw}.force_https", "a boolean")
    conc = _section(svc, "concurrency", dict, where)
    if conc is not None:
        if "type" in conc:
            _enum(conc["type"], ("connections", "requests"), f"{where}.concurrency.type")
        for key in ("soft_limit", "hard_limit"):
            if key in conc:
                _int(conc[key], f"{where}.concurrency.{key}", 0)
    for i, check in enumerate(_list(svc.get("checks"), f"{where}.checks")):
        _check(check, f"{where}.checks[{i}]")


def _duration(value: object, where: str) -> None:
    """A duration string as the real spec has them ("15s", "500ms"); a bare number is
    read as seconds."""
    try:
        parsed = parse_duration(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, float) or not 0 <= parsed < math.inf:
        raise BadRequest(f'{where}: expected a duration like "15s", got {value!r}')


def _check(check: object, where: str, *, machine: bool = False) -> None:
    """A machine or service check (fly.MachineCheck, fly.MachineServiceCheck): type, port,
    path, method, the durations; a machine check's kind."""
    check = _object(check, where)
    if check.get("type") is not None:
        _enum(check["type"], ("tcp", "http"), f"{where}.type")
    if machine and check.get("kind") is not None:
        _enum(check["kind"], ("informational", "readiness"), f"{where}.kind")
    if check.get("port") is not None:
        _int(check["port"], f"{where}.port", 1, 65535)
    if check.get("path") is not None:
        _expect(check["path"], str, f"{where}.path", "a string")
        if not check["path"].startswith("/"):
            raise BadRequest(
                f"{where}.path: expected a path starting with /, got {check['path']!r}"
            )
    if check.get("method") is not None:
        _enum(str(check["method"]).upper(), CHECK_METHODS, f"{where}.method")
    if check.get("protocol") is not None:
        _enum(check["protocol"], ("http", "https"), f"{where}.protocol")
    for key in ("interval", "timeout", "grace_period"):
        if check.get(key) is not None:
            _duration(check[key], f"{where}.{key}")
    if check.get("interval") is not None and parse_duration(check["interval"]) == 0:
        raise BadRequest(f"{where}.interval: must be more than 0, got {check['interval']!r}")
    for i, header in enumerate(_list(check.get("headers"), f"{where}.headers")):
        header = _object(header, f"{where}.headers[{i}]")
        _expect(header.get("name"), str, f"{where}.headers[{i}].name", "a string")
        if header.get("values") is not None:
            _str_list(header["values"], f"{where}.headers[{i}].values")


def machine_config(config: object, where: str = "config") -> dict[str, Any]:
    config = _object(config, where)
    image = config.get("image")
    if image is None:
        raise BadRequest(f"{where}.image: required")
    _expect(image, str, f"{where}.image", "a string")
    if not image.strip():
        raise BadRequest(f"{where}.image: must not be empty")
    if "env" in config:
        _str_map(config["env"], f"{where}.env")
    if "metadata" in config:
        _str_map(config["metadata"], f"{where}.metadata")
    guest = _section(config, "guest", dict, where)
    if guest is not None:
        if "cpus" in guest:
            _int(guest["cpus"], f"{where}.guest.cpus", 1, 64)
        if "memory_mb" in guest:
            mem = _int(guest["memory_mb"], f"{where}.guest.memory_mb", 256)
            if mem % 256:
                raise BadRequest(f"{where}.guest.memory_mb: must be a multiple of 256, got {mem}")
        if "cpu_kind" in guest:
            _enum(guest["cpu_kind"], ("shared", "performance"), f"{where}.guest.cpu_kind")
        if guest.get("gpus") is not None:
            _int(guest["gpus"], f"{where}.guest.gpus", 0)
        if guest.get("gpu_kind") is not None:
            _expect(guest["gpu_kind"], str, f"{where}.guest.gpu_kind", "a string")
    for i, svc in enumerate(_section(config, "services", list, where) or []):
        _service(svc, f"{where}.services[{i}]")
    for name, check in (_section(config, "checks", dict, where) or {}).items():
        _check(check, f"{where}.checks.{name}", machine=True)
    for i, mount in enumerate(_section(config, "mounts", list, where) or []):
        mount = _object(mount, f"{where}.mounts[{i}]")
        if "volume" in mount:
            _expect(mount["volume"], str, f"{where}.mounts[{i}].volume", "a string")
    init = _section(config, "init", dict, where)
    if init is not None:
        for key in ("exec", "entrypoint", "cmd"):
            if init.get(key) is not None:
                _str_list(init[key], f"{where}.init.{key}")
        if init.get("swap_size_mb") is not None:
            _int(init["swap_size_mb"], f"{where}.init.swap_size_mb", 0)
    restart = _section(config, "restart", dict, where)
    if restart is not None:
        if "policy" in restart:
            _enum(restart["policy"], RESTART_POLICIES, f"{where}.restart.policy")
        if "max_retries" in restart:
            _int(restart["max_retries"], f"{where}.restart.max_retries", 0)
    stop_config = _section(config, "stop_config", dict, where)
    if stop_config is not None:
        stop_settings(stop_config, f"{where}.stop_config.")
    if "schedule" in config:
        _enum(config["schedule"], SCHEDULES, f"{where}.schedule")
    if "auto_destroy" in config:
        _expect(config["auto_destroy"], bool, f"{where}.auto_destroy", "a boolean")
    return config


def machine_request(body: object) -> tuple[dict[str, Any], str | None, str | None, bool]:
    """(config, name, region, skip_launch) of a create or update request."""
    body = _body(body)
    if "config" not in body:
        raise BadRequest("config: required")
    config = machine_config(body["config"])
    name = body.get("name")
    if name is not None:
        _expect(name, str, "name", "a string")
    region = body.get("region")
    if region is not None:
        _expect(region, str, "region", "a string")
        if region and not REGION_RE.match(region):
            raise BadRequest(f"region: expected a region code like iad or cdg, got {region!r}")
    for key in ("skip_launch", "skip_service_registration"):
        if key in body:
            _expect(body[key], bool, key, "a boolean")
    return config, name or None, region or None, bool(body.get("skip_launch", False))


def lease_ttl(body: object, longest: int) -> int | None:
    """``lease_ttl`` of a create request: whole seconds, or None when absent."""
    value = _body(body).get("lease_ttl")
    if value is None:
        return None
    return _int(value, "lease_ttl", 1, longest)


def seconds(value: object, where: str, low: float, high: float) -> float:
    """An integer of seconds or a duration string ("30s"), within [low, high]."""
    try:
        parsed = parse_duration(value.strip() if isinstance(value, str) else value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, float):
        raise BadRequest(f'{where}: expected seconds or a duration like "30s", got {value!r}')
    if not low <= parsed <= high:
        raise BadRequest(f"{where}: must be between {low:g} and {high:g} seconds, got {value!r}")
    return parsed


STOP_TIMEOUT_MAX_S = 86400.0  # Fly: "dedicated CPU VMs allow up to 24 hours"


def signal_name(name: object, where: str, *, stop: bool = False) -> int:
    """A signal named as Fly's API takes it ("SIGTERM", or "TERM"); not SIGSTOP/SIGCONT,
    but SIGSTOP as a ``stop``'s signal: fly.toml's kill_signal lists it (the app freezes
    and is killed at the timeout, docs/fly-api-notes.md "Stop signal and timeout")."""
    _expect(name, str, where, "a signal name like SIGTERM")
    assert isinstance(name, str)
    upper = name.upper()
    upper = upper if upper.startswith("SIG") else "SIG" + upper
    refused = ("SIGCONT",) if stop else ("SIGSTOP", "SIGCONT")
    if upper not in signal.Signals.__members__ or upper in refused:
        raise BadRequest(f"{where}: expected a signal name like SIGTERM, got {name!r}")
    return signal.Signals[upper]


def stop_settings(body: dict[str, Any], where: str) -> tuple[int | None, float | None]:
    """(signal, timeout seconds) of a stop's body or a machine's ``stop_config``, each None
    when not given; the timeout as an integer of seconds or a duration string ("30s")."""
    sig = body.get("signal")
    if sig is not None:
        sig = signal_name(sig, f"{where}signal", stop=True)
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = seconds(timeout, f"{where}timeout", 0, STOP_TIMEOUT_MAX_S)
    return sig, timeout


def stop_body(body: object) -> tuple[int | None, float | None]:
    """(signal number, timeout seconds) of a stop or restart, None where the body names
    none: the machine's ``config.stop_config`` decides then (``Lifecycle.stop_settings``)."""
    if body is None:
        return None, None
    return stop_settings(_body(body), "")


def metadata_key(key: str) -> str:
    if not METADATA_KEY_RE.match(key):
        raise BadRequest(f"key: expected 1-128 letters, digits, or ._-/, got {key!r}")
    return key


def metadata_value(body: object) -> str:
    """The seed sends a bare JSON string; the real API sends ``{"value": "..."}``."""
    if isinstance(body, dict) and set(body) == {"value"}:
        body = body["value"]
    _expect(body, str, "body", 'a JSON string or {"value": "..."}')
    assert isinstance(body, str)
    return body


def create_volume(body: object) -> dict[str, Any]:
    body = _body(body)
    for key in ("name", "size_gb", "region"):
        if key not in body:
            raise BadRequest(f"{key}: required")
    _expect(body["name"], str, "name", "a string")
    if not re.match(r"^[a-z0-9_]{1,30}$", body["name"]):
        raise BadRequest(
            f"name: expected 1-30 lowercase letters, digits and underscores, got {body['name']!r}"
        )
    _int(body["size_gb"], "size_gb", 1, 500)
    _expect(body["region"], str, "region", "a string")
    for key in ("encrypted", "unique_zones_only"):
        if key in body:
            _expect(body[key], bool, key, "a boolean")
    if "snapshot_id" in body and body["snapshot_id"] is not None:
        _expect(body["snapshot_id"], str, "snapshot_id", "a string")
    if "snapshot_retention" in body:
        _int(body["snapshot_retention"], "snapshot_retention", 1, 60)
    return body


def update_volume(body: object) -> int | None:
    body = _body(body)
    if body.get("snapshot_retention") is None:
        return None
    return _int(body["snapshot_retention"], "snapshot_retention", 1, 60)


def extend_volume(body: object, current: int) -> int:
    body = _body(body)
    if "size_gb" not in body:
        raise BadRequest("size_gb: required")
    size = _int(body["size_gb"], "size_gb", 1, 500)
    if size <= current:
        raise BadRequest(f"size_gb: must be larger than the current {current} GB, got {size}")
    return size


def oidc(body: object) -> str | None:
    if body is None:
        return None
    body = _body(body)
    aud = body.get("aud")
    if aud is not None:
        _expect(aud, str, "aud", "a string")
    return aud

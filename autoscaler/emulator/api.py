"""The HTTP side: every path of the seed spec (plus a few real-API extras) on aiohttp.

Handlers look things up first and validate second, so an unknown app or machine is a 404
whatever the body says; the world raises, the error middleware answers with the seed's
ErrorResponse shape ``{"error": ..., "status": <int>}`` and a ``fly-request-id``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from autoscaler.config import FaultSettings
from autoscaler.emulator import validate
from autoscaler.emulator.limits import RateLimiter, retry_after
from autoscaler.emulator.machines import Conflict
from autoscaler.emulator.model import RESTING, WAITABLE, Machine
from autoscaler.emulator.world import NameTaken, NotFound, World

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Context:
    world: World
    token: str
    rng: random.Random
    faults: FaultSettings
    rate_limits: bool
    limiter: RateLimiter = field(default_factory=RateLimiter)
    oidc_key: bytes = b""


CTX = web.AppKey("ctx", Context)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


# --- middlewares ---------------------------------------------------------------------


@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    try:
        response = await handler(request)
    except NotFound as exc:
        response = error(404, str(exc))
    except validate.BadRequest as exc:
        response = error(400, str(exc))
    except Conflict as exc:
        response = error(412, str(exc))
    except NameTaken as exc:
        response = error(422, str(exc))
    except web.HTTPException as exc:
        response = error(exc.status, exc.reason)
    except Exception:
        log.exception("emulator handler failed")
        response = error(500, "internal error in the emulator")
    response.headers["fly-request-id"] = request_id
    return response


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CTX]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    ok = scheme.lower() in ("bearer", "flyv1") and hmac.compare_digest(
        given.strip().encode(), ctx.token.encode()
    )
    if not ok:
        # Never echo what was sent: it may be a real token pasted by mistake.
        return error(401, "missing or invalid API token", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def limits_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CTX]
    faults = ctx.faults
    if faults.latency_s:
        await asyncio.sleep(faults.latency_s)
    if faults.error_rate and ctx.rng.random() < faults.error_rate:
        return error(500, "injected fault: internal server error")
    if faults.rate_limit_rate and ctx.rng.random() < faults.rate_limit_rate:
        return error(429, "injected fault: rate limited", {"Retry-After": "1"})
    action = request.match_info.route.name
    if ctx.rate_limits and action:
        info = request.match_info
        key = info.get("machine_id") or info.get("volume_id") or info.get("app_name") or "-"
        wait = ctx.limiter.take(action, key)
        if wait:
            return error(
                429,
                f"rate limit exceeded for {action} on {key}; retry in {wait:.2f}s",
                {"Retry-After": retry_after(wait)},
            )
    return await handler(request)


# --- helpers ---------------------------------------------------------------------------


def _world(request: web.Request) -> World:
    return request.app[CTX].world


def _machine(request: web.Request) -> Machine:
    info = request.match_info
    return _world(request).machine(info["app_name"], info["machine_id"])


async def _body(request: web.Request, required: bool = True) -> Any:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise validate.BadRequest("body: required (a JSON document)")
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise validate.BadRequest(f"body: invalid JSON: {exc}") from None


def _flag(request: web.Request, *names: str) -> bool:
    for name in names:
        value = request.query.get(name)
        if value is None:
            continue
        if value.lower() in ("true", "1", "yes", ""):
            return True
        if value.lower() in ("false", "0", "no"):
            continue
        raise validate.BadRequest(f"{name}: expected true or false, got {value!r}")
    return False


def _ok(**extra: Any) -> web.Response:
    return web.json_response({"ok": True, **extra})


# --- apps ------------------------------------------------------------------------------


async def list_apps(request: web.Request) -> web.Response:
    org = request.query.get("org_slug")
    if org is None:
        raise validate.BadRequest("org_slug: required query parameter")
    apps = [a.to_json() for a in _world(request).apps.values() if a.org_slug == org]
    return web.json_response({"total_apps": len(apps), "apps": apps})


async def create_app(request: web.Request) -> web.Response:
    name, org, network = validate.create_app(await _body(request))
    app = _world(request).create_app(name, org, network)
    return web.json_response(app.to_json(), status=201)


async def get_app(request: web.Request) -> web.Response:
    return web.json_response(_world(request).app(request.match_info["app_name"]).to_json())


async def delete_app(request: web.Request) -> web.Response:
    world = _world(request)
    name = request.match_info["app_name"]
    world.app(name)
    world.delete_app(name, _flag(request, "force"))
    return web.Response(status=202)


# --- machines --------------------------------------------------------------------------


async def list_machines(request: web.Request) -> web.Response:
    app = _world(request).app(request.match_info["app_name"])
    wanted = {s for s in request.query.get("state", "").split(",") if s}
    machines = [
        m.to_json()
        for m in app.machines.values()
        if m.state != "destroyed" and (not wanted or m.state in wanted)
    ]
    return web.json_response(machines)


async def create_machine(request: web.Request) -> web.Response:
    world = _world(request)
    app = world.app(request.match_info["app_name"])
    config, name, region, skip_launch = validate.machine_request(await _body(request))
    m = world.create_machine(app, config, name, region)
    if not skip_launch:
        world.lifecycle.start(m)
    return web.json_response(m.to_json())


async def get_machine(request: web.Request) -> web.Response:
    return web.json_response(_machine(request).to_json())


async def update_machine(request: web.Request) -> web.Response:
    m = _machine(request)
    config, name, region, _ = validate.machine_request(await _body(request))
    _world(request).update_machine(m, config, name, region)
    return web.json_response(m.to_json())


async def delete_machine(request: web.Request) -> web.Response:
    m = _machine(request)
    _world(request).destroy_machine(m, _flag(request, "force", "kill"))
    return _ok()


async def start_machine(request: web.Request) -> web.Response:
    m = _machine(request)
    previous = _world(request).lifecycle.start(m)
    return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})


async def stop_machine(request: web.Request) -> web.Response:
    m = _machine(request)
    sig, timeout = validate.stop_body(await _body(request, required=False))
    _world(request).lifecycle.stop(m, sig, timeout)
    return _ok()


async def suspend_machine(request: web.Request) -> web.Response:
    m = _machine(request)
    _world(request).lifecycle.suspend(m)
    return _ok()


def _wait_states(request: web.Request) -> set[str]:
    states = {s.strip() for v in request.query.getall("state", []) for s in v.split(",")}
    states.discard("")
    for s in states:
        if s not in WAITABLE:
            raise validate.BadRequest(
                f"state: expected one of {', '.join(sorted(WAITABLE))}, got {s!r}"
            )
    return states or {"started"}


def _reached(m: Machine, states: set[str], instance_id: str | None) -> bool:
    if instance_id and instance_id != m.instance_id:
        # That version is no longer the machine's: it has stopped for good.
        return bool(states & {"stopped", "destroyed", "settled"})
    return m.state in states or ("settled" in states and m.state in RESTING)


async def wait_machine(request: web.Request) -> web.Response:
    world = _world(request)
    info = request.match_info
    try:
        m: Machine | None = _machine(request)
    except NotFound:
        m = None
    states = _wait_states(request)
    if m is None:
        if "destroyed" in states and world.was_destroyed(info["app_name"], info["machine_id"]):
            return _ok(state="destroyed")
        _machine(request)  # raises the 404 again, with its message
    assert m is not None
    raw_timeout = request.query.get("timeout")
    timeout = 60.0 if raw_timeout is None else validate.seconds(raw_timeout, "timeout", 1, 300)
    instance_id = request.query.get("instance_id") or request.query.get("version")
    if instance_id and instance_id != m.instance_id and instance_id not in m.versions:
        raise validate.BadRequest(f"instance_id: {instance_id!r} is no version of machine {m.id}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _reached(m, states, instance_id):
        changed = m.changed  # the event of the current state; set on the next change
        remaining = deadline - loop.time()
        try:
            await asyncio.wait_for(changed.wait(), max(remaining, 0))
        except TimeoutError:
            wanted = ", ".join(sorted(states))
            return error(
                408, f"machine failed to reach desired state, {wanted}, currently {m.state}"
            )
    event_id = m.events[-1].id if m.events else ""
    return _ok(state=m.state, version=m.instance_id, event_id=event_id)


async def cordon(request: web.Request) -> web.Response:
    m = _machine(request)
    m.cordoned = request.match_info.route.name == "cordonMachine"
    _world(request).lifecycle.record(m, m.state)
    return _ok()


async def list_events(request: web.Request) -> web.Response:
    return web.json_response([e.to_json() for e in reversed(_machine(request).events)])


# --- metadata --------------------------------------------------------------------------


def _metadata(m: Machine) -> dict[str, str]:
    meta: dict[str, str] = m.config.setdefault("metadata", {})
    return meta


async def get_metadata_all(request: web.Request) -> web.Response:
    return web.json_response(_metadata(_machine(request)))


async def get_metadata(request: web.Request) -> web.Response:
    m = _machine(request)
    key = request.match_info["key"]
    meta = _metadata(m)
    if key not in meta:
        raise NotFound(f"metadata key not found: {key}")
    return web.json_response(meta[key])


async def set_metadata(request: web.Request) -> web.Response:
    m = _machine(request)
    key = validate.metadata_key(request.match_info["key"])
    _metadata(m)[key] = validate.metadata_value(await _body(request))
    _world(request).lifecycle.record(m, m.state)
    return web.Response(status=204)


async def delete_metadata(request: web.Request) -> web.Response:
    m = _machine(request)
    key = request.match_info["key"]
    meta = _metadata(m)
    if key not in meta:
        raise NotFound(f"metadata key not found: {key}")
    del meta[key]
    _world(request).lifecycle.record(m, m.state)
    return web.Response(status=204)


# --- volumes ---------------------------------------------------------------------------


async def list_volumes(request: web.Request) -> web.Response:
    app = _world(request).app(request.match_info["app_name"])
    return web.json_response([v.to_json() for v in app.volumes.values()])


async def create_volume(request: web.Request) -> web.Response:
    world = _world(request)
    app = world.app(request.match_info["app_name"])
    body = validate.create_volume(await _body(request))
    return web.json_response(world.create_volume(app, body).to_json())


def _volume_of(request: web.Request) -> Any:
    info = request.match_info
    return _world(request).volume(info["app_name"], info["volume_id"])


async def get_volume(request: web.Request) -> web.Response:
    return web.json_response(_volume_of(request).to_json())


async def update_volume(request: web.Request) -> web.Response:
    vol = _volume_of(request)
    retention = validate.update_volume(await _body(request))
    if retention is not None:
        vol.snapshot_retention = retention
    return web.json_response(vol.to_json())


async def delete_volume(request: web.Request) -> web.Response:
    world = _world(request)
    vol = _volume_of(request)
    world.delete_volume(world.app(request.match_info["app_name"]), vol)
    return web.json_response(vol.to_json())


async def extend_volume(request: web.Request) -> web.Response:
    vol = _volume_of(request)
    vol.size_gb = validate.extend_volume(await _body(request), vol.size_gb)
    return web.json_response(vol.to_json())


async def list_snapshots(request: web.Request) -> web.Response:
    return web.json_response(list(_volume_of(request).snapshots))


async def create_snapshot(request: web.Request) -> web.Response:
    return web.json_response(_world(request).snapshot_volume(_volume_of(request)))


# --- tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def oidc_token(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    aud = validate.oidc(await _body(request, required=False))
    org = ctx.world.settings.org_slug
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "iss": f"https://oidc.fly.io/{org}",
        "aud": aud or f"https://fly.io/{org}",
        "sub": f"{org}:emulator:local",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = hmac.new(ctx.oidc_key, signing.encode(), hashlib.sha256).digest()
    return web.json_response(signing + "." + _b64(sig))


# --- the application -------------------------------------------------------------------

_M = "/v1/apps/{app_name}/machines/{machine_id}"
_V = "/v1/apps/{app_name}/volumes/{volume_id}"
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", "/v1/apps", list_apps, "listApps"),
    ("POST", "/v1/apps", create_app, "createApp"),
    ("GET", "/v1/apps/{app_name}", get_app, "getApp"),
    ("DELETE", "/v1/apps/{app_name}", delete_app, "deleteApp"),
    ("GET", "/v1/apps/{app_name}/machines", list_machines, "listMachines"),
    ("POST", "/v1/apps/{app_name}/machines", create_machine, "createMachine"),
    ("GET", _M, get_machine, "getMachine"),
    ("POST", _M, update_machine, "updateMachine"),
    ("DELETE", _M, delete_machine, "deleteMachine"),
    ("POST", _M + "/start", start_machine, "startMachine"),
    ("POST", _M + "/stop", stop_machine, "stopMachine"),
    ("POST", _M + "/suspend", suspend_machine, "suspendMachine"),
    ("GET", _M + "/wait", wait_machine, "waitForMachineState"),
    ("POST", _M + "/cordon", cordon, "cordonMachine"),
    ("POST", _M + "/uncordon", cordon, "uncordonMachine"),
    ("GET", _M + "/events", list_events, "listMachineEvents"),
    ("GET", _M + "/metadata", get_metadata_all, "getMachineMetadataAll"),
    ("GET", _M + "/metadata/{key}", get_metadata, "getMachineMetadata"),
    ("POST", _M + "/metadata/{key}", set_metadata, "setMachineMetadata"),
    ("DELETE", _M + "/metadata/{key}", delete_metadata, "deleteMachineMetadata"),
    ("GET", "/v1/apps/{app_name}/volumes", list_volumes, "listVolumes"),
    ("POST", "/v1/apps/{app_name}/volumes", create_volume, "createVolume"),
    ("GET", _V, get_volume, "getVolume"),
    ("PUT", _V, update_volume, "updateVolume"),
    ("DELETE", _V, delete_volume, "deleteVolume"),
    ("PUT", _V + "/extend", extend_volume, "extendVolume"),
    ("GET", _V + "/snapshots", list_snapshots, "listVolumeSnapshots"),
    ("POST", _V + "/snapshots", create_snapshot, "createVolumeSnapshot"),
    ("POST", "/v1/tokens/oidc", oidc_token, "getOidcToken"),
]


def build_app(ctx: Context) -> web.Application:
    app = web.Application(middlewares=[errors_mw, auth_mw, limits_mw])
    app[CTX] = ctx
    for method, path, handler, name in ROUTES:
        app.router.add_route(method, path, handler, name=name)
    return app

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
from typing import Any

from aiohttp import web

from autoscaler.emulator import ps, validate
from autoscaler.emulator.leases import MAX_TTL_S, NONCE_HEADER
from autoscaler.emulator.machines import Conflict
from autoscaler.emulator.middleware import (
    CTX,
    Context,
    Handler,
    auth_mw,
    error,
    errors_mw,
    injected_error,
    leased_machine,
    limits_mw,
    machine_of,
    ok_body,
    outage_cuts,
    query_flag,
    read_body,
    world_of,
)
from autoscaler.emulator.model import EVENTS_DEFAULT, MAX_EVENTS, RESTING, WAITABLE, Machine
from autoscaler.emulator.world import NotFound

__all__ = ["CTX", "ROUTES", "Context", "build_app"]

WAIT_MAX_S = 60  # the real API answers 400 to a longer /wait (FLY_API_NOTES in docs/)
SEED_WAIT_MAX_S = 300  # the seed's limit, behind emulator.seed_wait_limits


# --- apps ------------------------------------------------------------------------------


async def list_apps(request: web.Request) -> web.Response:
    org = request.query.get("org_slug")
    if org is None:
        raise validate.BadRequest("org_slug: required query parameter")
    apps = [a.to_json() for a in world_of(request).apps.values() if a.org_slug == org]
    return web.json_response({"total_apps": len(apps), "apps": apps})


async def create_app(request: web.Request) -> web.Response:
    name, org, network = validate.create_app(await read_body(request))
    app = world_of(request).create_app(name, org, network)
    return web.json_response(app.to_json(), status=201)


async def get_app(request: web.Request) -> web.Response:
    return web.json_response(world_of(request).app(request.match_info["app_name"]).to_json())


async def delete_app(request: web.Request) -> web.Response:
    world = world_of(request)
    name = request.match_info["app_name"]
    world.app(name)
    world.delete_app(name, query_flag(request, "force"))
    return web.Response(status=202)


# --- machines --------------------------------------------------------------------------


# What ``summary=true`` leaves out of each machine, as the real spec says.
_NOT_IN_SUMMARY = ("config", "checks", "events", "host_status", "nonce")


async def list_machines(request: web.Request) -> web.Response:
    """The app's machines, filtered by ``state`` (comma-separated), ``region`` and
    ``metadata.{key}=value`` (as clients ask for ``metadata.fly_process_group=web``);
    ``include_deleted`` adds the machines destroyed lately; ``summary`` leaves out the
    config, checks and events."""
    app = world_of(request).app(request.match_info["app_name"])
    wanted = {s for s in request.query.get("state", "").split(",") if s}
    region = request.query.get("region")
    meta = {k[len("metadata.") :]: v for k, v in request.query.items() if k.startswith("metadata.")}
    candidates = list(app.machines.values())
    if query_flag(request, "include_deleted"):
        candidates = app.deleted + candidates
    summary = query_flag(request, "summary")
    machines = []
    for m in candidates:
        if m.state == "destroyed" and m.id in app.machines:
            continue  # being forgotten; listed with include_deleted once it is gone
        if wanted and m.state not in wanted:
            continue
        if region and m.region != region:
            continue
        have = m.config.get("metadata") or {}
        if any(have.get(k) != v for k, v in meta.items()):
            continue
        out = m.to_json()
        if summary:
            for key in _NOT_IN_SUMMARY:
                out.pop(key, None)
        machines.append(out)
    return web.json_response(machines)


async def create_machine(request: web.Request) -> web.Response:
    world = world_of(request)
    app = world.app(request.match_info["app_name"])
    body = await read_body(request)
    config, name, region, skip_launch = validate.machine_request(body)
    lease_ttl = validate.lease_ttl(body, MAX_TTL_S)
    m = world.create_machine(app, config, name, region)
    nonce = None
    if lease_ttl is not None:
        # As on Fly: the new machine is leased to its creator, the nonce only in this body.
        nonce = request.app[CTX].leases.acquire(m.id, m.instance_id, lease_ttl, "", None).nonce
    if not skip_launch:
        world.lifecycle.start(m)
        # On Fly a launch is one user event ("launch", created); the boot then ends in the
        # platform's "start" (started), with no user "start" between them.
        if m.events and (m.events[-1].type, m.events[-1].status) == ("start", "starting"):
            m.events.pop()
    out = m.to_json()
    if not skip_launch and out["state"] == "starting":
        # And the answer shows the machine as created, as Fly's does ("state": "created"
        # in its create example): the launch goes on from there, as a GET then shows.
        out["state"] = "created"
    if nonce is not None:
        out["nonce"] = nonce
    return web.json_response(out)


async def get_machine(request: web.Request) -> web.Response:
    return web.json_response(machine_of(request).to_json())


async def update_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    config, name, region, _ = validate.machine_request(await read_body(request))
    m = leased_machine(request)  # again: a lease taken while the body came is honoured
    world_of(request).update_machine(m, config, name, region)
    return web.json_response(m.to_json())


async def delete_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    world_of(request).destroy_machine(m, query_flag(request, "force", "kill"))
    return ok_body()


async def start_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    previous = world_of(request).lifecycle.start(m)
    return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})


async def stop_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    sig, timeout = validate.stop_body(await read_body(request, required=False))
    m = leased_machine(request)  # again: a lease taken while the body came is honoured
    world_of(request).lifecycle.stop(m, sig, timeout)
    return ok_body()


async def restart_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    sig, timeout = validate.stop_body(await read_body(request, required=False))
    m = leased_machine(request)  # again: a lease taken while the body came is honoured
    world_of(request).lifecycle.restart(m, sig, timeout)
    return ok_body()


async def signal_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    body = await read_body(request)
    if not isinstance(body, dict) or "signal" not in body:
        raise validate.BadRequest("signal: required")
    sig = validate.signal_name(body["signal"], "signal")
    m = leased_machine(request)  # again: a lease taken while the body came is honoured
    world_of(request).lifecycle.send_signal(m, sig)
    return ok_body()


async def suspend_machine(request: web.Request) -> web.Response:
    m = leased_machine(request)
    world_of(request).lifecycle.suspend(m)
    return ok_body()


def _wait_states(request: web.Request) -> set[str]:
    """The states a /wait asks for; started when it names none. A ``state`` given empty
    (``state=``) is bad input, the 400 of an unknown state, not a wait for started."""
    given = request.query.getall("state", [])
    states = {s.strip() for v in given for s in v.split(",")}
    states.discard("")
    if given and not states:
        states = {""}  # no state named: the 400 below, with got ''
    for s in states:
        if s not in WAITABLE:
            raise validate.BadRequest(
                f"state: expected one of {', '.join(sorted(WAITABLE))}, got {s!r}"
            )
    return states or {"started"}


def _reached(m: Machine, states: set[str], instance_id: str | None) -> bool:
    if instance_id and instance_id != m.instance_id:
        # That version is no longer the machine's: it counts as stopped (docs/emulator.md),
        # not as destroyed, which only the machine itself can be.
        return bool(states & {"stopped", "settled"}) or m.state in states
    return m.state in states or ("settled" in states and m.state in RESTING)


async def wait_machine(request: web.Request) -> web.Response:
    info = request.match_info
    try:
        m = machine_of(request)
    except NotFound:
        # An unknown app or machine is a 404 whatever the query says, so the states are
        # read only for a destroyed machine, remembered for a while (a bad state: 400).
        gone = world_of(request).was_destroyed(info["app_name"], info["machine_id"])
        if gone and "destroyed" in _wait_states(request):
            return ok_body(state="destroyed")
        raise
    states = _wait_states(request)
    seed_rules = world_of(request).settings.seed_wait_limits
    raw_timeout = request.query.get("timeout")
    longest = SEED_WAIT_MAX_S if seed_rules else WAIT_MAX_S
    timeout = 60.0 if raw_timeout is None else validate.seconds(raw_timeout, "timeout", 1, longest)
    instance_id = request.query.get("instance_id") or request.query.get("version")
    if "stopped" in states and not instance_id and not seed_rules:
        raise validate.BadRequest(
            "version: required when waiting for state stopped (pass the machine's "
            "instance_id as version or instance_id, as the real API requires)"
        )
    if instance_id and instance_id != m.instance_id and instance_id not in m.versions:
        raise validate.BadRequest(f"instance_id: {instance_id!r} is no version of machine {m.id}")
    lifecycle = world_of(request).lifecycle
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _reached(m, states, instance_id):
        if m.state == "destroyed":
            # Gone while we waited (the 404 a wait for a destroyed machine gets), not a
            # 408 at the end of the timeout that a client would take for "not yet".
            raise NotFound(f"machine not found: {m.id}")
        changed = m.changed  # the event of the current state; set on the next change
        seen_rate = lifecycle.faults.error_rate
        remaining = deadline - loop.time()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await changed.wait()  # or a rise of the error rate (World.set_faults)
        except TimeoutError:
            wanted = ", ".join(sorted(states))
            return error(
                408, f"machine failed to reach desired state, {wanted}, currently {m.state}"
            )
        if outage_cuts(request, seen_rate):
            return injected_error()  # an outage began: it ends the waits in flight too
    event_id = m.events[-1].id if m.events else ""
    return ok_body(state=m.state, version=m.instance_id, event_id=event_id)


async def list_versions(request: web.Request) -> web.Response:
    """The machine's configurations, newest first: the current one and those it kept."""
    m = machine_of(request)
    out = [{"version": m.instance_id, "user_config": m.config}]
    out += [
        {"version": v, "user_config": m.past_configs[v]}
        for v in reversed(m.versions)
        if v in m.past_configs
    ]
    return web.json_response(out)


_PS_KEYS = ("pid", "cpu", "rss", "rtime", "stime", "command")


async def list_processes(request: web.Request) -> web.Response:
    m = machine_of(request)
    sort_by = request.query.get("sort_by", "pid")
    if sort_by not in _PS_KEYS:
        raise validate.BadRequest(
            f"sort_by: expected one of {', '.join(_PS_KEYS)}, got {sort_by!r}"
        )
    order = request.query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise validate.BadRequest(f"order: expected asc or desc, got {order!r}")
    mp = world_of(request).lifecycle.procs.get(m.id)
    if m.state != "started" or mp is None:
        raise Conflict(f"unable to list processes of machine in current state: '{m.state}'")
    # Two walks of /proc, in a thread: the loop serves every machine meanwhile.
    stats = await asyncio.to_thread(lambda: ps.processes(mp.pid, mp.strays()))
    stats.sort(key=lambda p: p[sort_by], reverse=order == "desc")
    return web.json_response(stats)


def not_emulated(method: str, path: str) -> Handler:
    """A real-API endpoint the emulator does not play: 501 naming it (after auth)."""

    async def handler(request: web.Request) -> web.Response:
        return error(501, f"not implemented in the emulator: {method} {path}")

    return handler


async def cordon(request: web.Request) -> web.Response:
    m = leased_machine(request)
    m.cordoned = request.match_info.route.name == "cordonMachine"
    world_of(request).lifecycle.record(m, m.state)
    return ok_body()


def _lease_body(data: dict[str, Any], status: int = 200) -> web.Response:
    """The real API's lease answers: ``{"status": "success", "data": {...}}`` (Fly's
    machines-resource examples for acquire and release; flyctl's MachineLease)."""
    return web.json_response({"status": "success", "data": data}, status=status)


async def get_lease(request: web.Request) -> web.Response:
    m = machine_of(request)
    lease = request.app[CTX].leases.current(m.id)
    if lease is None:
        raise NotFound(f"no lease on machine {m.id}")
    return _lease_body(lease.to_json())


async def create_lease(request: web.Request) -> web.Response:
    m = machine_of(request)
    body = await read_body(request, required=False) or {}
    if not isinstance(body, dict):
        raise validate.BadRequest("body: expected a JSON object")
    ttl = validate.seconds(body.get("ttl", 30), "ttl", 1, MAX_TTL_S)
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise validate.BadRequest("description: expected a string")
    lease = request.app[CTX].leases.acquire(
        m.id, m.instance_id, int(ttl), description, request.headers.get(NONCE_HEADER)
    )
    return _lease_body(lease.to_json(), status=201)


async def release_lease(request: web.Request) -> web.Response:
    m = machine_of(request)
    if not request.app[CTX].leases.release(m.id, request.headers.get(NONCE_HEADER)):
        raise NotFound(f"no lease on machine {m.id}")
    return _lease_body({"ok": True})


async def list_events(request: web.Request) -> web.Response:
    """The machine's events, newest first: ``limit`` of them (default 20; more than 50
    gives 50, the most the real API returns)."""
    m = machine_of(request)
    raw = request.query.get("limit")
    limit = EVENTS_DEFAULT
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            raise validate.BadRequest(f"limit: expected a positive integer, got {raw!r}")
        limit = min(int(raw), MAX_EVENTS)
    return web.json_response([e.to_json() for e in reversed(m.events[-limit:])])


# --- metadata --------------------------------------------------------------------------


def _metadata(m: Machine) -> dict[str, str]:
    meta: dict[str, str] = m.config.setdefault("metadata", {})
    return meta


async def get_metadata_all(request: web.Request) -> web.Response:
    return web.json_response(_metadata(machine_of(request)))


async def get_metadata(request: web.Request) -> web.Response:
    m = machine_of(request)
    key = request.match_info["key"]
    meta = _metadata(m)
    if key not in meta:
        raise NotFound(f"metadata key not found: {key}")
    return web.json_response(meta[key])


async def set_metadata(request: web.Request) -> web.Response:
    m = leased_machine(request)
    key = validate.metadata_key(request.match_info["key"])
    value = validate.metadata_value(await read_body(request))
    m = leased_machine(request)  # again: a lease taken while the body came is honoured
    _metadata(m)[key] = value
    world_of(request).lifecycle.record(m, m.state)
    return web.Response(status=204)


async def delete_metadata(request: web.Request) -> web.Response:
    m = leased_machine(request)
    key = request.match_info["key"]
    meta = _metadata(m)
    if key not in meta:
        raise NotFound(f"metadata key not found: {key}")
    del meta[key]
    world_of(request).lifecycle.record(m, m.state)
    return web.Response(status=204)


# --- volumes ---------------------------------------------------------------------------


async def list_volumes(request: web.Request) -> web.Response:
    app = world_of(request).app(request.match_info["app_name"])
    return web.json_response([v.to_json() for v in app.volumes.values()])


async def create_volume(request: web.Request) -> web.Response:
    world = world_of(request)
    app = world.app(request.match_info["app_name"])
    body = validate.create_volume(await read_body(request))
    return web.json_response(world.create_volume(app, body).to_json())


def _volume_of(request: web.Request) -> Any:
    info = request.match_info
    return world_of(request).volume(info["app_name"], info["volume_id"])


async def get_volume(request: web.Request) -> web.Response:
    return web.json_response(_volume_of(request).to_json())


async def update_volume(request: web.Request) -> web.Response:
    vol = _volume_of(request)
    retention = validate.update_volume(await read_body(request))
    if retention is not None:
        vol.snapshot_retention = retention
    return web.json_response(vol.to_json())


async def delete_volume(request: web.Request) -> web.Response:
    world = world_of(request)
    vol = _volume_of(request)
    world.delete_volume(world.app(request.match_info["app_name"]), vol)
    return web.json_response(vol.to_json())


async def extend_volume(request: web.Request) -> web.Response:
    vol = _volume_of(request)
    vol.size_gb = validate.extend_volume(await read_body(request), vol.size_gb)
    return web.json_response(vol.to_json())


async def list_snapshots(request: web.Request) -> web.Response:
    return web.json_response(list(_volume_of(request).snapshots))


async def create_snapshot(request: web.Request) -> web.Response:
    return web.json_response(world_of(request).snapshot_volume(_volume_of(request)))


# --- tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def oidc_token(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    aud = validate.oidc(await read_body(request, required=False))
    org = ctx.world.settings.org_slug
    now = int(ctx.world.wall())
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
    ("POST", _M + "/restart", restart_machine, "restartMachine"),
    ("POST", _M + "/signal", signal_machine, "signalMachine"),
    ("GET", _M + "/wait", wait_machine, "waitForMachineState"),
    ("POST", _M + "/cordon", cordon, "cordonMachine"),
    ("POST", _M + "/uncordon", cordon, "uncordonMachine"),
    ("GET", _M + "/events", list_events, "listMachineEvents"),
    ("GET", _M + "/versions", list_versions, "listMachineVersions"),
    ("GET", _M + "/ps", list_processes, "listMachineProcesses"),
    ("GET", _M + "/lease", get_lease, "getMachineLease"),
    ("POST", _M + "/lease", create_lease, "createMachineLease"),
    ("DELETE", _M + "/lease", release_lease, "releaseMachineLease"),
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


# Every other endpoint of Fly's published spec (paths below /v1): a clear 501, so a client
# learns which call the emulator lacks instead of meeting a bare 404.
NOT_EMULATED: list[tuple[str, str]] = [
    ("GET", "/apps/{app_name}/certificates"),
    ("POST", "/apps/{app_name}/certificates/acme"),
    ("POST", "/apps/{app_name}/certificates/custom"),
    ("GET", "/apps/{app_name}/certificates/{hostname}"),
    ("DELETE", "/apps/{app_name}/certificates/{hostname}"),
    ("DELETE", "/apps/{app_name}/certificates/{hostname}/acme"),
    ("POST", "/apps/{app_name}/certificates/{hostname}/check"),
    ("DELETE", "/apps/{app_name}/certificates/{hostname}/custom"),
    ("POST", "/apps/{app_name}/deploy_token"),
    ("GET", "/apps/{app_name}/ip_assignments"),
    ("POST", "/apps/{app_name}/ip_assignments"),
    ("DELETE", "/apps/{app_name}/ip_assignments/{ip}"),
    ("POST", "/apps/{app_name}/machines/{machine_id}/exec"),
    ("GET", "/apps/{app_name}/machines/{machine_id}/memory"),
    ("PUT", "/apps/{app_name}/machines/{machine_id}/memory"),
    ("POST", "/apps/{app_name}/machines/{machine_id}/memory/reclaim"),
    ("PUT", "/apps/{app_name}/machines/{machine_id}/metadata"),
    ("PATCH", "/apps/{app_name}/machines/{machine_id}/metadata"),
    ("GET", "/apps/{app_name}/secretkeys"),
    ("GET", "/apps/{app_name}/secretkeys/{secret_name}"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}"),
    ("DELETE", "/apps/{app_name}/secretkeys/{secret_name}"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}/decrypt"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}/encrypt"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}/generate"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}/sign"),
    ("POST", "/apps/{app_name}/secretkeys/{secret_name}/verify"),
    ("GET", "/apps/{app_name}/secrets"),
    ("POST", "/apps/{app_name}/secrets"),
    ("GET", "/apps/{app_name}/secrets/{secret_name}"),
    ("POST", "/apps/{app_name}/secrets/{secret_name}"),
    ("DELETE", "/apps/{app_name}/secrets/{secret_name}"),
    ("GET", "/orgs/{org_slug}/machines"),
    ("GET", "/orgs/{org_slug}/volumes"),
    ("POST", "/platform/placements"),
    ("GET", "/platform/regions"),
    ("POST", "/tokens/authenticate"),
    ("POST", "/tokens/authorize"),
    ("GET", "/tokens/current"),
    ("POST", "/tokens/kms"),
]


def build_app(ctx: Context) -> web.Application:
    app = web.Application(middlewares=[errors_mw, auth_mw, limits_mw])
    app[CTX] = ctx
    for method, path, handler, name in ROUTES:
        app.router.add_route(method, path, handler, name=name)
    for method, path in NOT_EMULATED:
        app.router.add_route(method, "/v1" + path, not_emulated(method, "/v1" + path))
    return app

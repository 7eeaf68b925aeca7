"""The 27 operations of the seed spec and the real API's machine leases, as methods over
one abstract ``_send``.

Each method builds a ``Call`` (what to send, and which app and machine it concerns, for
rate limits and logs) and reads the answer into the models, in whichever of the seed's and
the real API's shapes it comes. Every call that changes a machine takes ``lease_nonce``:
the nonce of a lease we hold on it, sent in ``fly-machine-lease-nonce`` (a machine leased
by someone else answers such calls 409 without it). Sending, retrying and mapping errors belong to
``client.MachinesClient``, the only place httpx is imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from autoscaler.fly import models as m
from autoscaler.fly.errors import Conflict, FlyError, NotFound, WaitTimeout, error_from_response
from autoscaler.fly.limits import Clock, Sleep

_M = TypeVar("_M", bound=BaseModel)

NONCE_HEADER = "fly-machine-lease-nonce"
MAX_WAIT_CALL_S = 60  # the real API answers 400 to a longer /wait; longer waits loop
# Repeating these cannot do harm: they read, or drive a machine towards a state it may
# already be in. Everything else is retried only when the request never left.
SAFE_OPERATIONS = frozenset(
    {
        "list_apps",
        "get_app",
        "list_machines",
        "get_machine",
        "start_machine",
        "stop_machine",
        "suspend_machine",
        "wait_for_machine_state",
        "cordon_machine",
        "uncordon_machine",
        "get_machine_metadata",
        "set_machine_metadata",
        "delete_machine_metadata",
        "get_machine_lease",
        "refresh_machine_lease",  # extends our own lease again: harmless
        "release_machine_lease",  # a second one answers 404, which the caller reads as done
        "list_volumes",
        "get_volume",
        "list_volume_snapshots",
    }
)
NO_BODY: Any = object()


class RawText(str):
    """A 2xx body that is not JSON, as text (``_send`` gives it so): only the OIDC
    endpoint answers like that; elsewhere it is a page from something in the way."""


@dataclass(slots=True)
class Call:
    operation: str
    method: str
    path: str
    app: str | None = None
    machine: str | None = None  # or volume id
    params: dict[str, str | int] = field(default_factory=dict)
    body: Any = NO_BODY
    hold_s: float = 0.0  # how long the server may hold the call (a /wait): added to its timeout
    # (client clock) a wait's own: no retry sleeps past it, no turn is waited for past it,
    # and each attempt's hold (the query parameter ``hold_param``) ends by it
    deadline: float | None = None
    hold_param: str | None = None
    limit: str | None = None  # the rate-limit key when it is not the app (an org's apps)
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None  # the rate-limited API action, when not ``operation``

    @property
    def limit_action(self) -> str:
        return self.action or self.operation

    @property
    def limit_key(self) -> str:
        if self.limit is not None:
            return self.limit
        return f"{self.app}/{self.machine}" if self.machine else (self.app or "-")


def _seg(value: str) -> str:
    return quote(value, safe="")


def _metadata_suffix(key: str) -> str:
    return f"/metadata/{_seg(key)}"


def _force_query(force: bool) -> dict[str, str | int]:
    """``?force=true`` for the deletes, and no query at all without it."""
    return {"force": "true"} if force else {}


def _nonce(lease_nonce: str | None) -> dict[str, str]:
    return {NONCE_HEADER: lease_nonce} if lease_nonce else {}


def _lease(payload: Any, operation: str) -> m.Lease:
    """The real API's ``{"status": "success", "data": {...}}`` or a bare Lease."""
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict):
        payload = payload["data"]
    return parse(m.Lease, payload, operation)


def duration_string(seconds: float) -> str:
    """Seconds as a Go duration string ("30s", "1500ms"): what the real API's stop parses."""
    if seconds < 0:
        raise ValueError(f"expected a timeout >= 0 seconds, got {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _machine_body(
    config: m.MachineConfig | Mapping[str, Any],
    name: str | None,
    region: str | None,
    skip_service_registration: bool | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The body of create and update: one CreateMachineRequest, as JSON."""
    request = m.CreateMachineRequest(
        config=_model(m.MachineConfig, config),
        name=name,
        region=region,
        skip_service_registration=skip_service_registration,
        **extra,
    )
    return request.to_json()


def _model(model: type[_M], value: _M | Mapping[str, Any]) -> _M:
    return value if isinstance(value, model) else model.model_validate(value)


def parse(model: type[_M], payload: Any, operation: str) -> _M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        text = f"unexpected response body: {where}: {first['msg']}"
        raise FlyError(200, text, operation=operation) from None


def parse_list(model: type[_M], payload: Any, operation: str) -> list[_M]:
    if not isinstance(payload, list):
        text = f"expected a JSON array, got {type(payload).__name__}"
        raise FlyError(200, text, operation=operation)
    return [parse(model, item, operation) for item in payload]


def _unexpected(what: str, payload: Any, operation: str) -> FlyError:
    kind = "text that is not JSON" if isinstance(payload, RawText) else type(payload).__name__
    return FlyError(200, f"unexpected {what}: {kind}", operation=operation)


def _one_word(text: str) -> bool:
    """Whether ``text`` could be a token (a JWT): one word of printable ASCII, no markup."""
    word = text.strip()
    return bool(word) and word.isascii() and word.isprintable() and not set(" <>") & set(word)


class Operations:
    """Every operation; a subclass provides ``_send`` and the attributes declared here."""

    org_slug: str
    _clock: Clock
    _sleep: Sleep
    _secrets: tuple[str, ...] = ()  # scrubbed from any text of an answer put in an error

    async def _send(self, call: Call) -> Any:
        raise NotImplementedError

    async def _machine(
        self, op: str, method: str, app: str, machine_id: str, suffix: str = "", **kw: Any
    ) -> Any:
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}{suffix}"
        return await self._send(Call(op, method, path, app, machine_id, **kw))

    async def _volume(
        self, op: str, method: str, app: str, volume_id: str, suffix: str = "", **kw: Any
    ) -> Any:
        path = f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}{suffix}"
        return await self._send(Call(op, method, path, app, volume_id, **kw))

    # -- apps -------------------------------------------------------------------------------

    async def list_apps(self, org_slug: str | None = None) -> m.AppList:
        org = org_slug or self.org_slug
        call = Call("list_apps", "GET", "/v1/apps", params={"org_slug": org}, limit=org)
        return parse(m.AppList, await self._send(call), "list_apps")

    async def create_app(
        self,
        app_name: str,
        org_slug: str | None = None,
        *,
        network: str | None = None,
        enable_subdomains: bool | None = None,
    ) -> m.App:
        """Create an app. Sends ``app_name`` (seed) and ``name`` (real API) both."""
        org = org_slug or self.org_slug
        request = m.CreateAppRequest(
            app_name=app_name, org_slug=org, network=network, enable_subdomains=enable_subdomains
        )
        body = {**request.to_json(), "name": app_name}
        call = Call("create_app", "POST", "/v1/apps", app_name, body=body, limit=org)
        payload = await self._send(call)
        if isinstance(payload, dict):
            return parse(m.App, payload, "create_app")
        # The real API answers 201 with no body.
        return m.App(name=app_name, organization=m.Organization(slug=org))

    async def get_app(self, app: str) -> m.App:
        payload = await self._send(Call("get_app", "GET", f"/v1/apps/{_seg(app)}", app))
        return parse(m.App, payload, "get_app")

    async def delete_app(self, app: str, *, force: bool = False) -> None:
        path = f"/v1/apps/{_seg(app)}"
        # Fly's 100 deletions a minute are not per app (each is deleted once): one bucket.
        query = _force_query(force)
        await self._send(Call("delete_app", "DELETE", path, app, params=query, limit=self.org_slug))

    # -- machines ---------------------------------------------------------------------------

    async def list_machines(self, app: str) -> list[m.Machine]:
        call = Call("list_machines", "GET", f"/v1/apps/{_seg(app)}/machines", app)
        return parse_list(m.Machine, await self._send(call), "list_machines")

    async def create_machine(
        self,
        app: str,
        config: m.MachineConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_service_registration: bool | None = None,
        **extra: Any,
    ) -> m.Machine:
        """Create a machine; ``extra`` goes into the body as is (real-API fields)."""
        body = _machine_body(config, name, region, skip_service_registration, extra)
        path = f"/v1/apps/{_seg(app)}/machines"
        call = Call("create_machine", "POST", path, app, body=body)
        return parse(m.Machine, await self._send(call), "create_machine")

    async def get_machine(self, app: str, machine_id: str) -> m.Machine:
        payload = await self._machine("get_machine", "GET", app, machine_id)
        return parse(m.Machine, payload, "get_machine")

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        config: m.MachineConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_service_registration: bool | None = None,
        lease_nonce: str | None = None,
        **extra: Any,
    ) -> m.Machine:
        body = _machine_body(config, name, region, skip_service_registration, extra)
        payload = await self._machine(
            "update_machine", "POST", app, machine_id, body=body, headers=_nonce(lease_nonce)
        )
        return parse(m.Machine, payload, "update_machine")

    async def delete_machine(
        self, app: str, machine_id: str, *, force: bool = False, lease_nonce: str | None = None
    ) -> None:
        """Destroy a machine; ``force`` (``?force=true``) kills a running one first."""
        await self._machine(
            "delete_machine",
            "DELETE",
            app,
            machine_id,
            params=_force_query(force),
            headers=_nonce(lease_nonce),
        )

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> m.StartResult:
        payload = await self._machine(
            "start_machine", "POST", app, machine_id, "/start", headers=_nonce(lease_nonce)
        )
        # The seed answers with no body, the real API with {"previous_state": ...}.
        body = payload if isinstance(payload, dict) else {}
        if body.get("status") == "error":
            # A 200 that refuses the start: fly-go's MachineStartResponse has `status` and
            # `message`, and flyctl takes status "error" for a start that failed
            # (docs/fly-api-notes.md). A refusal as a 412's is (a machine that cannot be
            # started from where it is), its message scrubbed as an error body's is.
            said = error_from_response(
                200,
                json.dumps(body).encode(),
                {},
                operation="start_machine",
                secrets=self._secrets,
            )
            raise Conflict(200, said.message, code=said.code, operation="start_machine")
        return parse(m.StartResult, body, "start_machine")

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
        lease_nonce: str | None = None,
    ) -> None:
        """Stop; the timeout goes as a duration string ("30s"), which both APIs accept."""
        timeout = duration_string(timeout_s) if timeout_s is not None else None
        body = m.StopRequest(signal=signal, timeout=timeout).to_json()
        await self._machine(
            "stop_machine",
            "POST",
            app,
            machine_id,
            "/stop",
            body=body if body else NO_BODY,
            headers=_nonce(lease_nonce),
        )

    async def suspend_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._machine(
            "suspend_machine", "POST", app, machine_id, "/suspend", headers=_nonce(lease_nonce)
        )

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult:
        """Wait up to ``timeout_s`` (any length) for the machine to reach ``state``.

        The real API accepts at most 60 s per call, so a longer wait is several calls, each
        answered 408 while the machine is not there yet. 404 counts as reaching "destroyed".
        The real API insists on a version when waiting for "stopped"; without
        ``instance_id`` the machine's current one is read first, inside ``timeout_s``.
        Raises WaitTimeout when our own deadline passes; ValueError, before any request,
        when ``state`` names no state (``""``, ``[]``: the API answers 400 to it).
        """
        deadline = self._clock() + timeout_s  # before any request: the read counts too
        given = state.split(",") if isinstance(state, str) else list(state)
        wanted = [s.strip() for part in given for s in part.split(",") if s.strip()]
        if not wanted:
            raise ValueError(f"state: name at least one state to wait for, got {state!r}")
        states = ",".join(wanted)
        try:
            if instance_id is None and "stopped" in wanted:
                instance_id = (await self.get_machine(app, machine_id)).instance_id
            payload = await self._wait_calls(
                app, machine_id, states, timeout_s, deadline, instance_id
            )
        except NotFound:
            if "destroyed" in wanted:
                return m.WaitResult(ok=True, state="destroyed")
            raise
        # The seed answers with no body; the real API's body may leave out the state.
        body = payload if isinstance(payload, dict) else {}
        result = parse(m.WaitResult, body, "wait_for_machine_state")
        if result.state is None:
            result.state = wanted[0]
        return result

    wait = wait_for_machine_state

    async def _wait_calls(
        self,
        app: str,
        machine_id: str,
        states: str,
        timeout_s: float,
        deadline: float,
        instance_id: str | None,
    ) -> Any:
        """/wait calls of at most MAX_WAIT_CALL_S until one succeeds or ``deadline`` passes
        (``timeout_s`` is for the message); the decoded body."""
        while True:
            per_call = max(1, min(MAX_WAIT_CALL_S, math.ceil(deadline - self._clock())))
            params: dict[str, str | int] = {"state": states, "timeout": per_call}
            if instance_id:
                params["instance_id"] = instance_id
            t0 = self._clock()
            try:
                return await self._machine(
                    "wait_for_machine_state",
                    "GET",
                    app,
                    machine_id,
                    "/wait",
                    params=params,
                    hold_s=per_call,  # the server holds it that long
                    deadline=deadline,
                    hold_param="timeout",
                )
            except WaitTimeout as exc:
                now = self._clock()
                if now < deadline and now - t0 < per_call / 2:
                    # A 408 that came back early must not turn this loop into a busy spin.
                    await self._sleep(min(1.0, deadline - now))
                    now = self._clock()
                if now >= deadline:
                    raise WaitTimeout(
                        408,
                        f"machine {machine_id} did not reach {states} within {timeout_s:g}s "
                        f"({exc.message})",
                        exc.request_id,
                        operation="wait_for_machine_state",
                    ) from None

    async def cordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._machine(
            "cordon_machine", "POST", app, machine_id, "/cordon", headers=_nonce(lease_nonce)
        )

    async def uncordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._machine(
            "uncordon_machine", "POST", app, machine_id, "/uncordon", headers=_nonce(lease_nonce)
        )

    # -- leases (real API; not in the seed) -------------------------------------------------

    async def get_machine_lease(self, app: str, machine_id: str) -> m.Lease:
        """The machine's current lease; NotFound when nobody holds one."""
        payload = await self._machine("get_machine_lease", "GET", app, machine_id, "/lease")
        return _lease(payload, "get_machine_lease")

    async def acquire_machine_lease(
        self, app: str, machine_id: str, *, ttl_s: int = 30, description: str | None = None
    ) -> m.Lease:
        """Take the machine's lease for ``ttl_s`` seconds; LeaseHeld (409) when another
        holder has it. Keep the nonce: every change of the machine must carry it."""
        body = m.CreateLeaseRequest(ttl=ttl_s, description=description).to_json()
        op = "acquire_machine_lease"
        payload = await self._machine(op, "POST", app, machine_id, "/lease", body=body)
        return _lease(payload, op)

    async def refresh_machine_lease(
        self,
        app: str,
        machine_id: str,
        nonce: str,
        *,
        ttl_s: int = 30,
        description: str | None = None,
    ) -> m.Lease:
        """Extend our own lease (``nonce``) to ``ttl_s`` seconds from now. ``description``
        names the holder of a lease the call may make instead (one that lapsed, as the
        emulator renews it), as an acquire's does."""
        body = m.CreateLeaseRequest(ttl=ttl_s, description=description).to_json()
        op = "refresh_machine_lease"
        payload = await self._machine(
            op,
            "POST",
            app,
            machine_id,
            "/lease",
            body=body,
            headers=_nonce(nonce),
            action="acquire_machine_lease",  # one API action: Fly limits them together
        )
        return _lease(payload, op)

    async def release_machine_lease(self, app: str, machine_id: str, nonce: str) -> None:
        """Give our lease back; NotFound when there is none (it expired, or was released)."""
        await self._machine(
            "release_machine_lease", "DELETE", app, machine_id, "/lease", headers=_nonce(nonce)
        )

    # -- metadata ---------------------------------------------------------------------------

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str:
        """One metadata value; reads the seed's bare string and the real ``{"value": ...}``."""
        op = "get_machine_metadata"
        payload = await self._machine(op, "GET", app, machine_id, _metadata_suffix(key))
        if isinstance(payload, dict) and isinstance(payload.get("value"), str):
            return str(payload["value"])
        if isinstance(payload, str) and not isinstance(payload, RawText):
            return payload  # the seed's bare JSON string (text that is not JSON is no value)
        raise _unexpected("metadata body", payload, op)

    async def set_machine_metadata(
        self, app: str, machine_id: str, key: str, value: str, *, lease_nonce: str | None = None
    ) -> None:
        # The real API needs {"value": ...}; the emulator accepts that and the seed's bare
        # string alike.
        suffix = _metadata_suffix(key)
        body = {"value": value}
        await self._machine(
            "set_machine_metadata",
            "POST",
            app,
            machine_id,
            suffix,
            body=body,
            headers=_nonce(lease_nonce),
        )

    async def delete_machine_metadata(
        self, app: str, machine_id: str, key: str, *, lease_nonce: str | None = None
    ) -> None:
        suffix = _metadata_suffix(key)
        await self._machine(
            "delete_machine_metadata",
            "DELETE",
            app,
            machine_id,
            suffix,
            headers=_nonce(lease_nonce),
        )

    # -- volumes ----------------------------------------------------------------------------

    async def list_volumes(self, app: str) -> list[m.Volume]:
        call = Call("list_volumes", "GET", f"/v1/apps/{_seg(app)}/volumes", app)
        return parse_list(m.Volume, await self._send(call), "list_volumes")

    async def create_volume(
        self,
        app: str,
        name: str,
        size_gb: int,
        region: str,
        *,
        encrypted: bool | None = None,
        unique_zones_only: bool | None = None,
        snapshot_id: str | None = None,
        snapshot_retention: int | None = None,
        **extra: Any,
    ) -> m.Volume:
        request = m.CreateVolumeRequest(
            name=name,
            size_gb=size_gb,
            region=region,
            encrypted=encrypted,
            unique_zones_only=unique_zones_only,
            snapshot_id=snapshot_id,
            snapshot_retention=snapshot_retention,
            **extra,
        )
        path = f"/v1/apps/{_seg(app)}/volumes"
        call = Call("create_volume", "POST", path, app, body=request.to_json())
        return parse(m.Volume, await self._send(call), "create_volume")

    async def get_volume(self, app: str, volume_id: str) -> m.Volume:
        payload = await self._volume("get_volume", "GET", app, volume_id)
        return parse(m.Volume, payload, "get_volume")

    async def update_volume(
        self, app: str, volume_id: str, *, snapshot_retention: int | None = None, **extra: Any
    ) -> m.Volume:
        body = m.UpdateVolumeRequest(snapshot_retention=snapshot_retention, **extra).to_json()
        payload = await self._volume("update_volume", "PUT", app, volume_id, body=body)
        return parse(m.Volume, payload, "update_volume")

    async def delete_volume(self, app: str, volume_id: str) -> m.Volume | None:
        payload = await self._volume("delete_volume", "DELETE", app, volume_id)
        return parse(m.Volume, payload, "delete_volume") if isinstance(payload, dict) else None

    async def extend_volume(self, app: str, volume_id: str, size_gb: int) -> m.Volume:
        """Grow a volume. The seed answers with the Volume, the real API with
        ``{"volume": ..., "needs_restart": ...}``; both come back as the Volume."""
        body = m.ExtendVolumeRequest(size_gb=size_gb).to_json()
        payload = await self._volume("extend_volume", "PUT", app, volume_id, "/extend", body=body)
        if isinstance(payload, dict) and isinstance(payload.get("volume"), dict):
            wrapped = {**payload["volume"], "needs_restart": payload.get("needs_restart")}
            return parse(m.Volume, wrapped, "extend_volume")
        return parse(m.Volume, payload, "extend_volume")

    async def list_volume_snapshots(self, app: str, volume_id: str) -> list[m.VolumeSnapshot]:
        op = "list_volume_snapshots"
        payload = await self._volume(op, "GET", app, volume_id, "/snapshots")
        return parse_list(m.VolumeSnapshot, payload, op)

    async def create_volume_snapshot(self, app: str, volume_id: str) -> m.VolumeSnapshot | None:
        """Start a snapshot. Both APIs answer 200 with no body; a body, if any, is parsed."""
        op = "create_volume_snapshot"
        payload = await self._volume(op, "POST", app, volume_id, "/snapshots")
        return parse(m.VolumeSnapshot, payload, op) if isinstance(payload, dict) else None

    # -- tokens -----------------------------------------------------------------------------

    async def get_oidc_token(self, aud: str | None = None) -> str:
        """An OIDC token (a JWT). It is a secret too: it is returned, never logged."""
        body = m.OidcTokenRequest(aud=aud).to_json()
        payload = await self._send(Call("get_oidc_token", "POST", "/v1/tokens/oidc", body=body))
        if isinstance(payload, str) and _one_word(payload):
            return str(payload).strip()  # the JWT, as plain text or as a JSON string
        if isinstance(payload, dict) and isinstance(payload.get("token"), str):
            return str(payload["token"])
        raise _unexpected("OIDC body", payload, "get_oidc_token")

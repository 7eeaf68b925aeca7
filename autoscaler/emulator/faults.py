"""Faults switched at run time: ``GET``/``POST /_emulator/faults`` and a client for them.

The body of a POST is any subset of ``FaultSettings``' fields; a field set to ``null``
goes back to its default (off). The change applies at once: the next API call sees the
new rates, and a machine added to (or removed from) ``hung`` or ``host_unreachable``
hangs (or recovers) immediately. Both routes need the emulator's token, like the API,
and are never subject to the faults or rate limits they control (an outage of
``error_rate: 1.0`` must be switchable off).

In a test with the emulator in the same process, ``Emulator.set_faults(...)`` does the
same; for an emulator in another process::

    async with RemoteFaults(url, token) as faults:
        await faults.set(error_rate=1.0)      # outage on
        ...
        await faults.set(error_rate=None)     # and off
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from autoscaler.config import FaultSettings, format_errors, holds_number
from autoscaler.emulator.middleware import read_body, world_of
from autoscaler.emulator.validate import BadRequest

PATH = "/_emulator/faults"  # under middleware.CONTROL_PREFIX: exempt from injected faults


def _is_nan(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, float | str):
        return False
    try:
        return math.isnan(float(value))
    except ValueError:
        return False


def nan_problems(values: Mapping[str, object], names: Mapping[str, str] | None = None) -> list[str]:
    """A NaN given for a fault (``--hang-rate nan``, ``NaN`` in JSON) fails every bound and
    was refused as out of range ("less than or equal to 1"): it is said to be no number.
    ``names`` names a key as the user gave it (a flag), else the key is named."""
    names = names or {}
    return [
        f"{names.get(key, key)}: expected a number, got nan (not a number)"
        for key, value in values.items()
        if _is_nan(value)
    ]


def changed(current: FaultSettings, changes: Mapping[str, Any]) -> FaultSettings:
    """``current`` with ``changes`` applied (None resets a field); BadRequest names the field."""
    if not isinstance(changes, Mapping):
        raise BadRequest("body: expected a JSON object of fault settings")
    fields = FaultSettings.model_fields
    unknown = sorted(k for k in changes if k not in fields)
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown fault (known: {', '.join(sorted(fields))})")
    not_numbers = nan_problems(changes)
    if not_numbers:
        raise BadRequest("; ".join(not_numbers))
    merged = current.model_dump()
    for key, value in changes.items():
        if value is None:
            merged[key] = fields[key].get_default(call_default_factory=True)
        else:
            merged[key] = value
    # A boolean is no number (the settings pass true and false on as text, which they are
    # in YAML: yes, no, on, off), and is said to be one.
    booleans = {
        key: value
        for key, value in changes.items()
        if isinstance(value, bool) and holds_number(fields[key].annotation)
    }
    try:
        return FaultSettings.model_validate(merged)
    except ValidationError as exc:
        # In the house style of the settings' errors (config.format_errors: lowercase,
        # the key, what was expected, what came), not pydantic's own capitalised lines.
        problems: list[str] = [
            f"{key}: expected a number, got {str(value).lower()} (a JSON boolean: give a"
            " number, or null for its default, off)"
            for key, value in booleans.items()
        ]
        for line in format_errors(exc):
            if line.partition(":")[0] not in booleans and line not in problems:
                problems.append(line)
        raise BadRequest("; ".join(problems)) from None


def as_json(faults: FaultSettings) -> dict[str, Any]:
    return faults.model_dump(mode="json")


# --- the routes ------------------------------------------------------------------------


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(as_json(world_of(request).lifecycle.faults))


async def _post_faults(request: web.Request) -> web.Response:
    world = world_of(request)
    world.set_faults(changed(world.lifecycle.faults, await read_body(request)))
    return web.json_response(as_json(world.lifecycle.faults))


def add_routes(app: web.Application) -> None:
    """Mount the routes on the API's application (before it starts)."""
    app.router.add_get(PATH, _get_faults, name="emulatorGetFaults")
    app.router.add_post(PATH, _post_faults, name="emulatorSetFaults")


# --- the client --------------------------------------------------------------------------


class FaultsError(Exception):
    """The emulator refused a fault change (the text is its error message)."""


class RemoteFaults:
    """Switch the faults of an emulator running elsewhere (its URL and token)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 10.0) -> None:
        self._url = url.rstrip("/") + PATH
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"RemoteFaults({self._url!r})"

    async def __aenter__(self) -> RemoteFaults:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use RemoteFaults in `async with`")
        return self._session

    async def get(self) -> FaultSettings:
        async with self._client().get(self._url) as r:
            return await self._answer(r)

    async def set(self, **changes: Any) -> FaultSettings:
        """Set the named faults (None resets one); the others stay as they are."""
        async with self._client().post(self._url, json=changes) as r:
            return await self._answer(r)

    async def clear(self) -> FaultSettings:
        """Every fault off."""
        return await self.set(**dict.fromkeys(FaultSettings.model_fields))

    @staticmethod
    async def _answer(r: aiohttp.ClientResponse) -> FaultSettings:
        body = await r.json(content_type=None)
        if r.status != 200:
            message = body.get("error") if isinstance(body, dict) else body
            raise FaultsError(f"{r.status}: {message}")
        return FaultSettings.model_validate(body)

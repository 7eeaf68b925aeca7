"""`autoscaler status`: fetch the admin server's ``/status`` and print it as a table.

The admin address and token come from the settings (file, then ``AUTOSCALER_ADMIN__*``
variables), so the command reads the same configuration as the server it asks; ``--admin``
overrides the address. The token is only ever sent in the Authorization header.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from autoscaler.config import ConfigError, load_settings, parse_host_port

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2

# A server bound to every address is reached on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


class StatusError(Exception):
    """The admin server could not be asked, or refused; the message says which."""


def admin_url(listen: str) -> str:
    """The base URL for an ``admin.listen`` value or a ``--admin`` argument."""
    text = listen.strip().rstrip("/")
    if text.startswith(("http://", "https://")):
        return text
    address = parse_host_port(text)
    host = _WILDCARDS.get(address.host, address.host)
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


def fetch_status(base_url: str, token: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    url = base_url.rstrip("/") + "/status"
    if not url.startswith(("http://", "https://")):
        raise StatusError(f"expected an http:// or https:// admin URL, got {base_url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 - scheme checked above
            body = resp.read()
    except urllib.error.HTTPError as exc:
        hint = " (set admin.token or AUTOSCALER_ADMIN__TOKEN)" if exc.code == 401 else ""
        raise StatusError(f"{url}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"{url}: cannot connect: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(f"{url}: expected JSON, got {body[:80]!r}") from None
    if not isinstance(doc, dict):
        raise StatusError(f"{url}: expected a JSON object, got {type(doc).__name__}")
    return doc


def ago(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    if age_s < 60:
        return f"{age_s:.1f}s ago"
    minutes, seconds = divmod(int(age_s), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s ago"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m ago"


def _yes(value: object) -> str:
    return "yes" if value else "no"


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render(doc: dict[str, Any]) -> list[str]:
    """The status document as lines of text: one block per app, one row per machine."""
    ready = "ready" if doc.get("ready") else "NOT READY"
    if doc.get("control_loop"):
        loop = f"control loop ticked {ago(doc.get('last_tick_age_s'))}"
    else:
        loop = "no control loop (static apps only)"
    lines = [f"autoscaler {doc.get('version', '?')}: {ready}, {loop}"]
    apps = doc.get("apps") or []
    if not apps:
        lines.append("no scaled apps")
    for app in apps:
        lines.append("")
        lines.append(
            f"{app['app']}: desired {app['desired']}, started {app['started']}, "
            f"panic {_yes(app['panic'])}, decided {ago(app.get('last_decision_age_s'))}"
        )
        if app.get("last_reason"):
            lines.append(f"  why: {app['last_reason']}")
        if app.get("last_error"):
            lines.append(f"  last error: {app['last_error']}")
        machines = app.get("machines") or []
        if not machines:
            lines.append("  (no machines)")
            continue
        rows = [["MACHINE", "STATE", "CORDONED", "IN FLIGHT", "LAST USED"]]
        for m in machines:
            rows.append(
                [
                    str(m["id"]),
                    str(m["state"]),
                    _yes(m["cordoned"]),
                    str(m["in_flight"]),
                    ago(m.get("last_used_age_s")),
                ]
            )
        lines += _table(rows, indent="  ")
    ejected = doc.get("ejected") or []
    if ejected:
        lines.append("")
        lines.append("machines out of rotation (the proxy's passive health):")
        rows = [["APP", "MACHINE", "REASON", "EJECTIONS", "BACK IN"]]
        for e in ejected:
            left = e.get("remaining_s")
            if e.get("probing"):
                back = "probing"
            elif left is None:
                back = "when its checks pass"
            else:
                back = f"{left:g}s"
            rows.append(
                [str(e["app"]), str(e["machine"]), str(e["reason"]), str(e["ejections"]), back]
            )
        lines += _table(rows, indent="  ")
    return lines


def run_status(
    admin: str | None,
    config: str | None,
    *,
    as_json: bool = False,
    timeout_s: float = 5.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        settings, _ = load_settings(config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=err)
        return EXIT_CONFIG
    token = settings.admin.token.get_secret_value() if settings.admin.token else None
    try:
        url = admin_url(admin or settings.admin.listen)
        doc = fetch_status(url, token, timeout_s)
    except (StatusError, ValueError) as exc:
        print(f"autoscaler status: {exc}", file=err)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        for line in render(doc):
            print(line, file=out)
    return EXIT_OK

"""``--state-file``: apps, machines and volumes survive a restart of the emulator.

Writes are atomic (a temporary file in the same directory, fsync, rename), so a crash
mid-write leaves the previous state intact. Saves are coalesced: a burst of changes is one
write. Processes cannot survive the emulator: a machine that ran comes back stopped, a
suspended one suspended without its snapshot (its next start is the cold boot a resume
falls back to), created and failed ones as they were; destroys that were accepted are
not brought back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autoscaler.aio import cancel_and_wait
from autoscaler.emulator.model import App
from autoscaler.logs import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
_COALESCE_S = 0.05


def dump(apps: dict[str, App]) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "apps": [a.to_state() for a in apps.values()]}


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateFileError(Exception):
    pass


def a_directory(path: Path) -> str:
    """What is said of a state file that names a directory (``--state-file /tmp``), which
    otherwise came out as a bare ``[Errno 21] Is a directory``."""
    return f"{path} is a directory; name a file to keep the state in (say {path / 'emulator.json'})"


def load(path: Path) -> dict[str, App]:
    """The saved apps, every machine stopped; an absent file is an empty world."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise StateFileError(f"emulator.state_file: {a_directory(path)}") from None
    except (OSError, ValueError) as exc:
        raise StateFileError(f"{path}: cannot read the emulator state: {exc}") from None
    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
        raise StateFileError(f"{path}: not an emulator state file (version {FORMAT_VERSION})")
    apps: dict[str, App] = {}
    try:
        for item in raw.get("apps", []):
            app = App.from_state(item)
            for m in app.machines.values():
                # No process survives the emulator: created, failed and suspended stay
                # what they were (a suspended machine's snapshot is gone, so its next
                # start is the cold boot a resume falls back to, docs/emulator.md).
                if m.state not in ("created", "failed", "suspended"):
                    m.state = "stopped"
            apps[app.name] = app
    except KeyError as exc:
        raise StateFileError(f"{path}: damaged emulator state: missing {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        # A list where an object goes, or the reverse (a file edited by hand): not "missing".
        raise StateFileError(
            f"{path}: damaged emulator state: an entry of the wrong shape ({exc})"
        ) from None
    return apps


class Saver:
    """Coalesces change notifications into atomic writes."""

    def __init__(self, path: Path, apps: dict[str, App]) -> None:
        self.path = path
        self._apps = apps
        self._task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._save_soon())

    def save_now(self) -> None:
        try:
            write_atomic(self.path, dump(self._apps))
        except OSError as exc:
            why = exc.strerror or str(exc)
            if not self.path.parent.is_dir():
                # Not made: its directories were made for a mistyped path, and the state
                # went somewhere nobody would look for it, unsaid.
                why = f"no directory {self.path.parent} (it is not created: make it first)"
            raise StateFileError(f"{self.path}: cannot write the emulator state: {why}") from None

    def _save_or_say(self) -> None:
        """Save; a state that cannot be written is an error line, not the emulator's end."""
        try:
            self.save_now()
        except StateFileError as exc:
            log.error("emulator_state_not_saved", error=str(exc))

    async def _save_soon(self) -> None:
        await asyncio.sleep(_COALESCE_S)
        self._save_or_say()

    async def close(self) -> None:
        """Call off the save to come and save now (also when the close is cancelled: the
        emulator's close cut short)."""
        try:
            if self._task is not None:
                # Not awaited under suppress(CancelledError): that also swallowed a
                # cancellation of this close in that turn (a second SIGTERM).
                await cancel_and_wait([self._task])
        finally:
            self._save_or_say()

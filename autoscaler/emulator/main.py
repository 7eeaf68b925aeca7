"""`autoscaler emulator`: run the emulator on its own until Ctrl-C or SIGTERM.

It prints its URL, and the token it accepts when it made that one up (one given to it,
by ``--token``, a variable or the file, is the user's: the line says where it came from,
not what it is), so other tools can be pointed at it:

    FLY_API_TOKEN=<token> AUTOSCALER_FLY__API_URL=http://127.0.0.1:4280 autoscaler run
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from autoscaler.config import (
    EMULATOR_TOKEN_ENV,
    ConfigError,
    EmulatorSettings,
    app_name_problem,
    load_settings,
)
from autoscaler.emulator.faults import nan_problems
from autoscaler.emulator.persist import StateFileError, a_directory
from autoscaler.emulator.server import Emulator

# The fault flags, by the key of `emulator.faults` each sets (cli._emulator_args).
FAULT_FLAGS = {
    "latency_s": "--latency",
    "error_rate": "--error-rate",
    "rate_limit_rate": "--rate-limit-rate",
    "boot_failure_rate": "--boot-failure-rate",
    "crash_after_s": "--crash-after",
    "resume_cold_rate": "--resume-cold-rate",
    "hang_rate": "--hang-rate",
    "answer_lost_rate": "--answer-lost-rate",
}
# Every flag of `autoscaler emulator` that sets a key, by that key path (load_settings
# says a problem of the value it gave by the flag, as typed).
FLAGS = {
    "emulator.listen": "--listen",
    "emulator.token": "--token",
    "emulator.state_file": "--state-file",
    "emulator.rate_limits": "--no-rate-limits",
    "emulator.profile": "--profile",
    "emulator.apps": "--app",
    "emulator.ipv6": "--ipv6",
    **{f"emulator.faults.{key}": flag for key, flag in FAULT_FLAGS.items()},
}


def settings_from(
    config: str | None,
    *,
    environ: Mapping[str, str],
    listen: str | None = None,
    token: str | None = None,
    state_file: str | None = None,
    rate_limits: bool | None = None,
    profile: str | None = None,
    ipv6: bool | None = None,
    apps: list[str] | None = None,
    faults: Mapping[str, float | None] | None = None,
) -> EmulatorSettings:
    """The file's ``emulator`` section (EMULATOR_TOKEN included, see config.py), flags on
    top; a flag's mistake is said naming the flag (``--latency``), not its key."""
    section: dict[str, Any] = {}
    if listen:
        section["listen"] = listen
    if token:
        section["token"] = token
    if state_file:
        if Path(state_file).is_dir():  # said before anything is loaded or written
            raise ConfigError([f"--state-file: {a_directory(Path(state_file))}"])
        section["state_file"] = state_file
    if rate_limits is not None:
        section["rate_limits"] = rate_limits
    if profile:
        section["profile"] = profile
    if ipv6 is not None:
        section["ipv6"] = ipv6
    set_faults = {k: v for k, v in (faults or {}).items() if v is not None}
    not_numbers = nan_problems(set_faults, FAULT_FLAGS)
    if not_numbers:
        raise ConfigError(not_numbers)
    if set_faults:
        section["faults"] = set_faults
    if apps:
        section["apps"] = [_app_flag(a) for a in apps]
    # Alone, the emulator is the one server of its process: to the file it is what
    # `autoscaler run` would call, an API elsewhere, not an embedded emulator beside the
    # file's proxy and admin server (config.py refuses two servers of one process on one
    # address: proxy.listen or admin.listen would have kept --listen off theirs).
    elsewhere = {"api_url": "http://127.0.0.1"}  # (never called: only .emulator is used)
    settings, _ = load_settings(
        config, env=environ, overrides={"emulator": section, "fly": elsewhere}, flags=FLAGS
    )
    return settings.emulator


_REGIONS_RE = re.compile(r"^[a-z]{3}(,[a-z]{3})*$")


def _app_flag(text: str) -> dict[str, Any]:
    """``--app demo=2``, ``--app demo=2:autoscaler/demo-app`` or ``--app demo=4@iad,cdg``
    (machines spread over the regions round-robin; the image may carry a tag or a digest)."""
    name, eq, rest = text.partition("=")
    head, at, tail = rest.rpartition("@")
    regions: list[str] = []
    if at and _REGIONS_RE.match(tail):
        rest, regions = head, tail.split(",")
    elif at and not tail.startswith("sha256:"):  # an "@" that is no image digest
        raise ConfigError(
            [f"--app {text}: expected regions like iad,cdg after @ (three lowercase letters)"]
        )
    count, colon, image = rest.partition(":")
    if not (name and eq and count.isdigit() and count.isascii()):
        raise ConfigError([f"--app {text}: expected NAME=N[:IMAGE][@REGION,...], N a number"])
    if colon and not image:  # (taken as the demo image: a typo, or a variable unset)
        raise ConfigError([f"--app {text}: IMAGE: empty after ':' (leave out ':' for the demo)"])
    bad_name = app_name_problem(name)
    if bad_name:
        raise ConfigError([f"--app {text}: NAME: {bad_name}"])
    out: dict[str, Any] = {"name": name, "machines": int(count)}
    if image:
        out["image"] = image
    if regions:
        out["regions"] = regions
    return out


def token_source(flag: str | None, environ: Mapping[str, str]) -> str:
    """Where a token given to ``autoscaler emulator`` came from, highest precedence first
    (as config.py reads them): the flag, ``AUTOSCALER_EMULATOR__TOKEN``,
    ``EMULATOR_TOKEN``, else the config file."""
    if flag:
        return "the one given by --token"
    # AUTOSCALER_* variables are read whatever their case (pydantic-settings), the plain
    # one only as it is spelt (config.py).
    if any(n.upper() == "AUTOSCALER_EMULATOR__TOKEN" and v for n, v in environ.items()):
        return "the one given by $AUTOSCALER_EMULATOR__TOKEN"
    if environ.get(EMULATOR_TOKEN_ENV):
        return f"the one given by ${EMULATOR_TOKEN_ENV}"
    return "emulator.token of the config file"


async def serve(settings: EmulatorSettings, out: TextIO, token_from: str | None = None) -> None:
    """Run until SIGINT or SIGTERM. ``token_from`` says where a token of the settings came
    from (the line shows that, never a token the user gave)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Emulator(settings) as emu:
            print(f"Fly Machines API emulator listening on {emu.url}", file=out)
            if settings.token is None:  # made up here: printing it is the one way to know it
                print(f"token: {emu.token}", file=out)
            else:
                print(f"token: {token_from or 'as configured'} (not shown)", file=out)
            print(f"apps: {', '.join(sorted(emu.world.apps)) or '(none)'}", file=out)
            print(f"timing: {settings.profile}; faults: {emu.url}/_emulator/faults", file=out)
            print(
                f"point tools at it: AUTOSCALER_FLY__API_URL={emu.url} FLY_API_TOKEN=<token>",
                file=out,
            )
            out.flush()
            await stop.wait()
            print("shutting down: stopping every machine", file=out, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(
    settings: EmulatorSettings,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    token_from: str | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        asyncio.run(serve(settings, out, token_from))
    except StateFileError as exc:
        print(str(exc), file=err)
        return 2
    except ConfigError as exc:  # what only the start finds (a start-up app's image)
        for line in exc.problems:
            print(line, file=err)
        return 2
    except OSError as exc:
        print(f"emulator: cannot listen on {settings.listen}: {exc.strerror}", file=err)
        return 1
    return 0


def main(args: Any, environ: Mapping[str, str]) -> int:
    """Entry point of the CLI subcommand (``args`` from ``cli._emulator_args``)."""
    try:
        settings = settings_from(
            args.config,
            environ=environ,
            listen=args.listen,
            token=args.token,
            state_file=str(Path(args.state_file)) if args.state_file else None,
            rate_limits=False if args.no_rate_limits else None,
            profile=args.profile,
            ipv6=True if args.ipv6 else None,
            apps=args.app,
            faults={
                key: getattr(args, flag.removeprefix("--").replace("-", "_"))
                for key, flag in FAULT_FLAGS.items()
            },
        )
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    return run(settings, token_from=token_source(args.token, environ))

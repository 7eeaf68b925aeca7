"""A server told to listen on ``[::]`` takes IPv4 too (dual stack, as nginx's
``ipv6only=off``): asyncio's and uvloop's create_server set IPV6_V6ONLY on every AF_INET6
socket, so ``proxy.listen: "[::]:8080"`` or ``admin.listen: "[::]:9091"`` took IPv6 alone,
and Fly's proxy or ``docker run -p``, which come over IPv4, found nothing listening.

The wildcard is what is under test, and tests listen on loopback only: the servers run in a
child process in a network namespace of its own (``unshare --net``), whose only interface
is its loopback (tests/dual_stack_child.py). Skipped where no namespace can be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("dual_stack_child.py")


def _unshare() -> list[str] | None:
    """The command that runs a program in a new network namespace, if this machine lets us
    make one (root, or unprivileged user namespaces)."""
    tool = shutil.which("unshare")
    if tool is None:
        return None
    command = [tool, "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run([*command, "true"], capture_output=True, timeout=10)
    return command if probe.returncode == 0 else None


def test_the_proxy_and_the_admin_server_on_the_ipv6_wildcard_answer_over_ipv4_too() -> None:
    command = _unshare()
    if command is None:
        pytest.skip("no network namespace can be made here (unshare --net)")
    done = subprocess.run(
        [*command, sys.executable, str(CHILD)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CHILD.parent,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    expected = {
        f"{loop} {server} {family}": 200
        for loop in ("asyncio", "uvloop")
        for server in ("proxy", "admin")
        for family in ("ipv4", "ipv6")
    }
    assert results == expected

"""Asyncio helpers every layer may use: stopping tasks on Python 3.11, where a
cancellation can be dropped, probing a TCP port, and a listening socket on ``[::]`` that
takes IPv4 too (:func:`dual_stack_socket`, for our servers); and :func:`urlopen_direct`,
for the admin API's own clients.

On 3.11, ``asyncio.wait_for`` that is cancelled in the same turn of the loop as the
awaitable it waits for finishes returns that awaitable's result and drops the
cancellation (3.12 rebuilt it on ``asyncio.timeout``). redis-py sends every command under
``wait_for`` when its client has a socket timeout, so a task cancelled while it talked to
Redis often went on as if nothing had happened: on loopback, about two cancellations in
three of a task sending commands in a loop. Cluster mode's client no longer has one (it
bounds its commands with ``asyncio.timeout``: ``autoscaler.state.cluster.connect``), and
our own code waits with ``asyncio.timeout``; stops still cancel with
:func:`cancel_and_wait`, so that a task inside any other library's ``wait_for`` cannot
hang them (docs/reliability.md, "Stopping tasks that talk to Redis").
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.request
from collections.abc import Iterable
from typing import Any

AGAIN_S = 0.25
"""How long a cancelled task has to end before it is cancelled again."""


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], again_s: float = AGAIN_S) -> None:
    """Cancel ``tasks`` and return once each has ended, cancelling again every ``again_s``
    those still running. Their exceptions are retrieved, not raised: a task that failed
    before it was stopped logged what it had to."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def tcp_probe(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if ``host:port`` accepts a TCP connection within ``timeout_s`` (a machine's
    server is up); the connection is closed at once."""
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can drop a cancel
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen_direct(request: urllib.request.Request | str, timeout: float) -> Any:
    """``urllib.request.urlopen`` that never goes through ``HTTP_PROXY``/``http_proxy``:
    our admin endpoints are reached directly (urlopen would send the request, with its
    ``Authorization`` header, to whatever proxy the environment names)."""
    return _DIRECT.open(request, timeout=timeout)


def dual_stack(host: str) -> bool:
    """Whether a server told to listen on ``host`` takes both families: the IPv6 wildcard
    (``::``, written ``[::]:port``), as nginx's ``ipv6only=off`` does. asyncio's (and
    uvloop's) create_server sets IPV6_V6ONLY on every AF_INET6 socket, so ``[::]`` took
    IPv6 alone, and Fly's proxy or ``docker run -p``, which come over IPv4, found nothing
    listening. Any other host, a specific IPv6 address too, binds as create_server does."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_unspecified


def local_host(host: str) -> str:
    """The address a client on this host reaches a server listening on ``host`` at: a
    wildcard (``0.0.0.0``, the dual-stack ``::``, an empty host) at 127.0.0.1, any other
    host as it is. Not ``::1`` for ``::``: that server takes IPv4 too (:func:`dual_stack`),
    and a container may have no IPv6 loopback."""
    try:
        wildcard = not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host  # a name
    return "127.0.0.1" if wildcard else host


def dual_stack_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket | None:
    """A socket bound to ``host:port`` on both families when ``host`` is the IPv6
    wildcard (:func:`dual_stack`), for create_server's (or aiohttp's SockSite's) ``sock``;
    else None, and the caller binds host and port as before. Its options are
    create_server's: SO_REUSEADDR (a restart binds while old connections sit in
    TIME_WAIT), SO_REUSEPORT when asked; IPV6_V6ONLY off. The server listens on it."""
    if not dual_stack(host):
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind((host, port))
        except OSError as exc:  # said as create_server says it, with the address
            strerror = str(exc.strerror).lower()
            raise OSError(
                exc.errno, f"error while attempting to bind on address {(host, port)!r}: {strerror}"
            ) from None
    except BaseException:
        sock.close()
        raise
    return sock

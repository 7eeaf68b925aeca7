"""The built-in image ``autoscaler/demo-app``: a small aiohttp app to run as a machine.

    python -m autoscaler.emulator.demo_app --host 127.3.4.5 --port 8080

``/`` answers the machine id and a request counter (kept in memory, so it survives a
suspend and resets on a cold start), ``/work?ms=N`` answers after N ms (with ``&on=ID``,
only on machine ID, elsewhere at once: a request slow where it first went is quick where
it is sent again), ``/stream`` sends chunks, ``/events`` server-sent events, ``/ws``
echoes WebSocket messages, ``/healthz`` says ok. The boot delay
(``--boot-delay`` or ``DEMO_BOOT_DELAY_S``; the emulator sets ``DEMO_LISTEN_AT``, the time
it ends) passes before the port opens, like a cold start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import WSMsgType, web

MAX_WORK_MS = 600_000
COUNT = web.AppKey("count", list[int])


def _info(request: web.Request) -> dict[str, object]:
    return {
        "machine_id": os.environ.get("FLY_MACHINE_ID", "local"),
        "app": os.environ.get("FLY_APP_NAME", ""),
        "instance_id": os.environ.get("FLY_MACHINE_VERSION", ""),
        "pid": os.getpid(),
        "count": request.app[COUNT][0],
    }


@web.middleware
async def _count(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path != "/healthz":
        request.app[COUNT][0] += 1
    return await handler(request)


async def index(request: web.Request) -> web.Response:
    return web.json_response(_info(request))


async def work(request: web.Request) -> web.Response:
    raw = request.query.get("ms", "0")
    if not raw.isdigit() or int(raw) > MAX_WORK_MS:
        return web.json_response(
            {"error": f"ms: expected 0-{MAX_WORK_MS}, got {raw!r}"}, status=400
        )
    started = time.monotonic()
    on = request.query.get("on")
    if on is None or on == os.environ.get("FLY_MACHINE_ID", "local"):
        await asyncio.sleep(int(raw) / 1000)
    body = _info(request)
    body["slept_ms"] = round((time.monotonic() - started) * 1000)
    return web.json_response(body)


async def stream(request: web.Request) -> web.StreamResponse:
    return await _chunks(request, "text/plain", "chunk {}\n")


async def events(request: web.Request) -> web.StreamResponse:
    return await _chunks(request, "text/event-stream", "data: {}\n\n")


async def _chunks(request: web.Request, content_type: str, line: str) -> web.StreamResponse:
    """``n`` chunks (``line`` with its number), ``ms`` apart, in a chunked answer."""
    n, ms = request.query.get("n", "5"), request.query.get("ms", "50")
    if not (n.isdigit() and ms.isdigit()):
        return web.json_response({"error": "n and ms: expected integers"}, status=400)
    chunks = min(int(n), 10_000)
    delay = min(int(ms), 10_000) / 1000
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(chunks):
        await response.write(line.format(i).encode())
        await asyncio.sleep(delay)
    await response.write_eof()
    return response


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app() -> web.Application:
    app = web.Application(middlewares=[_count])
    app[COUNT] = [0]
    app.router.add_get("/", index)
    app.router.add_get("/work", work)
    app.router.add_get("/stream", stream)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", ws)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument(
        "--boot-delay", type=float, default=float(os.environ.get("DEMO_BOOT_DELAY_S", "0"))
    )
    # Set by the emulator: when (time.time()) the boot's port opens, so that this process's
    # own start-up (the interpreter, the imports) is part of the boot, not added to it.
    parser.add_argument(
        "--listen-at", type=float, default=float(os.environ.get("DEMO_LISTEN_AT", "0"))
    )
    args = parser.parse_args(argv)
    delay = args.listen_at - time.time() if args.listen_at else args.boot_delay
    if delay > 0:
        time.sleep(delay)  # nothing listens yet: this is the cold boot
    web.run_app(
        build_app(), host=args.host, port=args.port, print=None, shutdown_timeout=2.0,
        access_log=None,
    )  # fmt: skip


if __name__ == "__main__":
    main()

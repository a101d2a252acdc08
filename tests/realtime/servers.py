"""Real Hypercorn (trio worker) on a free port, started inside the test's nursery, and
the reference applications with test doubles that record how sessions end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from fabricai_trio.realtime.asgi import ASGIApp, PrefixDispatcher
from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.conformance import EchoHandler, ReferenceApps, build_socketio
from fabricai_trio.realtime.eio_app import EngineIOApp
from fabricai_trio.realtime.eio_session import CloseReason
from fabricai_trio.realtime.eio_socket import EngineIOSocket
from fabricai_trio.realtime.sio_server import DisconnectReason, SocketIOServer


class Service(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def shutdown(self) -> None: ...


class RecordingEcho(EchoHandler):
    """The conformance echo, remembering how each session ended."""

    def __init__(self) -> None:
        self.ended: dict[str, CloseReason] = {}
        self._changed = trio.Event()

    async def session_ended(self, socket: EngineIOSocket, reason: CloseReason) -> None:
        self.ended[socket.sid] = reason
        self._changed.set()
        self._changed = trio.Event()

    async def wait_ended(self, sid: str) -> CloseReason:
        """How session `sid` ended, once it has."""
        while sid not in self.ended:
            await self._changed.wait()
        return self.ended[sid]


class Disconnects:
    """Records the disconnect handler calls of a Socket.IO server's namespaces."""

    def __init__(self, server: SocketIOServer, namespaces: tuple[str, ...] = ("/", "/custom")):
        self.seen: list[tuple[str, DisconnectReason]] = []
        self._changed = trio.Event()
        for namespace in namespaces:
            server.on("disconnect", namespace=namespace)(self._record)

    async def _record(self, sid: str, reason: DisconnectReason) -> None:
        self.seen.append((sid, reason))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.seen) < count:
            await self._changed.wait()


def recording_reference_apps() -> tuple[ReferenceApps, RecordingEcho, Disconnects]:
    """`conformance.build_reference_apps()`, with the doubles above attached."""
    echo = RecordingEcho()
    engineio = EngineIOApp(echo, RealtimeConfig.reference(path="/engine.io/"))
    socketio = build_socketio(RealtimeConfig.reference(path="/socket.io/"))
    disconnects = Disconnects(socketio)
    app = PrefixDispatcher({"/engine.io/": engineio, "/socket.io/": socketio.asgi_app})
    return ReferenceApps(engineio, socketio, app), echo, disconnects


@asynccontextmanager
async def hypercorn_server(
    routes: dict[str, ASGIApp], *services: Service
) -> AsyncIterator[tuple[str, int]]:
    """Serve `routes` on 127.0.0.1:<free port>; yields (host, port)."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service.run)
        app: Any = PrefixDispatcher(routes)
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        url = urlsplit(binds[0])
        assert url.hostname is not None and url.port is not None
        try:
            yield url.hostname, url.port
        finally:
            with trio.move_on_after(3):
                for service in services:
                    await service.shutdown()
            stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + 3


async def raw_request(host: str, port: int, request: bytes) -> bytes:
    """Send one HTTP/1.1 request (Connection: close) and read the whole answer."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        return data


def get_request(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]

"""Protocol reference server: `python -m fabricai_trio.realtime.conformance --port 3000`.

Serves what the socket.io docs' v4 (Engine.IO) and v5 (Socket.IO) test suites expect,
with their reference configuration (pingInterval 300 ms, pingTimeout 200 ms, maxPayload
1,000,000, connectTimeout 1000 ms, CORS `*`), under Hypercorn's trio worker:

- `/engine.io/`: bare Engine.IO; every message goes back to its sender;
- `/socket.io/`: on connect to `/` or `/custom`, emits `auth` with the handshake auth
  payload (`{}` when none); answers `message` with `message-back` and the same
  arguments; acknowledges `message-with-ack` with its arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .asgi import PrefixDispatcher, Scope
from .config import RealtimeConfig
from .eio_app import EngineIOApp
from .eio_session import CloseReason
from .eio_socket import EngineIOSocket, SessionEnded
from .sio_server import SocketIOServer

logger = logging.getLogger("fabricai_trio.realtime")


class EchoHandler:
    """Bare Engine.IO: every message goes back to its sender."""

    async def run_session(self, socket: EngineIOSocket) -> None:
        """Echo until the session ends (then cancelled by the session nursery)."""
        while True:
            try:
                data = await socket.receive()
            except SessionEnded:
                return
            socket.send(data)

    async def session_ended(self, socket: EngineIOSocket, reason: CloseReason) -> None:
        """Nothing to clean up."""


def build_socketio(config: RealtimeConfig) -> SocketIOServer:
    """The Socket.IO reference application of the v5 test suite."""
    server = SocketIOServer(config)

    for namespace in ("/", "/custom"):

        async def on_connect(
            sid: str, auth: dict[str, Any] | None, scope: Scope, namespace: str = namespace
        ) -> None:
            await server.emit("auth", auth if auth is not None else {}, to=sid, namespace=namespace)

        server.on("connect", namespace=namespace)(on_connect)

    @server.on("message")
    async def message(sid: str, *args: Any) -> None:
        await server.emit("message-back", *args, to=sid)

    @server.on("message-with-ack")
    async def message_with_ack(sid: str, *args: Any) -> tuple[Any, ...]:
        return args

    return server


@dataclass(frozen=True)
class ReferenceApps:
    """The two reference servers and the ASGI app routing to them."""

    engineio: EngineIOApp
    socketio: SocketIOServer
    app: PrefixDispatcher


def build_reference_apps() -> ReferenceApps:
    engineio = EngineIOApp(EchoHandler(), RealtimeConfig.reference(path="/engine.io/"))
    socketio = build_socketio(RealtimeConfig.reference(path="/socket.io/"))
    app = PrefixDispatcher({"/engine.io/": engineio, "/socket.io/": socketio.asgi_app})
    return ReferenceApps(engineio, socketio, app)


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    apps: ReferenceApps | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference endpoints until `shutdown_trigger` returns (or cancelled).

    `task_status.started()` gets the bound addresses (port 0 picks a free one). On the
    trigger both servers send CLOSE to their clients before Hypercorn stops; when
    cancelled, the sessions are dropped.
    """
    apps = apps or build_reference_apps()
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 2.0
    config.accesslog = None

    async def stop() -> None:
        if shutdown_trigger is not None:
            await shutdown_trigger()
        else:
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(apps.engineio.shutdown)
            nursery.start_soon(apps.socketio.shutdown)

    async with trio.open_nursery() as nursery:
        await nursery.start(apps.engineio.run)
        await nursery.start(apps.socketio.run)
        await hypercorn_serve(
            cast(Any, apps.app), config, shutdown_trigger=stop, task_status=task_status
        )
        nursery.cancel_scope.cancel()


async def _wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (then the servers close their clients)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    trio.run(lambda: serve(host=args.host, port=args.port, shutdown_trigger=_wait_for_signal))


if __name__ == "__main__":
    main()

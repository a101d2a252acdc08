"""Running the app under Hypercorn's trio worker, with clean signal handling."""

from __future__ import annotations

import logging
import signal

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import FabricApp, create_app
from .settings import Settings

log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    return config


async def serve_app(settings: Settings, app: FabricApp | None = None) -> int:
    """Serve until SIGINT/SIGTERM (exit 0) or a fatal start-up error (exit 1)."""
    app = app or create_app(settings)
    exit_code = 0
    stop = trio.Event()

    async def wait_for_stop() -> None:
        nonlocal exit_code
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()

            async def on_fatal() -> None:
                nonlocal exit_code
                await app.fatal.wait()
                exit_code = 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_fatal)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_stop)
        async def shutdown_trigger() -> None:
            await stop.wait()
            await app.begin_shutdown()

        await serve(app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return exit_code

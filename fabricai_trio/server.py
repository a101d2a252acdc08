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
    """Serve until SIGINT/SIGTERM (drain, then exit 0) or a fatal start-up error (exit 1).

    The first signal starts the drain (`FabricApp.begin_shutdown`): readiness turns 503,
    new requests get 503 `draining`, generations in flight may finish for
    DRAIN_TIMEOUT_SECONDS; then Hypercorn closes idle connections and gives the others
    SHUTDOWN_GRACE_SECONDS. A second signal exits at once (exit 1): the server's nursery
    is cancelled, and only the decode step in flight is waited for.
    """
    app = app or create_app(settings)
    config = hypercorn_config(settings)
    exit_code = 0
    stop = trio.Event()

    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            nonlocal exit_code
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stop.is_set():
                        log.info("received %s: draining (again to exit at once)", name)
                        stop.set()
                    else:
                        log.warning("received %s again: exiting at once", name)
                        exit_code = 1
                        nursery.cancel_scope.cancel()

        async def watch_fatal() -> None:
            nonlocal exit_code
            await app.fatal.wait()
            exit_code = 1
            stop.set()

        async def shutdown_trigger() -> None:
            await stop.wait()
            if not app.fatal.is_set():
                await app.begin_shutdown()

        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_fatal)
        await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return exit_code

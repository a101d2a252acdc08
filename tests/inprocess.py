"""A real Hypercorn serving the app in this trio run, on a loopback socket, with a
test double engine: for tests of HTTP behaviour that needs no model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.server import limit_connections, refuse_raw
from fabricai_trio.settings import Settings

from .fakes import FakeEngine


@asynccontextmanager
async def served(
    engine_class: type[FakeEngine] = FakeEngine, *, step_seconds: float = 0.02,
    models: tuple[str, ...] = (), **overrides: Any,
) -> AsyncIterator[tuple[FabricApp, httpx.AsyncClient]]:
    """The app on a free port, ready (model 'loaded' and warmed), and a client for it.
    With `models`, one engine per name (the first is the default)."""
    settings = Settings(  # type: ignore[call-arg]
        **{"session_store": "memory", "max_concurrent_requests": 1, "max_queue_size": 1,
           "sse_keepalive_seconds": 0.05, **overrides},
    )
    if models:
        app = create_app(settings, engines={
            name: engine_class(settings, step_seconds=step_seconds) for name in models})
    else:
        app = create_app(settings, engine=engine_class(settings, step_seconds=step_seconds))
    async with (
        listening(app, settings) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        with trio.fail_after(10):
            await app.ready.wait()
        yield app, client


@asynccontextmanager
async def listening(app: FabricApp, settings: Settings | None = None
                    ) -> AsyncIterator[tuple[str, trio.Event]]:
    """`app` under Hypercorn on a free loopback port (no access log, 1 s graceful
    shutdown; with `settings`, also the connection limits and raw refusals the server
    sets up): its base URL and the event that stops it, set at the end of the block."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    if settings is not None:
        limit_connections(config, settings)
        refuse_raw(config, app)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        asgi: Any = app  # hypercorn's ASGIFramework type names its own scope TypedDicts
        binds = await nursery.start(partial(serve, asgi, config, shutdown_trigger=stop.wait))
        yield binds[0], stop
        stop.set()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll a condition the test cannot wait on as an event (a hang guard, not a budget)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)

"""The application: services, their lifespan, and the ASGI entry point.

Nursery tree (see docs/architecture.md):

    hypercorn serve
    └── lifespan nursery (QuartTrio `app.nursery`)
        └── services nursery (`run_services`): admission dispatcher, model load,
            Socket.IO timers, store health
    └── per connection (hypercorn) → per request (quart-trio): handler + body stream

The services nursery is cancelled in `after_serving`, so shutdown never waits on a
task nobody owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Quart
from quart_trio import QuartTrio

from . import auth, request_log
from .admission import Admission
from .api.error_handlers import register_error_handlers
from .api.openai.routes import blueprint as openai_blueprint
from .api.openapi import blueprint as openapi_blueprint
from .api.playground import ASSET_PREFIX, PAGE_PATH
from .api.playground import blueprint as playground_blueprint
from .api.routes import blueprint
from .api.sessions import blueprint as sessions_blueprint
from .api.socketio_events import create_socketio
from .api.stream_registry import StreamRegistry
from .engine.base import Engine, ModelLoadError
from .engine.loader import create_engine
from .generation import GenerationService
from .metrics import Metrics
from .metrics import blueprint as metrics_blueprint
from .realtime import SocketIOServer
from .request_log import RequestObserver
from .sessions import SessionStore, create_store
from .settings import Settings

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
CLEANUPS = "fabricai.cleanups"


@dataclass
class AppState:
    """Everything a route needs; one per app, in `app.extensions["fabricai"]`."""

    settings: Settings
    engine: Engine
    store: SessionStore
    admission: Admission
    service: GenerationService
    metrics: Metrics
    auth: auth.Authenticator
    started_at: float = field(default_factory=time.time)
    load_error: str | None = None
    store_healthy: bool = True
    socketio: SocketIOServer | None = None
    streams: StreamRegistry = field(default_factory=StreamRegistry)  # cancellable SSE streams
    fatal: trio.Event = field(default_factory=trio.Event)
    services_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def get_state(app: Quart) -> AppState:
    state: AppState = app.extensions["fabricai"]
    return state


class FabricApp:
    """The ASGI app Hypercorn serves: dispatches, and runs per-request cleanups.

    A route that hands out a resource before its streaming body starts (a queue place,
    a session lock) registers an async cleanup in `scope[CLEANUPS]`; it runs, shielded,
    when the ASGI call ends for any reason, even if the body never started.
    """

    def __init__(self, quart_app: Quart, state: AppState) -> None:
        self.quart = quart_app
        self.state = state
        self.mounts: dict[str, ASGIApp] = {}
        self.requests = RequestObserver(state.settings, state.metrics)

    def mount(self, prefix: str, app: ASGIApp) -> None:
        self.mounts[prefix] = app

    async def begin_shutdown(self) -> None:
        """Called when shutdown starts, before Hypercorn waits for connections: Socket.IO
        clients get a CLOSE packet now instead of being cut at the grace deadline."""
        self.state.service.begin_shutdown()
        if self.state.socketio is not None:
            await self.state.socketio.shutdown()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """HTTP calls go through `RequestObserver` (X-Request-Id, log line, metrics)."""
        if scope["type"] == "http":
            mount = next((p for p in self.mounts if scope["path"].startswith(p)), None)
            await self.requests(scope, receive, send, self._dispatch, mount=mount)
        else:
            await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            for prefix, mounted in self.mounts.items():
                if scope["path"].startswith(prefix):
                    await mounted(scope, receive, send)
                    return
        quart_app: ASGIApp = self.quart  # type: ignore[assignment]
        if scope["type"] != "http":
            await quart_app(scope, receive, send)
            return
        cleanups: list[Callable[[], Awaitable[None]]] = []
        scope[CLEANUPS] = cleanups
        try:
            await quart_app(scope, receive, send)
        finally:
            with trio.CancelScope(shield=True):
                for cleanup in cleanups:
                    await cleanup()


def create_app(
    settings: Settings, *, engine: Engine | None = None, store: SessionStore | None = None
) -> FabricApp:
    """Build the app; the engine loads in the background once serving starts."""
    quart_app = QuartTrio(__name__)
    quart_app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        JSON_SORT_KEYS=False,
    )
    engine = engine or create_engine(settings)
    store = store or create_store(settings)
    admission = Admission(
        max_concurrent=settings.max_concurrent_requests, max_queue=settings.max_queue_size
    )
    metrics = Metrics(admission, engine.info)
    authenticator = auth.Authenticator.from_settings(settings)
    service = GenerationService(
        settings=settings, engine=engine, admission=admission, store=store, observer=metrics
    )
    state = AppState(
        settings=settings, engine=engine, store=store, admission=admission, service=service,
        metrics=metrics, auth=authenticator,
    )
    quart_app.extensions["fabricai"] = state
    quart_app.register_blueprint(blueprint)
    quart_app.register_blueprint(sessions_blueprint)
    quart_app.register_blueprint(openai_blueprint)
    quart_app.register_blueprint(metrics_blueprint)
    quart_app.register_blueprint(openapi_blueprint)
    quart_app.register_blueprint(playground_blueprint)
    request_log.init_app(quart_app)  # before auth: a 401 is logged with its route
    auth.init_app(quart_app, authenticator, settings, public_paths={PAGE_PATH},
                  public_prefixes=(ASSET_PREFIX,))
    register_error_handlers(quart_app)
    app = FabricApp(quart_app, state)
    state.socketio = create_socketio(state)
    app.mount("/socket.io/", state.socketio.asgi_app)

    @quart_app.before_serving
    async def start_services() -> None:
        await quart_app.nursery.start(run_services, state)  # type: ignore[attr-defined]

    @quart_app.after_serving
    async def stop_services() -> None:
        state.services_scope.cancel()
        with trio.CancelScope(shield=True):
            await state.engine.aclose()
            await state.store.aclose()

    return app


async def run_services(
    state: AppState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The long-lived tasks, in one nursery that `after_serving` cancels."""
    with state.services_scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(state.admission.run)
            if state.socketio is not None:
                await nursery.start(state.socketio.run)
            nursery.start_soon(load_engine, state)
            nursery.start_soon(watch_store, state)
            task_status.started()


async def load_engine(state: AppState) -> None:
    """Load the model; a failure is fatal: the server stops with a clear message."""
    started = time.monotonic()
    try:
        await state.engine.load()
    except ModelLoadError as exc:
        state.load_error = str(exc)
        log.critical("%s", exc)
        state.fatal.set()
        return
    log.info("engine ready in %.1f s", time.monotonic() - started)


async def watch_store(state: AppState, interval: float = 2.0) -> None:
    """Keep `store_healthy` current for /health and /v1/status."""
    while True:
        healthy = False
        with trio.move_on_after(state.settings.store_timeout_seconds):
            healthy = await state.store.ping()
        state.store_healthy = healthy
        await trio.sleep(interval)

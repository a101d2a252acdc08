"""The composition layer: builds the services and the transports, and runs them.

Nursery tree (see docs/architecture.md):

    hypercorn serve
    ├── lifespan (QuartTrio `app.nursery`)
    │   └── services nursery (`run_services`): one admission dispatcher and one model
    │       load per served model,
    │       Socket.IO timers and fan-out, cross-replica cancel, store health
    └── per connection (hypercorn) → per request (quart-trio): handler + body stream

The services nursery owns the engines, the session store and the Redis client: when it
is cancelled (`after_serving`, which Hypercorn runs after its server nursery, i.e. every
request, has ended) its tasks end first and only then are those resources closed, in
`run_services`' own `finally`; `after_serving` waits for that. A SIGTERM during the model
load therefore waits for the load's thread and frees what it allocated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from functools import partial
from typing import Any

import trio
from quart_trio import QuartTrio

from .api import auth_hook, host_check, request_log
from .api.http_errors import register_error_handlers
from .api.openai.routes import blueprint as openai_blueprint
from .api.openapi import blueprint as openapi_blueprint
from .api.operations import blueprint as operations_blueprint
from .api.playground import ASSET_PREFIX, PAGE_PATH
from .api.playground import blueprint as playground_blueprint
from .api.raw_refusals import RawRefusals
from .api.refusals import FastRefusals
from .api.request_log import RequestObserver
from .api.routes import blueprint
from .api.sessions import blueprint as sessions_blueprint
from .api.socketio_events import create_socketio
from .api.state import EXTENSION_KEY, AppState
from .api.streaming import REQUEST_NURSERY_KEY
from .api.tokens import blueprint as tokens_blueprint
from .auth import Authenticator
from .core.engine import Engine, EngineError, EngineRequest, GrammarPreparer, ModelLoadError
from .engine.loader import create_engine
from .generation import GenerationService
from .metrics import Metrics
from .models import ModelSet, ServedModel
from .rate_limit import MemoryBuckets, RateLimits, RedisBuckets
from .realtime import SocketIOServer
from .redis_channels import RedisChannels
from .redis_stream_log import RedisStreamLog
from .remote_cancel import RedisRemoteCancel
from .sessions import SessionStore, create_store
from .settings import Settings
from .stream_log import MemoryStreamLog

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
CLEANUPS = "fabricai.cleanups"


class FabricApp:
    """The ASGI app Hypercorn serves: dispatches, and runs per-request cleanups.

    A route that hands out a resource before its streaming body starts (a queue place,
    a session lock) registers an async cleanup in `scope[CLEANUPS]`; it runs, shielded,
    when the ASGI call ends for any reason, even if the body never started.
    """

    def __init__(
        self,
        quart_app: QuartTrio,
        state: AppState,
        socketio: SocketIOServer,
        redis: RedisChannels | None,
        remote: RedisRemoteCancel | None,
    ) -> None:
        self.quart = quart_app
        self.state = state
        self.socketio = socketio
        self.redis = redis
        self.remote = remote
        self.mounts: dict[str, ASGIApp] = {"/socket.io/": socketio.asgi_app}
        self.requests = RequestObserver(state.settings, state.metrics)
        settings = state.settings
        #: A full model's 429 answered before Quart (api/refusals.py).
        self.refusals = FastRefusals(
            quart_app, state.service, state.auth, state.metrics,
            max_body_bytes=settings.max_body_bytes,
            body_timeout_seconds=float(quart_app.config["BODY_TIMEOUT"]),
            max_tokens_limit=settings.max_tokens_limit,
            enabled=settings.fast_refusals,
        )
        self.hosts = host_check.HostAllowlist.from_settings(
            state.settings, auth_enabled=state.auth.enabled
        )
        #: The same refusals answered from a request's raw bytes, before Hypercorn
        #: parses it (api/raw_refusals.py; the connection layer asks it, server.py).
        self.raw_refusals = RawRefusals(
            self.refusals, self.hosts, self.requests, state.metrics,
            enabled=settings.raw_refusals,
        )
        #: Set when start-up failed for good (the model cannot load): the server stops.
        self.fatal = trio.Event()
        #: Set once the model is loaded and warmed up: generations are accepted.
        self.ready = trio.Event()
        self.services_scope = trio.CancelScope()
        self.services_done = trio.Event()

    async def begin_shutdown(self) -> None:
        """Called when shutdown starts, before Hypercorn stops serving: new generations
        are refused (503 `draining`, and `/readyz` says so), running ones may finish
        until DRAIN_TIMEOUT_SECONDS, what is left then ends with `finish_reason:
        cancelled` (cause `shutdown`), and Socket.IO clients get a CLOSE packet."""
        started = trio.current_time()
        drain = self.state.settings.drain_timeout_seconds
        log.info("draining: %d generation(s) running", self.state.service.live_count)
        await self.state.service.drain(started + drain)
        await self.socketio.shutdown()
        log.info("drained in %.2f s", trio.current_time() - started)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """HTTP calls go through `RequestObserver` (X-Request-Id, log line, metrics)."""
        if scope["type"] == "http":
            mount = next((p for p in self.mounts if scope["path"].startswith(p)), None)
            await self.requests(scope, receive, send, self._dispatch, mount=mount)
        else:
            await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self.hosts.allows_scope(scope):
            await host_check.refuse(scope, send)  # ALLOWED_HOSTS: DNS rebinding
            return
        if scope["type"] == "http":
            send = shield_last_send(send)
        if scope["type"] in ("http", "websocket"):
            for prefix, mounted in self.mounts.items():
                if scope["path"].startswith(prefix):
                    await mounted(scope, receive, send)
                    return
        if scope["type"] != "http":
            quart_app: ASGIApp = self.quart  # type: ignore[assignment]
            await quart_app(scope, receive, send)
            return
        await self.refusals(scope, receive, send, self._framework)

    async def _framework(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """An HTTP request through Quart, in its own nursery, with its cleanups."""
        quart_app: ASGIApp = self.quart  # type: ignore[assignment]
        cleanups: list[Callable[[], Awaitable[None]]] = []
        scope[CLEANUPS] = cleanups
        try:
            # The request's own tasks (a stream's producer, api/streaming.py) end with it.
            async with trio.open_nursery() as nursery:
                scope[REQUEST_NURSERY_KEY] = nursery
                await quart_app(scope, receive, send)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for cleanup in cleanups:
                    await cleanup()


def shield_last_send(send: Any) -> Any:
    """`send`, with the response's last body message shielded from cancellation.

    Hypercorn recycles a keep-alive connection inside that `send` (it restarts the
    connection's idle timer, which closes idle connections at shutdown); quart-trio
    cancels the request's nursery as soon as the response is complete, and a cancel
    landing inside that bookkeeping left the timer stopped, so an idle keep-alive
    connection held the shutdown for all of SHUTDOWN_GRACE_SECONDS."""

    async def send_shielded(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return send_shielded


def build_models(
    settings: Settings,
    *,
    engine: Engine | None = None,
    engines: Mapping[str, Engine] | None = None,
) -> ModelSet:
    """The served models: `engines` (name → engine) or one `engine` if given (tests),
    else LLM_MODEL's one model, named as its engine names it, else MODELS (one engine
    each, with its own settings). Each gets its own admission."""
    if engines is not None:
        default = settings.default_model if settings.default_model in engines else None
        return ModelSet([ServedModel.build(n, settings, e) for n, e in engines.items()],
                        default)
    per_model = settings.served_models()
    if engine is not None or not per_model:
        engine = engine or create_engine(settings)
        return ModelSet([ServedModel.build(engine.info().model, settings, engine)])
    return ModelSet([ServedModel.build(name, model_settings, create_engine(model_settings))
                     for name, model_settings in per_model.items()])


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    store: SessionStore | None = None,
    engines: Mapping[str, Engine] | None = None,
) -> FabricApp:
    """Build the app; the models load in the background once serving starts.

    Each model's admission is sized from what its engine says it can run at once: it
    is that model's only queue (no engine keeps a waiting line of its own)."""
    quart_app = QuartTrio(__name__)
    quart_app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        JSON_SORT_KEYS=False,
    )
    models = build_models(settings, engine=engine, engines=engines)
    store = store or create_store(settings)
    redis = RedisChannels(settings.redis_url) if settings.redis_url else None
    rate_limits = RateLimits(
        requests_per_minute=settings.rate_limit_requests_per_minute,
        tokens_per_minute=settings.rate_limit_tokens_per_minute,
        buckets=RedisBuckets(settings.redis_url, prefix=settings.redis_prefix,
                             timeout_seconds=settings.store_timeout_seconds)
        if settings.redis_url and (settings.rate_limit_requests_per_minute
                                   or settings.rate_limit_tokens_per_minute)
        else MemoryBuckets(),
    )
    remote = RedisRemoteCancel(redis, prefix=settings.redis_prefix) if redis else None
    local_log = MemoryStreamLog(
        ttl_seconds=settings.resume_ttl_seconds, max_events=settings.resume_max_events
    )
    stream_log = (
        RedisStreamLog(redis, local_log, prefix=settings.redis_prefix) if redis else local_log
    )
    metrics = Metrics(models)
    authenticator = Authenticator.from_settings(settings)
    service = GenerationService(
        settings=settings, models=models, store=store, observer=metrics,
        remote=remote, stream_log=stream_log, rate_limits=rate_limits,
    )
    state = AppState(
        settings=settings, models=models, store=store, service=service,
        metrics=metrics, auth=authenticator,
    )
    quart_app.extensions[EXTENSION_KEY] = state
    for bp in (blueprint, operations_blueprint, sessions_blueprint, tokens_blueprint,
               openai_blueprint,
               openapi_blueprint, playground_blueprint):
        quart_app.register_blueprint(bp)
    request_log.init_app(quart_app)  # before auth: a 401 is logged with its route
    auth_hook.install(quart_app, authenticator, settings, public_paths={PAGE_PATH},
                      public_prefixes=(ASSET_PREFIX,))
    register_error_handlers(quart_app)
    app = FabricApp(quart_app, state, create_socketio(state, redis), redis, remote)

    @quart_app.before_serving
    async def start_services() -> None:
        await quart_app.nursery.start(run_services, app)

    @quart_app.after_serving
    async def stop_services() -> None:
        log.info("connections closed: stopping the services")
        app.services_scope.cancel()
        with trio.CancelScope(shield=True):
            await app.services_done.wait()

    return app


async def run_services(
    app: FabricApp, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The long-lived tasks, in one nursery that `after_serving` cancels; then the
    resources they used are closed, in the reverse order of their use."""
    state = app.state
    try:
        with app.services_scope:
            async with trio.open_nursery() as nursery:
                for model in state.models:
                    await nursery.start(model.admission.run)
                await nursery.start(state.service.run)
                await nursery.start(app.socketio.run)
                if app.remote is not None:
                    await nursery.start(app.remote.run, state.service)
                if isinstance(state.service.stream_log, RedisStreamLog):
                    settings = state.settings
                    await nursery.start(partial(
                        state.service.stream_log.run, ttl_seconds=settings.resume_ttl_seconds,
                        max_events=settings.resume_max_events,
                    ))
                nursery.start_soon(load_engine, app, nursery)
                nursery.start_soon(watch_store, state)
                task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            for model in state.models:
                try:
                    await model.engine.aclose()
                except Exception:  # the other engines and the store still close
                    log.exception("closing the model %s failed", model.name)
            await state.store.aclose()
            if isinstance(state.service.rate_limits.buckets, RedisBuckets):
                await state.service.rate_limits.buckets.aclose()
            if app.redis is not None:
                await app.redis.aclose()
            log.info("services stopped: engines, session store and Redis client closed")
            app.services_done.set()


async def load_engine(app: FabricApp, services: trio.Nursery) -> None:
    """Load every model (together) and warm each up (one token), then take traffic:
    the server is ready when all are. A load failure is fatal: the server stops with
    a clear message naming the model. With CONSTRAINT_WARMUP, each model that has
    loaded also starts `prepare_grammars` in `services` (the services nursery, which is
    cancelled and joined before the engines close); readiness does not wait for it.

    If cancelled, each engine finishes the step in its thread (never abandoned) and the
    services nursery then closes them all."""
    state = app.state
    started = time.monotonic()
    if len(state.models) == 1:
        log.info("loading the model")
    else:
        log.info("loading the models: %s", ", ".join(state.models.names))
    failed: list[str] = []

    async def load(model: ServedModel) -> None:
        try:
            await model.engine.load()
        except ModelLoadError as exc:
            failed.append(f"{exc}" if len(state.models) == 1 else f"model {model.name}: {exc}")
            return
        if model.settings.constraint_warmup and isinstance(model.engine, GrammarPreparer):
            services.start_soon(prepare_grammars, model.name, model.engine)

    async with trio.open_nursery() as nursery:
        for model in state.models:
            nursery.start_soon(load, model)
    if failed:
        state.load_error = "; ".join(failed)
        state.enter("failed")
        log.critical("%s", state.load_error)
        app.fatal.set()
        return
    state.enter("warming")
    for model in state.models:
        await warm_up(model.engine)
    state.enter("ready")
    state.service.ready = True
    app.ready.set()
    log.info("%s ready in %.1f s", "engine" if len(state.models) == 1 else "engines",
             time.monotonic() - started)


async def warm_up(engine: Engine) -> None:
    """Decode one token before the first request does: the first decode pays for
    allocations and kernel set-up. An engine that fails here fails its requests too,
    so the failure is logged, not fatal."""
    request = EngineRequest(request_id="warm-up", prompt_tokens=await engine.tokenize("Hello"),
                            max_tokens=1, temperature=0.0)
    try:
        async with aclosing(engine.generate_stream(request)) as stream:
            async for _ in stream:
                pass
    except EngineError as exc:
        log.error("warm-up failed: %s", exc)


async def prepare_grammars(name: str, engine: GrammarPreparer) -> None:
    """CONSTRAINT_WARMUP: build what constrained decoding needs before the first
    constrained request does (`GrammarPreparer`). A failure is logged, never fatal: the
    first constrained request then builds it (and fails as it would have anyway)."""
    started = time.monotonic()
    try:
        await engine.prepare_grammars()
    except Exception:  # whatever the build raised: the server goes on without it
        log.exception("model %s: preparing constrained decoding failed; the first "
                      "constrained request will try again", name)
        return
    log.info("model %s: constrained decoding prepared in %.1f s", name,
             time.monotonic() - started)


async def watch_store(state: AppState, interval: float = 2.0) -> None:
    """Keep `store_healthy` current for /health and /v1/status."""
    while True:
        healthy = False
        with trio.move_on_after(state.settings.store_timeout_seconds):
            healthy = await state.store.ping()
        state.store_healthy = healthy
        await trio.sleep(interval)

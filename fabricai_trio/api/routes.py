"""HTTP routes: the SSE inference endpoint and its cancel, status and health.

Thin by design: parse and validate into a `GenerationRequest`, hand it to the
`GenerationService`, and frame what comes back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

from quart import Blueprint, Response, current_app, jsonify, request

from .. import __version__
from ..auth import ANONYMOUS as ANONYMOUS  # re-exported: the owner when auth is off
from ..auth import current_identity
from ..generation import Generation, Keepalive
from ..request_log import attach_generation, request_id
from . import errors, sse
from .errors import ApiError
from .schemas import (
    EVENT_NAMES,
    CancelResult,
    CompleteEvent,
    ErrorEvent,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
    parse_generation_request,
)
from .stream_registry import StreamHandle

blueprint = Blueprint("api", __name__)


if TYPE_CHECKING:
    from ..app import AppState


def _state() -> AppState:
    return cast("AppState", current_app.extensions["fabricai"])


async def read_json_body() -> Any:
    """The request body as JSON; 400 names what is wrong (413 comes from Quart)."""
    raw = await request.get_data(cache=False)
    if not raw:
        raise errors.invalid_json("the body is empty")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.invalid_json(str(exc)) from None


def query_as_body() -> dict[str, Any]:
    """GET parameters in the JSON body's shape (`stop` may repeat)."""
    body: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        body[key] = values if key == "stop" else values[-1]
    return body


def current_owner() -> str:
    """The identity a request acts as: the authenticated one (auth.py), else anonymous."""
    return current_identity().owner


def with_request_id(body: Any) -> Any:
    """A body without `request_id` takes the request's own (its `X-Request-Id`), so the
    events and the response header agree."""
    if isinstance(body, dict) and "request_id" not in body:
        return {**body, "request_id": request_id()}
    return body


async def start_stream(generation_request: GenerationRequest) -> Generation:
    state = _state()
    generation = await state.service.prepare(generation_request, owner=current_owner())
    scope = cast(dict[str, Any], request.scope)
    scope["fabricai.cleanups"].append(generation.close)
    attach_generation(scope, generation)
    return generation


async def start_cancellable_stream(
    generation_request: GenerationRequest,
) -> tuple[Generation, StreamHandle]:
    """`start_stream()`, registered for `POST /v1/inference_sse/{id}/cancel`.

    Registered before the response starts, so a cancel sent as soon as the client has
    its `request_id` finds it; a per-request cleanup unregisters it even if the body
    never starts."""
    generation = await start_stream(generation_request)
    handle = _state().streams.register(generation)
    cast(dict[str, Any], request.scope)["fabricai.cleanups"].append(handle.aclose)
    return generation, handle


def _frame(event: StreamEvent | Keepalive) -> bytes:
    if isinstance(event, Keepalive):
        return sse.KEEPALIVE
    event_id = event.index if isinstance(event, TokenEvent) else None
    return sse.encode_event(EVENT_NAMES[type(event)], event.model_dump(), event_id=event_id)


async def sse_body(generation: Generation, handle: StreamHandle) -> AsyncIterator[bytes]:
    """The SSE framing of a generation's events (Quart closes it on disconnect).

    Each step of `events()` runs in the handle's cancel scope (never a `yield`: see
    stream_registry.py). A cancel ends the stream with the `complete` event of what was
    generated so far, `finish_reason: cancelled`; the turn is already stored by then.
    The stream leaves the registry before its last event, so once a client has read
    `complete` (or `error`) a cancel for it is a 404.
    """
    try:
        async with aclosing(generation.events()) as events:
            while True:
                with handle.step() as scope:
                    event = await anext(events, None)
                if scope.cancelled_caught:
                    handle.unregister()
                    yield _frame(generation.complete_event())
                    return
                if event is None:
                    return
                if isinstance(event, CompleteEvent | ErrorEvent):
                    handle.unregister()
                yield _frame(event)
    finally:
        handle.unregister()


def sse_response(generation: Generation, handle: StreamHandle) -> Response:
    response = Response(sse_body(generation, handle), headers=sse.SSE_HEADERS)
    response.headers["X-Request-Id"] = generation.request_id
    response.timeout = None
    return response


@blueprint.post("/v1/inference_sse")
async def inference_sse_post() -> Response:
    body = await read_json_body()
    generation_request = parse_generation_request(
        with_request_id(body), max_tokens_limit=_state().settings.max_tokens_limit
    )
    return sse_response(*await start_cancellable_stream(generation_request))


@blueprint.get("/v1/inference_sse")
async def inference_sse_get() -> Response:
    generation_request = parse_generation_request(
        with_request_id(query_as_body()), max_tokens_limit=_state().settings.max_tokens_limit
    )
    return sse_response(*await start_cancellable_stream(generation_request))


@blueprint.post("/v1/inference_sse/<request_id>/cancel")
async def inference_sse_cancel(request_id: str) -> Response:
    """Cancel the caller's running SSE stream(s) with this id; that stream then ends with
    `complete`, `finish_reason: cancelled`. 404 if none is running (or it is another
    identity's: the answer does not tell them apart)."""
    if not _state().streams.cancel(current_owner(), request_id):
        raise ApiError(404, "request_not_found", "no running SSE generation of yours has this "
                       "request_id", "request_id")
    return jsonify(CancelResult(request_id=request_id, cancelled=True).model_dump())


@blueprint.get("/v1/status")
async def status() -> Response:
    state = _state()
    info = state.engine.info()
    stats = state.admission.stats()
    return jsonify(
        {
            "model": {
                "name": info.model,
                "path": info.model_path,
                "loaded": info.loaded,
                "n_ctx": info.n_ctx,
                "chat_format": info.chat_format,
                "load_error": state.load_error,
            },
            "concurrency": {
                "max": stats.max_concurrent,
                "active": stats.active,
                "queued": stats.queued,
                "queue_capacity": stats.queue_capacity,
            },
            "engine": {"tokens_generated": info.tokens_generated, "slots": info.slots,
                       **info.extra},
            "store": {"backend": state.store.backend, "healthy": state.store_healthy},
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "version": __version__,
        }
    )


@blueprint.get("/health")
async def health() -> Response:
    state = _state()
    info = state.engine.info()
    store = {"backend": state.store.backend, "healthy": state.store_healthy}
    if state.load_error is not None:
        body, code = {"status": "error", "error": state.load_error, "store": store}, 503
    elif not info.loaded:
        body, code = {"status": "loading", "store": store}, 503
    else:
        body, code = {"status": "ok" if state.store_healthy else "degraded", "store": store}, 200
    response = jsonify(body)
    response.status_code = code
    return response

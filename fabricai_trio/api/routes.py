"""HTTP routes: the SSE inference endpoint and its cancel, status, health and metrics.

Thin by design: parse and validate into a `GenerationRequest`, hand it to the
`GenerationService`, and frame what comes back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

from quart import Blueprint, Response, jsonify, request

from .. import __version__
from ..core.errors import ERROR_TABLE, ErrorKind, InvalidJson, NotFound
from ..core.events import EVENT_NAMES, StreamEvent, TokenEvent
from ..core.requests import GenerationRequest, parse_generation_request
from ..generation import Generation, Keepalive
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from . import sse
from .auth_hook import current_identity
from .request_log import attach_generation, request_id
from .schemas import CancelResult
from .state import state

blueprint = Blueprint("api", __name__)


async def read_json_body() -> Any:
    """The request body as JSON; `InvalidJson` names what is wrong (413 comes from
    Quart)."""
    raw = await request.get_data(cache=False)
    if not raw:
        raise InvalidJson("the body is empty")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(str(exc)) from None


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
    """Prepare a generation for the current request; it is closed when the request
    ends for any reason, even if its response body never starts."""
    generation = await state().service.prepare(generation_request, owner=current_owner())
    scope = cast(dict[str, Any], request.scope)
    scope["fabricai.cleanups"].append(generation.close)
    attach_generation(scope, generation)
    return generation


def _frame(event: StreamEvent | Keepalive) -> bytes:
    if isinstance(event, Keepalive):
        return sse.KEEPALIVE
    event_id = event.index if isinstance(event, TokenEvent) else None
    return sse.encode_event(EVENT_NAMES[type(event)], event.model_dump(), event_id=event_id)


async def sse_body(generation: Generation) -> AsyncIterator[bytes]:
    """The SSE framing of a generation's events (Quart closes it on disconnect)."""
    async with aclosing(generation.events()) as events:
        async for event in events:
            yield _frame(event)


def sse_response(generation: Generation) -> Response:
    response = Response(sse_body(generation), headers=sse.SSE_HEADERS)
    response.headers["X-Request-Id"] = generation.request_id
    response.timeout = None
    return response


@blueprint.post("/v1/inference_sse")
async def inference_sse_post() -> Response:
    body = await read_json_body()
    generation_request = parse_generation_request(
        with_request_id(body), max_tokens_limit=state().settings.max_tokens_limit
    )
    return sse_response(await start_stream(generation_request))


@blueprint.get("/v1/inference_sse")
async def inference_sse_get() -> Response:
    generation_request = parse_generation_request(
        with_request_id(query_as_body()), max_tokens_limit=state().settings.max_tokens_limit
    )
    return sse_response(await start_stream(generation_request))


@blueprint.post("/v1/inference_sse/<request_id>/cancel")
async def inference_sse_cancel(request_id: str) -> Response:
    """Cancel the caller's running generation with this id, on any transport and (with
    Redis) on any replica; it then ends with `complete`, `finish_reason: cancelled`.
    `NotFound` if none is running (or it is another identity's: the answer does not
    tell them apart)."""
    if not await state().service.cancel(current_owner(), request_id, "cancel"):
        raise NotFound("no running generation of yours has this request_id",
                       code="request_not_found", param="request_id")
    return jsonify(CancelResult(request_id=request_id, cancelled=True).model_dump())


@blueprint.get("/v1/status")
async def status() -> Response:
    app = state()
    info = app.engine.info()
    stats = app.admission.stats()
    return jsonify(
        {
            "model": {
                "name": info.model,
                "path": info.model_path,
                "loaded": info.loaded,
                "n_ctx": info.n_ctx,
                "chat_format": info.chat_format,
                "load_error": app.load_error,
            },
            "concurrency": {
                "max": stats.max_concurrent,
                "active": stats.active,
                "queued": stats.queued,
                "queue_capacity": stats.queue_capacity,
            },
            "engine": {"tokens_generated": info.tokens_generated, "slots": info.slots,
                       **info.extra},
            "store": {"backend": app.store.backend, "healthy": app.store_healthy},
            "uptime_seconds": round(time.time() - app.started_at, 3),
            "version": __version__,
        }
    )


@blueprint.get("/health")
async def health() -> Response:
    """200 once the model is loaded (`degraded` while the session store is down), else
    503 with `Retry-After` (the table's status for an unavailable server)."""
    app = state()
    store = {"backend": app.store.backend, "healthy": app.store_healthy}
    body: dict[str, Any]
    if app.load_error is not None:
        body = {"status": "error", "error": app.load_error, "store": store}
    elif not app.engine.info().loaded:
        body = {"status": "loading", "store": store}
    else:
        return jsonify({"status": "ok" if app.store_healthy else "degraded", "store": store})
    response = jsonify(body)
    response.status_code = ERROR_TABLE[ErrorKind.UNAVAILABLE].status
    response.headers["Retry-After"] = "1"
    return response


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(state().metrics.render(), content_type=METRICS_CONTENT_TYPE)

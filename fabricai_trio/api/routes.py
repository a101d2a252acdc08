"""HTTP routes: the SSE inference endpoint (new streams and reconnects) and its cancel.

Thin by design: parse and validate into a `GenerationRequest`, hand it to the
`GenerationService`, and frame what comes back.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Any, cast

import trio
from quart import Blueprint, Response, jsonify, request

from ..core import jsonparse
from ..core.errors import (
    InvalidField,
    InvalidJson,
    NotFound,
    UnsupportedMediaType,
    rate_limit_headers,
)
from ..core.events import EVENT_NAMES, StreamEvent
from ..core.requests import GenerationRequest
from ..core.stream_ids import event_id, parse_event_id
from ..generation import Generation, GenerationService, Keepalive
from ..stream_log import NothingMissing
from . import sse
from .auth_hook import current_identity
from .request_log import attach_generation, request_id
from .schemas import CancelResult
from .state import state
from .streaming import buffered

blueprint = Blueprint("api", __name__)

#: `request.scope` key: the `X-RateLimit-*` headers of the generation this request started.
RATE_LIMIT_SCOPE_KEY = "fabricai.rate_limit_headers"


def is_json_content_type(sent: str | None) -> bool:
    """Whether a `Content-Type` header says `application/json` (parameters aside)."""
    return (sent or "").partition(";")[0].strip().lower() == "application/json"


def require_json_content_type() -> None:
    """`UnsupportedMediaType` unless the body is sent as `application/json`: a browser
    sends a cross-site `text/plain` or form POST without asking the server first, and
    it must not start a generation (with authentication off, nothing else stops it)."""
    sent = request.headers.get("Content-Type")
    if not is_json_content_type(sent):
        raise UnsupportedMediaType(sent)


async def read_json_body() -> Any:
    """The request body as JSON (`application/json`, depth and integer sizes bounded
    by `core.jsonparse`); `InvalidJson` names what is wrong (413 comes from Quart)."""
    require_json_content_type()
    raw = await request.get_data(cache=False)
    if not raw:
        raise InvalidJson("the body is empty")
    try:
        return jsonparse.loads(raw)
    except jsonparse.JsonRejected as exc:
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


def with_request_id(body: Any, rid: str | None = None) -> Any:
    """A body without `request_id` takes the request's own (`rid`, else the current
    request's: its `X-Request-Id`), so the events and the response header agree."""
    if isinstance(body, dict) and "request_id" not in body:
        return {**body, "request_id": rid if rid is not None else request_id()}
    return body


def sse_generation_request(
    service: GenerationService, body: Any, rid: str | None = None
) -> GenerationRequest:
    """`POST /v1/inference_sse`'s body as a request (also the fast path's parser,
    api/refusals.py, so both read a body the same way)."""
    return service.parse(with_request_id(body, rid))


async def start_stream(generation_request: GenerationRequest) -> Generation:
    """Prepare a generation for the current request.

    Most run in this request and are closed when it ends for any reason, even if its
    response body never starts. A resumable one runs in the generation service's
    nursery (it outlives this connection for its grace): the request only stops
    counting as one of its followers."""
    service = state().service
    identity = current_identity()
    generation = await service.prepare(generation_request, owner=identity.owner,
                                       priority_class=identity.priority_class)
    scope = cast(dict[str, Any], request.scope)
    attach_generation(scope, generation)
    if generation.reservation is not None and generation.reservation.states:
        # The first limit set (requests per minute, else tokens per minute).
        scope[RATE_LIMIT_SCOPE_KEY] = rate_limit_headers(generation.reservation.states[0])
    if not generation.resumable:
        scope["fabricai.cleanups"].append(generation.close)
        return generation
    await service.start_detached(generation)

    async def creator_gone() -> None:
        generation.watch(-1)
        await trio.lowlevel.checkpoint()

    scope["fabricai.cleanups"].append(creator_gone)
    return generation


@blueprint.after_app_request
async def add_rate_limit_headers(response: Response) -> Response:
    """`X-RateLimit-*` on every response that started a generation (SSE and OpenAI
    routes); a refusal carries them from the error table."""
    headers = cast(dict[str, Any], request.scope).get(RATE_LIMIT_SCOPE_KEY)
    if headers:
        response.headers.update(headers)
    return response


def frame(event: StreamEvent, position: int) -> bytes:
    """One SSE event, its id naming the stream and the position (`Last-Event-ID`)."""
    return sse.encode_event(EVENT_NAMES[type(event)], event.model_dump(),
                            event_id=event_id(event.request_id, position))


async def sse_body(generation: Generation) -> AsyncGenerator[bytes, None]:
    """The SSE framing of a generation's events (closing it cancels the generation)."""
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Keepalive):
                yield sse.KEEPALIVE
            else:
                yield frame(event, generation.position)


async def followed_body(
    service: GenerationService, owner: str, request_id: str, after: int
) -> AsyncIterator[bytes]:
    """The SSE framing of a stream read from the stream log (a resumable generation,
    or a reconnect): a client that leaves stops reading, not the generation."""
    async with aclosing(service.follow(owner, request_id, after)) as events:
        async for position, event in events:
            yield frame(event, position)


def sse_response(body: AsyncIterator[bytes], request_id: str) -> Response:
    response = Response(body, headers=sse.SSE_HEADERS)
    response.headers["X-Request-Id"] = request_id
    response.timeout = None
    return response


async def generation_response(generation_request: GenerationRequest) -> Response:
    """Start a generation and stream it; a resumable one is streamed from its stream
    log, so this response can end without ending it."""
    generation = await start_stream(generation_request)
    rid = generation.request_id
    if generation.resumable:
        return sse_response(followed_body(state().service, generation.owner, rid, -1), rid)
    return sse_response(buffered(generation, sse_body(generation)), rid)


def last_event_id() -> str | None:
    """A reconnect's position: the `Last-Event-ID` header (what `EventSource` sends),
    or a `last_event_id` query parameter for clients that cannot set headers."""
    return request.headers.get("Last-Event-ID") or request.args.get("last_event_id")


async def resume_response(value: str) -> Response:
    """Continue a stream after the event `value` names: never a new generation. 204 when
    the client has the final event (an `EventSource` then stops reconnecting)."""
    parsed = parse_event_id(value)
    if parsed is None:
        raise InvalidField("Last-Event-ID", "must be an event id as sent: "
                           "`<request_id>:<position>`")
    request_id, after = parsed
    owner = current_owner()
    service = state().service
    try:
        await service.stream_log.check((owner, request_id), after)
    except NothingMissing:
        return Response(b"", status=HTTPStatus.NO_CONTENT, headers={"X-Request-Id": request_id})
    return sse_response(followed_body(service, owner, request_id, after), request_id)


@blueprint.post("/v1/inference_sse")
async def inference_sse_post() -> Response:
    if (resume := last_event_id()) is not None:
        return await resume_response(resume)
    body = await read_json_body()
    return await generation_response(sse_generation_request(state().service, body))


@blueprint.get("/v1/inference_sse")
async def inference_sse_get() -> Response:
    """For `EventSource`: its automatic reconnects carry `Last-Event-ID` and resume."""
    if (resume := last_event_id()) is not None:
        return await resume_response(resume)
    return await generation_response(
        state().service.parse(with_request_id(query_as_body()))
    )


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

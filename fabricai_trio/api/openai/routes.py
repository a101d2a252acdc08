"""`/v1/chat/completions`, `/v1/completions`, `/v1/models`: parse, prepare, frame.

Generations start through `routes.start_stream()` like the SSE route's (same owner, same
admission, same cleanup on disconnect); streams are framed by `api/sse.py`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Response, jsonify

from ...core.engine import GrammarChecker
from ...core.requests import GenerationRequest
from ...core.stream_ids import event_id
from ...generation import Generation, Keepalive
from .. import sse
from ..http_errors import use_dialect
from ..request_log import request_id
from ..routes import read_json_body, start_stream
from ..state import state
from ..streaming import buffered
from . import serving
from .protocol import (
    ChatCompletionRequest,
    ChatTemplateInfo,
    CompletionRequest,
    ModelCapabilities,
    ModelCard,
    ModelList,
    StreamError,
    parse_chat_request,
    parse_completion_request,
)

blueprint = Blueprint("openai", __name__)


@blueprint.before_request
async def _openai_errors() -> None:
    """Errors of these routes take the OpenAI column of the error table."""
    use_dialect("openai")

DONE = sse.encode_event(None, "[DONE]")


def json_response(body: BaseModel) -> Response:
    return jsonify(body.model_dump(mode="json"))


async def sse_frames(
    chunks: AsyncGenerator[BaseModel | Keepalive, None], generation: Generation, *,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """`data: {chunk}` lines, then `data: [DONE]` (not after an error). Each chunk's SSE
    id names the stream and the position of the event it came from."""
    exclude = None if include_usage else {"usage"}
    async with aclosing(chunks) as items:
        async for item in items:
            if isinstance(item, Keepalive):
                yield sse.KEEPALIVE
                continue
            yield sse.encode_event(None, item.model_dump(mode="json", exclude=exclude),
                                   event_id=event_id(generation.request_id, generation.position))
            if isinstance(item, StreamError):
                return
    yield DONE


async def respond(
    generation: Generation,
    fmt: serving.Format,
    openai_request: ChatCompletionRequest | CompletionRequest,
) -> Response:
    if not openai_request.stream:
        return json_response(await serving.complete(generation, fmt))
    include_usage = openai_request.include_usage
    chunks = serving.stream(generation, fmt, include_usage=include_usage)
    frames = sse_frames(chunks, generation, include_usage=include_usage)
    response = Response(buffered(generation, frames), headers=sse.SSE_HEADERS)
    response.headers["X-Request-Id"] = generation.request_id
    response.timeout = None
    return response


def chat_generation_request(body: Any, *, rid: str, max_tokens_limit: int
                            ) -> tuple[ChatCompletionRequest, GenerationRequest]:
    """A chat completion body as a request (also the fast path's parser,
    api/refusals.py, so both read a body the same way)."""
    openai_request = parse_chat_request(body)
    return openai_request, openai_request.to_generation_request(
        request_id=rid, max_tokens_limit=max_tokens_limit)


def completion_generation_request(body: Any, *, rid: str, max_tokens_limit: int
                                  ) -> tuple[CompletionRequest, GenerationRequest]:
    """A completion body as a request (also the fast path's parser)."""
    openai_request = parse_completion_request(body)
    return openai_request, openai_request.to_generation_request(
        request_id=rid, max_tokens_limit=max_tokens_limit)


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    openai_request, generation_request = chat_generation_request(
        await read_json_body(), rid=request_id(),
        max_tokens_limit=state().settings.max_tokens_limit)
    generation = await start_stream(generation_request)
    fmt = serving.chat_format(generation, generation.model_name)
    return await respond(generation, fmt, openai_request)


@blueprint.post("/v1/completions")
async def completions() -> Response:
    openai_request, generation_request = completion_generation_request(
        await read_json_body(), rid=request_id(),
        max_tokens_limit=state().settings.max_tokens_limit)
    generation = await start_stream(generation_request)
    fmt = serving.completion_format(generation, generation.model_name)
    return await respond(generation, fmt, openai_request)


@blueprint.get("/v1/models")
async def list_models() -> Response:
    """Every served model, the default first, with what a client needs to pick one."""
    app = state()
    cards = []
    for model in app.models:
        info = model.engine.info()
        source = info.chat_template_source
        cards.append(ModelCard(
            id=model.name, created=int(app.started_at), default=model is app.models.default,
            loaded=info.loaded, context_length=info.n_ctx, slots=info.slots,
            chat_template=ChatTemplateInfo(
                name=info.chat_format,
                source=source if source in ("gguf", "chat_format", "fallback") else None,
            ),
            capabilities=ModelCapabilities(
                structured_output=isinstance(model.engine, GrammarChecker),
                tools=isinstance(model.engine, GrammarChecker),
                logprobs=info.logprobs),
        ))
    return json_response(ModelList(data=cards))

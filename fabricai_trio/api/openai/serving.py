"""Our generation events as OpenAI responses and stream chunks.

No HTTP here (the router frames and sends); no generation logic either: a `Generation`
comes from `GenerationService.prepare()` like every other transport's, so admission,
sessions, cancellation and the slot's release are the same. Chat and completions differ
only in how a body looks, which a `Format` says.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from ...core.errors import InternalError, error_object
from ...core.events import CompleteEvent, ErrorEvent, FinishReason, TokenEvent, Usage
from ...generation import KEEPALIVE, Generation, Keepalive
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    OpenAIFinishReason,
    StreamError,
)


def finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """OpenAI knows `stop` and `length`; ours adds `cancelled`/`error`, which a client
    never sees in a finished response (it left, or it got an error)."""
    return "length" if reason == "length" else "stop"


class Format(Protocol):
    """How one endpoint's bodies look."""

    def response(self, complete: CompleteEvent) -> BaseModel: ...

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None,
    ) -> BaseModel | None: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...


@dataclass(frozen=True, slots=True)
class ChatFormat:
    id: str
    model: str
    created: int

    def response(self, complete: CompleteEvent) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=[ChatCompletionChoice(
                message=ChatCompletionMessage(content=complete.text),
                finish_reason=finish_reason(complete.finish_reason),
            )],
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None,
    ) -> ChatCompletionChunk:
        delta = DeltaMessage(role="assistant", content="") if first else DeltaMessage(
            content=text or None
        )
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],
        )

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


@dataclass(frozen=True, slots=True)
class CompletionFormat:
    id: str
    model: str
    created: int

    def response(self, complete: CompleteEvent) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=[CompletionChoice(
                text=complete.text, finish_reason=finish_reason(complete.finish_reason)
            )],
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None,
    ) -> CompletionChunk | None:
        if first:
            return None  # completions have no role chunk
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(text=text or "", finish_reason=finish)],
        )

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def chat_format(generation: Generation, model: str) -> ChatFormat:
    return ChatFormat(f"chatcmpl-{generation.request_id}", model, int(time.time()))


def completion_format(generation: Generation, model: str) -> CompletionFormat:
    return CompletionFormat(f"cmpl-{generation.request_id}", model, int(time.time()))


async def complete(generation: Generation, fmt: Format) -> BaseModel:
    """Run the generation to its end and return the whole response.

    If the client leaves, the request is cancelled and so is the generation (its slot
    is freed between two tokens), exactly as for a stream.
    """
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, CompleteEvent):
                return fmt.response(event)
            if isinstance(event, ErrorEvent):
                raise generation.error or InternalError()
    raise InternalError("the generation ended without a result")


async def stream(
    generation: Generation, fmt: Format, *, include_usage: bool
) -> AsyncGenerator[BaseModel | Keepalive, None]:
    """The chunks of a stream, keepalives while queued; the router adds `[DONE]`.

    Closing this iterator (a client disconnect) closes the generation.
    """
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Keepalive):
                yield KEEPALIVE
            elif isinstance(event, TokenEvent):
                if (chunk := fmt.chunk(text=event.text)) is not None:
                    yield chunk
            elif isinstance(event, CompleteEvent):
                if (chunk := fmt.chunk(text="", finish=finish_reason(event.finish_reason))):
                    yield chunk
                if include_usage:
                    yield fmt.usage_chunk(event.usage)
            elif isinstance(event, ErrorEvent):
                yield StreamError(error=error_object(generation.error or InternalError()))
                return
            elif (chunk := fmt.chunk(first=True)) is not None:  # QueuedEvent
                yield chunk

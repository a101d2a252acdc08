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
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from ...core.errors import InternalError, error_object
from ...core.events import CompleteEvent, ErrorEvent, FinishReason, TokenEvent, Usage
from ...core.tools import CallStart, ContentDelta, Delta, ToolCallParser, ToolConfig
from ...generation import KEEPALIVE, Generation, Keepalive
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    OpenAIFinishReason,
    StreamError,
)


def finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """OpenAI knows `stop` and `length` (and `tool_calls`: `ChatFormat`); ours adds
    `cancelled`/`error`, which a client never sees in a finished response (it left, or
    it got an error)."""
    return "length" if reason == "length" else "stop"


class Format(Protocol):
    """How one endpoint's bodies look."""

    def response(self, complete: CompleteEvent) -> BaseModel: ...

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None,
    ) -> BaseModel | None: ...

    def token_chunks(self, text: str) -> list[BaseModel]:
        """The chunks for generated text (none while it is held back)."""

    def final_chunks(self, reason: FinishReason) -> list[BaseModel]:
        """What was held back, then the chunk with the finish reason."""

    def usage_chunk(self, usage: Usage) -> BaseModel: ...


@dataclass(slots=True)
class ChatFormat:
    """Chat bodies; with tools, the reply goes through a `ToolCallParser` (one per
    response: it keeps the state of a stream)."""

    id: str
    model: str
    created: int
    tools: ToolConfig | None = None
    parser: ToolCallParser | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        tools = self.tools
        if tools is not None and tools.active:
            self.parser = ToolCallParser(
                names={f.name for f in tools.callable},
                stream_arguments=tools.forced,
                parallel=tools.parallel_tool_calls,
            )

    def finish_reason(self, reason: FinishReason) -> OpenAIFinishReason:
        if self.parser is not None and self.parser.calls and reason == "stop":
            return "tool_calls"
        return finish_reason(reason)

    def response(self, complete: CompleteEvent) -> ChatCompletionResponse:
        message = ChatCompletionMessage(content=complete.text)
        if self.parser is not None:
            self.parser.feed(complete.text)
            self.parser.finish()
            calls = self.parser.calls
            message = ChatCompletionMessage(
                content=self.parser.content or (None if calls else ""),
                tool_calls=[ChatCompletionMessageToolCall(
                    id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls] or None,
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=[ChatCompletionChoice(
                message=message, finish_reason=self.finish_reason(complete.finish_reason),
            )],
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None,
    ) -> ChatCompletionChunk:
        delta = DeltaMessage(role="assistant", content="") if first else DeltaMessage(
            content=text or None
        )
        return self._chunk(delta, finish)

    def _chunk(self, delta: DeltaMessage, finish: OpenAIFinishReason | None = None
               ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],
        )

    def token_chunks(self, text: str) -> list[BaseModel]:
        if self.parser is None:
            return [self.chunk(text=text)]
        return [self._chunk(_delta(d)) for d in self.parser.feed(text)]

    def final_chunks(self, reason: FinishReason) -> list[BaseModel]:
        held: list[BaseModel] = []
        if self.parser is not None:
            held = [self._chunk(_delta(d)) for d in self.parser.finish()]
        return [*held, self.chunk(text="", finish=self.finish_reason(reason))]

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def _delta(item: Delta) -> DeltaMessage:
    """One parser output as a chunk's delta, in OpenAI's shape."""
    if isinstance(item, ContentDelta):
        return DeltaMessage(content=item.text)
    if isinstance(item, CallStart):
        return DeltaMessage(tool_calls=[DeltaToolCall(
            index=item.index, id=item.id, type="function",
            function=DeltaFunctionCall(name=item.name, arguments=""))])
    return DeltaMessage(tool_calls=[DeltaToolCall(
        index=item.index, function=DeltaFunctionCall(arguments=item.text))])


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

    def _text_chunk(self, text: str, finish: OpenAIFinishReason | None = None
                    ) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=finish)],
        )

    def token_chunks(self, text: str) -> list[BaseModel]:
        return [self._text_chunk(text)]

    def final_chunks(self, reason: FinishReason) -> list[BaseModel]:
        return [self._text_chunk("", finish_reason(reason))]

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def chat_format(generation: Generation, model: str) -> ChatFormat:
    return ChatFormat(f"chatcmpl-{generation.request_id}", model, int(time.time()),
                      tools=generation.request.tools)


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
                for chunk in fmt.token_chunks(event.text):
                    yield chunk
            elif isinstance(event, CompleteEvent):
                for chunk in fmt.final_chunks(event.finish_reason):
                    yield chunk
                if include_usage:
                    yield fmt.usage_chunk(event.usage)
            elif isinstance(event, ErrorEvent):
                yield StreamError(error=error_object(generation.error or InternalError()))
                return
            elif (role := fmt.chunk(first=True)) is not None:  # QueuedEvent
                yield role

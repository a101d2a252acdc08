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


def choices_of(complete: CompleteEvent) -> list[tuple[int, str, FinishReason]]:
    """(index, text, finish reason) of every choice the generation made."""
    if complete.choices is None:
        return [(0, complete.text, complete.finish_reason)]
    return [(c.index, c.text, c.finish_reason) for c in complete.choices]


class Format(Protocol):
    """How one endpoint's bodies look. `index` is the choice's (a request for `n`
    choices: 0 to n-1)."""

    def response(self, complete: CompleteEvent) -> BaseModel: ...

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None, index: int = 0,
    ) -> BaseModel | None: ...

    def token_chunks(self, text: str, index: int = 0) -> list[BaseModel]:
        """The chunks for generated text (none while it is held back)."""

    def final_chunks(self, reason: FinishReason, index: int = 0) -> list[BaseModel]:
        """What was held back, then the chunk with the finish reason."""

    def usage_chunk(self, usage: Usage) -> BaseModel: ...


@dataclass(slots=True)
class ChatFormat:
    """Chat bodies; with tools, each choice's reply goes through a `ToolCallParser` of
    its own (one per choice of a response: it keeps the state of a stream)."""

    id: str
    model: str
    created: int
    tools: ToolConfig | None = None
    parsers: dict[int, ToolCallParser] = field(init=False, default_factory=dict)

    def parser(self, index: int) -> ToolCallParser | None:
        """Choice `index`'s parser; None without tools."""
        tools = self.tools
        if tools is None or not tools.active:
            return None
        if index not in self.parsers:
            self.parsers[index] = ToolCallParser(
                names={f.name for f in tools.callable},
                stream_arguments=tools.forced,
                parallel=tools.parallel_tool_calls,
            )
        return self.parsers[index]

    def finish_reason(self, reason: FinishReason, index: int = 0) -> OpenAIFinishReason:
        parser = self.parser(index)
        if parser is not None and parser.calls and reason == "stop":
            return "tool_calls"
        return finish_reason(reason)

    def _message(self, text: str, index: int) -> ChatCompletionMessage:
        parser = self.parser(index)
        if parser is None:
            return ChatCompletionMessage(content=text)
        parser.feed(text)
        parser.finish()
        calls = parser.calls
        return ChatCompletionMessage(
            content=parser.content or (None if calls else ""),
            tool_calls=[ChatCompletionMessageToolCall(
                id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in calls] or None,
        )

    def response(self, complete: CompleteEvent) -> ChatCompletionResponse:
        choices = []
        for index, text, reason in choices_of(complete):
            message = self._message(text, index)
            choices.append(ChatCompletionChoice(
                index=index, message=message, finish_reason=self.finish_reason(reason, index)))
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=choices,
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None, index: int = 0,
    ) -> ChatCompletionChunk:
        delta = DeltaMessage(role="assistant", content="") if first else DeltaMessage(
            content=text or None
        )
        return self._chunk(delta, finish, index)

    def _chunk(self, delta: DeltaMessage, finish: OpenAIFinishReason | None = None,
               index: int = 0) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish)],
        )

    def token_chunks(self, text: str, index: int = 0) -> list[BaseModel]:
        parser = self.parser(index)
        if parser is None:
            return [self.chunk(text=text, index=index)]
        return [self._chunk(_delta(d), index=index) for d in parser.feed(text)]

    def final_chunks(self, reason: FinishReason, index: int = 0) -> list[BaseModel]:
        held: list[BaseModel] = []
        parser = self.parser(index)
        if parser is not None:
            held = [self._chunk(_delta(d), index=index) for d in parser.finish()]
        return [*held, self.chunk(text="", finish=self.finish_reason(reason, index),
                                  index=index)]

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
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason(reason))
                     for index, text, reason in choices_of(complete)],
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None, index: int = 0,
    ) -> CompletionChunk | None:
        if first:
            return None  # completions have no role chunk
        return self._text_chunk(text or "", finish, index)

    def _text_chunk(self, text: str, finish: OpenAIFinishReason | None = None,
                    index: int = 0) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(index=index, text=text, finish_reason=finish)],
        )

    def token_chunks(self, text: str, index: int = 0) -> list[BaseModel]:
        return [self._text_chunk(text, index=index)]

    def final_chunks(self, reason: FinishReason, index: int = 0) -> list[BaseModel]:
        return [self._text_chunk("", finish_reason(reason), index)]

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

    With `n` choices, each chunk carries one choice's `index` (choices interleave as
    they are decoded); every choice gets its role chunk first and its `finish_reason`
    chunk once the last choice has ended.

    Closing this iterator (a client disconnect) closes the generation.
    """
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Keepalive):
                yield KEEPALIVE
            elif isinstance(event, TokenEvent):
                for chunk in fmt.token_chunks(event.text, event.choice or 0):
                    yield chunk
            elif isinstance(event, CompleteEvent):
                for index, _, reason in choices_of(event):
                    for chunk in fmt.final_chunks(reason, index):
                        yield chunk
                if include_usage:
                    yield fmt.usage_chunk(event.usage)
            elif isinstance(event, ErrorEvent):
                yield StreamError(error=error_object(generation.error or InternalError()))
                return
            else:  # QueuedEvent: each choice's role chunk
                for index in range(generation.request.n):
                    if (role := fmt.chunk(first=True, index=index)) is not None:
                        yield role

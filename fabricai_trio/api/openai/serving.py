"""Our generation events as OpenAI responses and stream chunks.

No HTTP here (the router frames and sends); no generation logic either: a `Generation`
comes from `GenerationService.prepare()` like every other transport's, so admission,
sessions, cancellation and the slot's release are the same. Chat and completions differ
only in how a body looks, which a `Format` says.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from ...core.errors import InternalError, error_object
from ...core.events import (
    CompleteEvent,
    ErrorEvent,
    FinishReason,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from ...core.tools import CallStart, ContentDelta, Delta, ToolCallParser, ToolConfig
from ...generation import KEEPALIVE, Generation, Keepalive
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
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


Logprobs = Sequence[TokenLogprobs] | None


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
        finish: OpenAIFinishReason | None = None, index: int = 0, logprobs: Logprobs = None,
    ) -> BaseModel | None: ...

    def token_chunks(self, text: str, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        """The chunks for generated text (none while it is held back); `logprobs`:
        those of its tokens (None: not asked for)."""

    def final_chunks(self, reason: FinishReason, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        """What was held back, then the chunk with the finish reason (and the
        `logprobs` of tokens that showed no text)."""

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
                index=index, message=message, finish_reason=self.finish_reason(reason, index),
                # logprobs: n is 1 (the request's parse refuses more)
                logprobs=_chat_logprobs(complete.logprobs)))
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=choices,
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None, index: int = 0, logprobs: Logprobs = None,
    ) -> ChatCompletionChunk:
        delta = DeltaMessage(role="assistant", content="") if first else DeltaMessage(
            content=text or None
        )
        return self._chunk(delta, finish, index, logprobs)

    def _chunk(self, delta: DeltaMessage, finish: OpenAIFinishReason | None = None,
               index: int = 0, logprobs: Logprobs = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish,
                                               logprobs=_chat_logprobs(logprobs))],
        )

    def token_chunks(self, text: str, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        parser = self.parser(index)
        if parser is None:
            return [self.chunk(text=text, index=index, logprobs=logprobs)]
        # (logprobs: not with tools, the request's parse refuses them)
        return [self._chunk(_delta(d), index=index) for d in parser.feed(text)]

    def final_chunks(self, reason: FinishReason, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        held: list[BaseModel] = []
        parser = self.parser(index)
        if parser is not None:
            held = [self._chunk(_delta(d), index=index) for d in parser.finish()]
        return [*held, self.chunk(text="", finish=self.finish_reason(reason, index),
                                  index=index, logprobs=logprobs)]

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


def _chat_logprobs(logprobs: Logprobs) -> ChoiceLogprobs | None:
    return None if logprobs is None else ChoiceLogprobs(content=list(logprobs))


class TextOffsets:
    """Where each token of one choice starts in its text, in characters (a token that
    starts inside a character counts from that character's start)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def legacy(self, logprobs: Sequence[TokenLogprobs]) -> CompletionLogprobs:
        """The completions shape of the next tokens of the choice."""
        offsets = []
        for entry in logprobs:
            offsets.append(self._chars)
            self._chars += len(self._decoder.decode(bytes(entry.bytes)))
        return CompletionLogprobs(
            tokens=[entry.token for entry in logprobs],
            token_logprobs=[entry.logprob for entry in logprobs],
            # the most likely tokens and the chosen one (as OpenAI: up to n + 1 of them)
            top_logprobs=[{**{top.token: top.logprob for top in entry.top_logprobs},
                           entry.token: entry.logprob} for entry in logprobs],
            text_offset=offsets,
        )


@dataclass(frozen=True, slots=True)
class CompletionFormat:
    id: str
    model: str
    created: int
    offsets: TextOffsets = field(default_factory=TextOffsets)  # of the streamed chunks

    def response(self, complete: CompleteEvent) -> CompletionResponse:
        logprobs = complete.logprobs  # n is 1 (the request's parse refuses more)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=complete.usage,
            choices=[CompletionChoice(
                index=index, text=text, finish_reason=finish_reason(reason),
                logprobs=None if logprobs is None else TextOffsets().legacy(logprobs))
                for index, text, reason in choices_of(complete)],
        )

    def chunk(
        self, *, text: str | None = None, first: bool = False,
        finish: OpenAIFinishReason | None = None, index: int = 0, logprobs: Logprobs = None,
    ) -> CompletionChunk | None:
        if first:
            return None  # completions have no role chunk
        return self._text_chunk(text or "", finish, index, logprobs)

    def _text_chunk(self, text: str, finish: OpenAIFinishReason | None = None,
                    index: int = 0, logprobs: Logprobs = None) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(
                index=index, text=text, finish_reason=finish,
                logprobs=None if logprobs is None else self.offsets.legacy(logprobs))],
        )

    def token_chunks(self, text: str, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        return [self._text_chunk(text, index=index, logprobs=logprobs)]

    def final_chunks(self, reason: FinishReason, index: int = 0, logprobs: Logprobs = None
                     ) -> list[BaseModel]:
        return [self._text_chunk("", finish_reason(reason), index, logprobs)]

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
    sent = 0  # logprobs sent with the tokens
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, Keepalive):
                yield KEEPALIVE
            elif isinstance(event, TokenEvent):
                sent += len(event.logprobs or ())
                for chunk in fmt.token_chunks(event.text, event.choice or 0, event.logprobs):
                    yield chunk
            elif isinstance(event, CompleteEvent):
                # Tokens that showed no text (a character cut short at the end) go last.
                rest = event.logprobs[sent:] if event.logprobs else None
                for index, _, reason in choices_of(event):
                    for chunk in fmt.final_chunks(reason, index, rest or None):
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

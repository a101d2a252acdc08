"""A request's prompt as the model will see it, within the model's context.

The chat template (with the tools offered, by the template's own tool format or written
into plain messages), a session's history trimmed to fit `n_ctx - max_tokens`, the stop
strings and tokens, and the token ids a request may bias: what `GenerationService`
decodes and what `POST /v1/tokenize` counts, by one path. No I/O but the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .core.engine import ChatPrompt, Engine, TokenMemo, ToolTemplates, TooManyTokens
from .core.errors import ContextLengthExceeded, InvalidField
from .core.messages import ChatMessage
from .core.requests import GenerationRequest
from .core.tools import has_tool_turns, render_fallback
from .sessions import Session


async def prompt_tokens(
    engine: Engine,
    n_ctx: int,
    request: GenerationRequest,
    session: Session | None,
    new_messages: Sequence[ChatMessage],
    max_tokens: int,
) -> PromptTokens:
    """Tokens to decode, stop strings and stop tokens, within `n_ctx - max_tokens`;
    else `ContextLengthExceeded`, counted no further than needed (the engine stops
    at the budget). A conversation the chat template refuses is a 400.

    A session's history is trimmed, oldest whole turn first (the system prompt is
    kept), to the fewest turns dropped that fit: a binary search over how many to
    drop (the token count only grows with the turns kept), with one `TokenMemo` so
    that each stretch of the conversation is tokenized once per request, not once
    per try. Cancellation stops it between two pieces of tokenizing."""
    budget = n_ctx - max_tokens
    if not request.is_chat:
        try:
            tokens = await engine.tokenize(request.prompt or "", limit=budget)
        except TooManyTokens as exc:
            raise _too_long(exc, max_tokens, n_ctx) from None
        return PromptTokens(tokens)
    history = [
        ChatMessage(role=m.role, content=m.content)
        for m in (session.messages if session is not None else ())
        if m.content or m.role != "assistant"
    ]
    system = [m for m in history if m.role == "system"]
    turns = _turns([m for m in history if m.role != "system"])
    memo = TokenMemo()

    async def attempt(dropped: int) -> tuple[ChatPrompt, list[int]] | TooManyTokens:
        kept = [m for turn in turns[dropped:] for m in turn]
        # A conversation the template refuses raises `InvalidMessages` (400).
        chat = render_chat(engine, request, [*system, *kept, *new_messages])
        try:
            return chat, await engine.tokenize_chat(chat, limit=budget, memo=memo)
        except TooManyTokens as exc:
            return exc

    best = await attempt(0)
    fewest = 0
    if isinstance(best, TooManyTokens) and turns:
        best = await attempt(len(turns))  # the least the prompt can be
        fewest = len(turns)
        if not isinstance(best, TooManyTokens):
            too_many = 0  # best is at `fewest`, and dropping `too_many` does not fit
            while fewest - too_many > 1:
                middle = (too_many + fewest) // 2
                tried = await attempt(middle)
                if isinstance(tried, TooManyTokens):
                    too_many = middle
                else:
                    best, fewest = tried, middle
    if isinstance(best, TooManyTokens):
        raise _too_long(best, max_tokens, n_ctx)
    chat, tokens = best
    return PromptTokens(tokens, chat.stop, chat.stop_tokens,
                        dropped_messages=sum(len(t) for t in turns[:fewest]))


def user_stops(request: GenerationRequest) -> list[str]:
    """The request's `stop` strings, except for forced tool calls: their text is fixed
    by the grammar, and a stop string inside it (a newline, a quote) would only cut a
    call short."""
    if request.tools is not None and request.tools.forced:
        return []
    return request.stop


def render_chat(engine: Engine, request: GenerationRequest, messages: list[ChatMessage]
                ) -> ChatPrompt:
    """The conversation through the model's chat template. With tools offered (not
    `tool_choice: none`), or tool calls and results in it: by the template's own tool
    format if it has one, else written into plain messages (`render_fallback`)."""
    tools = request.tools
    shown = tools.tools if tools is not None and tools.active else ()
    if not shown and not has_tool_turns(messages):
        return engine.format_chat(messages)
    if isinstance(engine, ToolTemplates):
        chat = engine.format_chat_tools(messages, shown)
        if chat is not None:
            return chat
    return engine.format_chat(render_fallback(messages, shown))


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """What `prompt_tokens` found: the tokens, the chat's stops, what was trimmed."""

    tokens: list[int]
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    dropped_messages: int = 0


def _turns(messages: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """History as whole turns: a user message and the replies after it (what comes
    before the first user message is a turn of its own: dropping it alone would put
    the system text after a reply)."""
    turns: list[list[ChatMessage]] = []
    for m in messages:
        if m.role == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def logit_bias(request: GenerationRequest, n_vocab: int | None) -> dict[int, float]:
    """The request's `logit_bias` by token id; an id the model does not have is a 400
    naming the field (an engine must never index past its vocabulary)."""
    bias = {int(token): value for token, value in request.logit_bias.items()}
    if bias and n_vocab is not None and max(bias) >= n_vocab:
        raise InvalidField("logit_bias", f"token id {max(bias)} is not below the model's "
                           f"vocabulary size {n_vocab}")
    return bias


def _too_long(exc: TooManyTokens, max_tokens: int, n_ctx: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(prompt_tokens=exc.at_least, exact=exc.exact,
                                 n_ctx=n_ctx, max_tokens=max_tokens)

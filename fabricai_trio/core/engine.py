"""The engine contract: what the server needs from a model backend.

`ENGINE=module:Class` loads any class that implements `Engine`; its constructor takes
the `Settings`. See docs/hacking.md for a worked example.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from .messages import ChatMessage
from .tools import ToolDefinition


class EngineError(Exception):
    """The backend failed while generating; the stream ends with finish_reason `error`."""


class ModelLoadError(Exception):
    """The model could not be loaded (missing or corrupt file): start-up stops."""


class TooManyTokens(Exception):
    """A text has more tokens than the `limit` its caller gave, so tokenizing stopped.

    `at_least` tokens are certain (every token of the text if `exact`): an engine may
    stop as soon as the limit is passed, or refuse from the text's size alone.
    """

    def __init__(self, at_least: int, *, exact: bool) -> None:
        super().__init__(f"at least {at_least} tokens" if not exact else f"{at_least} tokens")
        self.at_least = at_least
        self.exact = exact


class TokenMemo:
    """The tokens of text stretches one caller has already had tokenized (one request).

    History trimming renders the same conversation several times, each time without
    some of its oldest turns; with a memo an engine tokenizes each stretch of text once
    per request instead of once per rendering. Kept per request, never shared between
    callers (a shared one would tell one client, by its speed, what another sent).
    """

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[int, ...]] = {}
        self.hits = 0

    def get(self, text: str) -> tuple[int, ...] | None:
        found = self._tokens.get(text)
        if found is not None:
            self.hits += 1
        return found

    def put(self, text: str, tokens: Sequence[int]) -> None:
        self._tokens[text] = tuple(tokens)


def check_limit(tokens: list[int], limit: int | None) -> list[int]:
    """`tokens`, or `TooManyTokens` if there are more than `limit`: for engines that
    tokenize a whole text at once."""
    if limit is not None and len(tokens) > limit:
        raise TooManyTokens(len(tokens), exact=True)
    return tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineRequest:
    """What the engine decodes: prompt tokens plus sampling parameters."""

    request_id: str
    prompt_tokens: Sequence[int]
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Added to a token's logit before any other sampling step."""
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_tokens: frozenset[int] = frozenset()
    """Token ids that end the generation (finish_reason `stop`) besides the model's
    end-of-generation tokens: the chat template's BOS/EOS/end-of-turn."""
    grammar: str | None = None
    """The grammar every sampled token must follow (constrained decoding): llguidance's
    grammar text (engine/grammar.py: a JSON Schema, a Lark grammar or a GBNF one
    converted to Lark), checked beforehand with `GrammarChecker.grammar_error`."""
    logprobs: int | None = None
    """Give each generated token's log-probability and those of the `logprobs` most
    likely tokens at its step (0: the chosen token's only; at most `MAX_TOP_LOGPROBS`)
    in `Chunk.logprobs`; None: none (and no cost). Only asked of an engine whose
    `EngineInfo.logprobs` is true."""
    cache_scope: str | None = None
    """Whose prefix cache the request may read and fill: an engine reuses a prompt's KV
    only between requests of one scope (the principal), so that timing cannot tell one
    principal what another sent. None is the shared scope."""
    principal: str | None = None
    """Who sent the request (an opaque id: admission's principal), so an engine that
    batches requests can share its work between principals fairly, as admission does;
    None for all: no principals."""
    priority_rank: int = 0
    """The request's priority class as admission ranks it (0 is the highest class);
    an engine that batches serves the prompts of higher classes first. 0 for all: no
    classes."""


MAX_TOP_LOGPROBS = 20
"""The most alternatives per token an engine is asked for (OpenAI's `top_logprobs` limit)."""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One token and its log-probability at a step."""

    token: int
    piece: bytes  # the token's text as bytes (may be part of a UTF-8 character)
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its step
    (`top`: most likely first, as many as asked).

    The value is what the built-in engines sample from: the log-softmax over the whole
    vocabulary of the logits after `logit_bias` and the repeat, frequency and presence
    penalties; before the grammar's mask, temperature and top-k/top-p/min-p truncation
    (docs/openai.md, "Log-probabilities")."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """Text that became visible after `tokens` more tokens were decoded (may be empty).

    With `EngineRequest.logprobs`: the log-probabilities of the tokens decoded since the
    last chunk that carried some (end-of-generation tokens are not listed). A chunk
    whose text is empty may carry some (a stop string held back, part of a character)."""

    text: str
    tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finish:
    """The last item of a stream that ended by itself."""

    reason: Literal["stop", "length"]
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class PromptPart:
    """A piece of a rendered chat: written by the template (`template=True`: may hold
    control tokens such as `<|im_start|>`) or a message's content (never tokenized as
    control tokens, whatever it looks like)."""

    text: str
    template: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatPrompt:
    """A chat rendered through the model's template.

    `parts` (when set) joined give `text`; an engine tokenizes them so that only the
    template's parts can produce control tokens (`Engine.tokenize_chat`).
    """

    text: str
    parts: tuple[PromptPart, ...] = ()
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    add_bos: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineInfo:
    model: str
    model_path: str | None
    n_ctx: int
    slots: int
    chat_format: str | None
    loaded: bool
    #: Where `chat_format` comes from: `gguf` (the file's own template), `chat_format`
    #: (CHAT_FORMAT), `fallback` (a model without a template), or None (not known).
    chat_template_source: str | None = None
    #: Tokens in the vocabulary, once loaded: a token id (`logit_bias`) is below it.
    n_vocab: int | None = None
    #: Whether `EngineRequest.logprobs` is honoured (a request asking for logprobs of an
    #: engine that cannot give them is refused with a 400 naming `logprobs`).
    logprobs: bool = False
    tokens_generated: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class GrammarChecker(Protocol):
    """An engine that can constrain decoding with an llguidance grammar
    (`EngineRequest.grammar`). The built-in engines are; a plug-in engine without it
    refuses grammars with a 400."""

    def grammar_error(self, grammar: str) -> str | None:
        """Why `grammar` cannot be used with this model, or None if it can. Cheap and
        synchronous: called before the request is admitted."""


@runtime_checkable
class GrammarPreparer(Protocol):
    """An engine with something to build, once per loaded model, before it can constrain
    decoding (the built-in engines: llguidance's tokenizer over the vocabulary, seconds
    of CPU). With CONSTRAINT_WARMUP the server calls `prepare_grammars` in the
    background once the model has loaded; otherwise the first constrained request
    builds it."""

    async def prepare_grammars(self) -> None:
        """Build it now (worker threads), unless it is built already. Constrained
        requests that arrive meanwhile wait for the same build. If cancelled, the build
        in progress finishes in its thread first (`Engine.aclose` waits for it too).
        Raises `EngineError` if the model is not loaded."""


@runtime_checkable
class ToolTemplates(Protocol):
    """An engine whose chat template may have a tool format of its own (the built-in
    engines: a GGUF template that writes `<tool_call>`). Without one, or for another
    engine, tools and tool turns are written into plain messages
    (`core.tools.render_fallback`) and go through `Engine.format_chat`."""

    def format_chat_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]
    ) -> ChatPrompt | None:
        """The conversation and `tools` rendered by the template's tool format, or None
        if it has none. Pure and fast, like `format_chat`; raises `InvalidMessages` or
        `InvalidField` (a 400)."""


@runtime_checkable
class Detokenizer(Protocol):
    """An engine that turns token ids back into text (`POST /v1/detokenize`); the
    built-in engines are."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (control tokens written out; invalid UTF-8 replaced).
        Every id must be below `EngineInfo.n_vocab`."""


@runtime_checkable
class ChoiceDecoder(Protocol):
    """An engine that decodes several choices of one prompt itself, evaluating the
    prompt once (`BatchedEngine`: the prompt's KV is copied to the other sequences).
    Other engines get `n` choices from `decode_choices` as `n` streams."""

    def generate_choices(
        self, request: EngineRequest, n: int
    ) -> AsyncGenerator[tuple[int, Chunk | Finish], None]:
        """Decode `n` (>= 2) choices; yields (choice index, item), each choice's items in
        order and ending with its `Finish` (choices interleave). Choice i samples with
        `choice_seed(request.seed, i)`. Takes `n` of `info().slots`. Cancellation and
        closing end every choice, as for `generate_stream`."""


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: `seed + index` (mod 2**32), so that a seeded request
    gives the same choices every time and its choices differ; None stays random."""
    return None if seed is None else (seed + index) % 2**32


async def decode_choices(
    engine: Engine, request: EngineRequest, n: int
) -> AsyncGenerator[tuple[int, Chunk | Finish], None]:
    """The `n` choices of `request` as (choice index, item): one `generate_stream` for
    n = 1; the engine's own `generate_choices` if it has one; else `n` streams of
    `generate_stream` (each choice evaluates the prompt itself), pulled in turn: an
    engine that decodes ahead (the built-in ones) keeps them all busy meanwhile.

    Closing it (or cancellation) closes every stream still open, each as
    `generate_stream` says; a finished choice's stream is closed at once, so its
    engine slot is free before the others end."""
    if n == 1:
        async with aclosing(engine.generate_stream(request)) as stream:
            async for item in stream:
                yield 0, item
        return
    if isinstance(engine, ChoiceDecoder):
        async with aclosing(engine.generate_choices(request, n)) as choices:
            async for got in choices:
                yield got
        return
    async with AsyncExitStack() as stack:
        streams = {
            i: await stack.enter_async_context(aclosing(engine.generate_stream(
                replace(request, seed=choice_seed(request.seed, i)))))
            for i in range(n)
        }
        while streams:
            for i in list(streams):
                step: Chunk | Finish | None = await anext(streams[i], None)
                if step is not None:
                    yield i, step
                if step is None or isinstance(step, Finish):
                    await streams.pop(i).aclose()


@runtime_checkable
class Engine(Protocol):
    """A model backend. All methods may be called from the trio thread only."""

    async def load(self) -> None:
        """Load the model (slow; runs in worker threads). Raises `ModelLoadError`.

        If cancelled, the load in progress finishes in its thread and is then dropped.
        """

    def info(self) -> EngineInfo: ...

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        """Tokens of `text`, as the model will see them.

        With `limit`: raises `TooManyTokens` once more than `limit` tokens are certain
        (the built-in engines refuse a text too large to fit from its size alone, and
        tokenize the rest in bounded pieces, stopping at the limit). Cancellation takes
        effect between two pieces (no shared state is left behind)."""

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """Render a conversation with the model's chat template (pure, fast).

        Raises `core.errors.InvalidMessages` (a 400) if the template refuses it.
        """

    async def tokenize_chat(
        self, prompt: ChatPrompt, *, limit: int | None = None, memo: TokenMemo | None = None
    ) -> list[int]:
        """Tokens of a rendered chat: control tokens only where the template wrote
        them, never from message contents. `limit` as for `tokenize`; `memo` (may be
        ignored) spares re-tokenizing text already seen by this caller. Cancellation
        takes effect between two pieces (no shared state is left behind)."""

    def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        """Decode; yields `Chunk`s and, if the stream ends by itself, one `Finish`.

        Capacity: at most `info().slots` streams are open at once (admission, the one
        queue, is sized from it, and `slots` is known before `load()`); an engine never
        queues a stream of its own: one beyond its slots fails with `EngineError`.

        Cancellation takes effect between two tokens: the decode step in progress
        finishes in its thread, the slot is returned, and `Cancelled` propagates.
        Raises `EngineError` if the backend fails. Close it with `aclosing()`.
        """

    async def aclose(self) -> None:
        """Free the model: waits for the decode steps in flight and starts none; streams
        still open then fail with `EngineError`. Cancellation waits for those steps."""

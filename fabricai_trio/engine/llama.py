"""`LlamaEngine`: llama-cpp-python with one llama context per concurrent slot.

A `llama_cpp.Llama` context is not thread-safe, so each generation borrows one context
for its whole life; the weights are mmapped, so N contexts share one copy in memory.
Every llama.cpp call runs in a worker thread, never abandoned: decode steps start one
token ahead of delivery (`_StepInThread`) so the thread does not idle while a token is
sent, and a cancelled generation waits for its step in flight (at most one token)
before returning the context to the pool. Each context keeps its KV cache between
requests, so a prompt that starts like the previous one on that context (the next
turn of a session) only evaluates the new tokens.

The pool has `slots` contexts and no waiting line: admission is the one queue, and a
`generate_stream` with every context taken raises `EngineError`. `aclose()` waits for
every decode step in flight and starts no new one, so it never frees a context a
thread still uses; a generation still open then ends with `EngineError` at its next
token without touching its (freed) context.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import outcome
import trio

from ..core.engine import (
    Chunk,
    EngineError,
    EngineInfo,
    EngineRequest,
    Finish,
    ModelLoadError,
    TokenLogprob,
)
from ..core.textstream import TextAssembler
from ..settings import Settings
from .batch_scheduler import common_prefix
from .constraint import Constraint
from .logprobs import LogitProcessor, Logits, LogprobQueue, token_logprob
from .model_text import ModelText, ModelTextMethods

log = logging.getLogger(__name__)

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED


class LlamaEngine(ModelTextMethods):
    """The default engine: a pool of llama.cpp contexts over one mmapped model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._slots = settings.max_concurrent_requests
        self._text = ModelText(settings)
        self._contexts: list[llama_cpp.Llama] = []
        self._free_in, self._free_out = trio.open_memory_channel[llama_cpp.Llama](self._slots)
        #: The cache scope of what each context holds (see `EngineRequest.cache_scope`).
        self._scope: dict[llama_cpp.Llama, str | None] = {}
        self._prefix_hits = 0
        self._prompt_tokens_reused = 0
        self._tokens_generated = 0
        self._loaded = False
        self._closing = False
        self._steps_in_flight = 0
        self._steps_idle = trio.Event()  # set when the last step in flight settles

    # --- lifecycle ---

    async def load(self) -> None:
        s = self._settings
        path = await self._text.load()
        for _ in range(self._slots):
            ctx = await trio.to_thread.run_sync(self._open, path)
            self._contexts.append(ctx)
            self._free_in.send_nowait(ctx)
        self._loaded = True
        log.info("model %s loaded: %d slot(s), n_ctx %d", path.name, self._slots, s.n_ctx)

    def _open(self, path: Path) -> llama_cpp.Llama:
        s = self._settings
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=s.n_ctx,
                n_batch=min(s.n_batch, s.n_ctx),
                n_threads=s.n_threads,
                n_threads_batch=s.n_threads,
                seed=RANDOM_SEED,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"LLM_MODEL: cannot load {path}: {exc}") from None

    async def aclose(self) -> None:
        """Free every context once the decode steps in flight have finished (no step
        starts after this is called); then the tokenizer."""
        self._loaded = False
        self._closing = True
        while self._steps_in_flight:
            await self._steps_idle.wait()
        contexts, self._contexts = self._contexts, []
        with trio.CancelScope(shield=True):
            for ctx in contexts:
                await trio.to_thread.run_sync(ctx.close)
        await self._text.aclose()

    # --- metadata and text ---

    def info(self) -> EngineInfo:
        text = self._text
        return EngineInfo(
            model=text.name,
            model_path=str(text.path) if text.path else None,
            n_ctx=self._settings.n_ctx,
            slots=self._slots,
            chat_format=text.template.name if text.template else None,
            chat_template_source=text.template_source,
            loaded=self._loaded,
            n_vocab=text.n_vocab,
            logprobs=True,
            tokens_generated=self._tokens_generated,
            extra={"prefix_cache_hits": self._prefix_hits,
                   "prompt_tokens_reused": self._prompt_tokens_reused,
                   # What the contexts hold (reused by the next prompt of the same scope).
                   "kv_cells_used": sum(ctx.n_tokens for ctx in self._contexts),
                   "kv_cells_total": self._settings.n_ctx * len(self._contexts),
                   **text.stats()},
        )

    # --- generation ---

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        if not self._loaded:
            raise EngineError("the model is not loaded")
        if len(request.prompt_tokens) + request.max_tokens > self._settings.n_ctx:
            raise EngineError("prompt and max_tokens do not fit the context window")
        tokenizer = None
        if request.grammar is not None:
            tokenizer = await self._text.constraint_tokenizer()  # built once, in a thread
        try:
            ctx = self._free_out.receive_nowait()
        except trio.WouldBlock:
            raise EngineError(
                f"all {self._slots} contexts are taken: admission must not let more "
                "streams in than info().slots"
            ) from None
        self._enter_scope(ctx, request)
        pending: _StepInThread | None = None
        try:
            steps = _Decoder(ctx, request, tokenizer)
            assembler = TextAssembler(request.stop)
            logprobs = LogprobQueue()
            produced = 0
            pending = self._start(steps.step)
            while pending is not None:
                piece, end, logprob = await pending.result()
                pending = None
                produced += 1
                self._tokens_generated += 1
                if not end and produced < request.max_tokens:
                    # Decode the next token while this one is delivered: otherwise the
                    # decode thread idles while the event loop sends (~5% of the time).
                    pending = self._start(steps.step)
                if end:
                    text = assembler.flush()
                    yield Chunk(text, 1, logprobs.take(text, last=True))
                    yield Finish("stop", produced)
                    return
                logprobs.add(logprob)
                text = assembler.feed(piece)
                if assembler.stopped:
                    yield Chunk(text, 1, logprobs.take(text, last=True))
                    yield Finish("stop", produced)
                    return
                yield Chunk(text, 1, logprobs.take(text))
            text = assembler.flush()
            yield Chunk(text, 0, logprobs.take(text, last=True))
            yield Finish("length", produced)
        finally:
            if pending is not None:  # never give back a context a thread still uses
                self._tokens_generated += await pending.settle()
            self._free_in.send_nowait(ctx)

    def _enter_scope(self, ctx: llama_cpp.Llama, request: EngineRequest) -> None:
        """llama-cpp-python reuses the longest common prefix of what a context holds and
        the new prompt: a context that changes scope forgets what it holds first, so one
        principal's prompts never speed up another's. A seeded request forgets it too:
        its whole prompt is evaluated afresh, because a reused prefix changes the shape
        of the matmuls and so the logits (by float noise), and the same seeded request
        must give the same tokens on whichever context it lands. Counts what is reused."""
        if (self._scope.get(ctx, request.cache_scope) != request.cache_scope
                or request.seed is not None):
            ctx.reset()  # type: ignore[no-untyped-call]
        self._scope[ctx] = request.cache_scope
        held = ctx.input_ids[: ctx.n_tokens].tolist()
        reused = common_prefix(held, list(request.prompt_tokens[:-1]))
        if reused:
            self._prefix_hits += 1
            self._prompt_tokens_reused += reused

    def _start(self, step: Callable[[], _Step]) -> _StepInThread:
        """Start a decode step, counted until it settles; none once `aclose()` began."""
        if self._closing:
            raise EngineError("the engine is closed")
        self._steps_in_flight += 1
        return _StepInThread(step, self._step_settled)

    def _step_settled(self) -> None:
        self._steps_in_flight -= 1
        if not self._steps_in_flight:
            self._steps_idle.set()
            self._steps_idle = trio.Event()


_Step = tuple[bytes, bool, TokenLogprob | None]  # a token's bytes, end, its logprobs


class _StepInThread:
    """One decode step started in a worker thread now, awaited later.

    `trio.lowlevel.start_thread_soon` runs it without tying up the awaiting task, so the
    next token can decode while the current one is delivered. The generation that
    started it always waits for it (`settle()`, shielded) before returning its context:
    a thread that holds a llama context is never abandoned.
    """

    def __init__(self, step: Callable[[], _Step], settled: Callable[[], None]) -> None:
        self._done = trio.Event()
        self._outcome: outcome.Outcome[_Step] | None = None
        token = trio.lowlevel.current_trio_token()

        def finished() -> None:  # in the trio thread
            self._done.set()
            settled()

        def deliver(result: outcome.Outcome[_Step]) -> None:
            self._outcome = result
            token.run_sync_soon(finished)

        trio.lowlevel.start_thread_soon(step, deliver)

    async def result(self) -> _Step:
        """The step's result. Cancelled: the step keeps running; call `settle()`."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()

    async def settle(self) -> int:
        """Wait for the step, shielded; 1 if it decoded a token (then discarded), else 0."""
        with trio.CancelScope(shield=True):
            await self._done.wait()
        assert self._outcome is not None
        return 1 if isinstance(self._outcome, outcome.Value) and not self._outcome.value[1] else 0


def _biased(bias: Mapping[int, float]) -> Callable[[Any, Any], Any]:
    """`logit_bias` for `Llama.generate`: added to the logits before sampling."""
    ids = np.fromiter(bias, dtype=np.intp)
    values = np.fromiter(bias.values(), dtype=np.float32)

    def add_bias(_: Any, scores: Any) -> Any:
        scores[ids] += values
        return scores

    return add_bias


class _Decoder:
    """One generation on one context; `step()` runs in a worker thread.

    With `logprobs`, a logits processor ahead of the others keeps a copy of each step's
    raw logits (llama-cpp-python's chain, like llama.cpp's, biases and penalises a copy
    of the context's logits), and `step()` computes the token's log-probabilities from
    it with the batched engine's own `LogitProcessor`, so both engines report the same
    values for the same logits.

    With a grammar, the last logits processor is its llguidance matcher (`_mask`, as
    the batched engine's): the tokens it refuses get -inf before the penalties and
    the sampler chain."""

    def __init__(self, ctx: llama_cpp.Llama, request: EngineRequest, tokenizer: Any) -> None:
        self._ctx = ctx
        self._request = request
        self._tokens: Any = None
        self._logits: Logits | None = None
        self._tokenizer = tokenizer
        self._constraint: Constraint | None = None
        self._consumed = 0  # tokens of the context the matcher has seen (prompt: none)
        self._processor = None if request.logprobs is None else LogitProcessor.of(
            repeat_penalty=request.repeat_penalty, logit_bias=request.logit_bias,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty)

    def _keep_logits(self, _: Any, scores: Any) -> Any:
        self._logits = np.array(scores, dtype=np.float32)
        return scores

    def _mask(self, input_ids: Any, scores: Any) -> Any:
        """The grammar's mask: advance the matcher by the tokens sampled since the last
        call (the first call sees the prompt), compute the mask, -inf where it refuses."""
        constraint = self._constraint
        if constraint is None:
            assert self._request.grammar is not None
            constraint = self._constraint = Constraint(
                self._tokenizer, self._request.grammar, len(scores))
            self._consumed = len(input_ids)
        for token in input_ids[self._consumed:]:
            constraint.accept(int(token))
        self._consumed = len(input_ids)
        constraint.compute()
        constraint.masked(scores, out=scores)
        return scores

    def step(self) -> _Step:
        """Decode one token: (its bytes, end of generation, its log-probabilities)."""
        ctx = self._ctx
        try:
            if self._tokens is None:
                r = self._request
                processors: list[Callable[[Any, Any], Any]] = []
                if self._processor is not None:
                    processors.append(self._keep_logits)
                if r.logit_bias:
                    processors.append(_biased(r.logit_bias))
                if r.grammar is not None:
                    processors.append(self._mask)
                ctx.set_seed(RANDOM_SEED if r.seed is None else r.seed)
                self._tokens = ctx.generate(
                    list(r.prompt_tokens),
                    top_k=r.top_k,
                    top_p=r.top_p,
                    min_p=r.min_p,
                    temp=r.temperature,
                    repeat_penalty=r.repeat_penalty,
                    frequency_penalty=r.frequency_penalty,
                    presence_penalty=r.presence_penalty,
                    logits_processor=llama_cpp.LogitsProcessorList(processors)
                    if processors else None,
                )
            token = next(self._tokens)
        except StopIteration:
            return (b"", True, None)
        except Exception as exc:
            raise EngineError(f"decode failed: {exc}") from exc
        if llama_cpp.llama_vocab_is_eog(ctx._model.vocab, token) or (
            token in self._request.stop_tokens
        ):
            return (b"", True, None)
        piece = ctx.detokenize([token])
        return (piece, False, self._logprob(token, piece))

    def _logprob(self, token: int, piece: bytes) -> TokenLogprob | None:
        processor, logits = self._processor, self._logits
        if processor is None or logits is None:
            return None
        processor.apply(logits)
        processor.accept(token)
        return token_logprob(logits, token, self._request.logprobs or 0,
                             lambda t: self._ctx.detokenize([t]), piece)

"""`BatchedEngine`: continuous batching over ONE llama.cpp context (`ENGINE=batched`).

Every running generation is a sequence of one context (`n_seq_max = slots + prefix
cache`). Each step decodes one batch holding one token of every decoding sequence plus
prompt chunks of newly admitted ones, so N streams cost about one forward pass per token
instead of N. `BatchScheduler` (pure) decides what goes into a step; `BatchRunner`
(llama.cpp calls) runs it in a worker thread; this module is the trio glue.

Who drives the steps: the streams and the steps themselves, no background task. A step
is planned in the trio thread and run in a worker thread started with
`trio.lowlevel.start_thread_soon`; its result comes back through `run_sync_soon`, which
delivers the tokens and, if there is more work (a decoding stream whose consumer is at
most `MAX_BACKLOG` tokens behind, a prompt chunk, KV ops), plans and starts the next
step at once. So the decode thread never waits for the event loop to hand tokens to the
streams (the next step runs while they are sent), a stream that needs a token only
waits for the step in flight, and when the work runs out, the next stream that needs a
token (or a new one) starts a step again. Within a step, prompt chunks are evaluated
before the decode rows and each pass's tokens are delivered as soon as it has run
(`_deliver_early`), so a prompt's first token does not wait for the rest of its step.
Steps never overlap, the context is only touched by the one thread running a step, and
a step is never abandoned (a prompt chunk's pass may be preempted, see
`BatchScheduler.preempts`): a stream that is cancelled stops waiting, the step still
finishes and delivers to everyone else, and `aclose()` waits for it before freeing the
context.

The engine holds at most `slots` (`MAX_CONCURRENT_REQUESTS`) streams: admission is the
one queue, and a `generate_stream` beyond that raises `EngineError`. `generate_choices`
decodes a request's `n` choices as `n` sequences (taking `n` slots) that evaluate the
prompt once: the other choices start from a copy of the first one's KV.

Cancellation of a stream takes effect between two steps: its sequence is released at
once (so the next step no longer carries it), and before `aclose()` returns the KV ops
that free its cells (or park them in the prefix cache) have been applied, waiting at
most for the step in flight.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial

import outcome
import trio

from ..core.engine import (
    Chunk,
    EngineError,
    EngineInfo,
    EngineRequest,
    Finish,
    TokenLogprob,
    choice_seed,
)
from ..core.textstream import TextAssembler
from ..settings import Settings
from .batch_scheduler import BatchScheduler, Sampled, SchedulerFull, StepPlan
from .batch_step import BatchRunner, Sampling, StepResult, check_fits
from .logprobs import LogprobQueue
from .model_text import ModelText, ModelTextMethods

log = logging.getLogger(__name__)

MAX_BACKLOG = 4  # tokens decoded ahead of a slow consumer before its sequence pauses


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """Which sequence ids hold KV cells after a step, and who owned ids at its plan."""

    cells: dict[int, tuple[int, int]]  # seq_id -> (pos_min, pos_max)
    running: frozenset[int]  # ids of running sequences when the step was planned
    cached: dict[int, tuple[int, ...]]  # prefix-cache ids and their tokens after the step


@dataclass(eq=False)
class _Stream:
    """The trio side of one sequence: text assembly and the items not yet yielded."""

    handle: int
    assembler: TextAssembler
    items: deque[Chunk | Finish] = field(default_factory=deque)
    error: str | None = None  # the step carrying it failed
    logprobs: LogprobQueue = field(default_factory=LogprobQueue)

    def chunk(self, text: str, tokens: int, *, last: bool = False) -> Chunk:
        return Chunk(text, tokens, self.logprobs.take(text, last=last))


def _sampling(request: EngineRequest, seed: int | None) -> Sampling:
    """The sampler settings of one sequence of `request` (its own seed)."""
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repeat_penalty=request.repeat_penalty,
        seed=seed,
        stop_tokens=request.stop_tokens,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=request.logit_bias,
        grammar=request.grammar,
        logprobs=request.logprobs,
    )


class BatchedEngine(ModelTextMethods):
    """Continuous batching on one context, with a prefix cache of finished sequences."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._slots = settings.max_concurrent_requests
        self._scheduler = BatchScheduler(
            slots=self._slots,
            cache_slots=settings.prefix_cache_sequences,
            step_tokens=settings.prefill_chunk_tokens,
            max_backlog=MAX_BACKLOG,
            invariant=settings.batch_invariant,
        )
        self._text = ModelText(settings)
        self._runner: BatchRunner | None = None
        self._streams: dict[int, _Stream] = {}
        self._sampling: dict[int, Sampling] = {}
        self._plan_in_flight: StepPlan | None = None  # the step running in a worker thread
        self._closing = False
        self._plans_started = 0
        self._plans_done = 0
        self._snapshot_requests: list[list[KvSnapshot]] = []
        self._step_done = trio.Event()
        self._delivered = trio.Event()  # the step in flight delivered tokens, or ended
        self._changed = trio.Event()  # something a blocked step could be waiting for
        self._tokens_generated = 0
        self._loaded = False

    @property
    def _stepping(self) -> bool:
        return self._plan_in_flight is not None

    # --- lifecycle ---

    async def load(self) -> None:
        """Tokenizer (a vocab-only `Llama`) and the `BatchRunner` (model + one context),
        each in a worker thread. If cancelled, the load in progress finishes in its
        thread and is then dropped."""
        s = self._settings
        path = await self._text.load()
        sched = self._scheduler
        self._runner = await trio.to_thread.run_sync(
            partial(
                BatchRunner,
                path,
                n_seq_max=sched.n_seq_max,
                n_ctx_seq=s.n_ctx,
                n_batch=sched.max_batch_tokens + sched.n_seq_max,  # + pad rows
                n_outputs=sched.n_seq_max,
                n_threads=s.n_threads,
                invariant=s.batch_invariant,
                flash_attn=s.flash_attn,
            )
        )
        self._loaded = True
        log.info(
            "model %s loaded (batched): %d slot(s) + %d prefix-cache sequence(s), n_ctx %d each",
            path.name, self._slots, sched.cache_slots, s.n_ctx,
        )

    async def aclose(self) -> None:
        """Free the model once the step in flight (if any) has finished; no step starts
        after this is called. Streams still open then end with `EngineError` at their
        next item, without touching the context."""
        self._loaded = False
        self._closing = True
        while self._stepping:
            await self._step_done.wait()
        runner, self._runner = self._runner, None
        self._changed.set()
        if runner is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(runner.close)
        await self._text.aclose()

    # --- metadata and text ---

    def info(self) -> EngineInfo:
        text = self._text
        st = self._scheduler.stats()
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
            extra={
                "backend": "batched",
                "batch_invariant": self._settings.batch_invariant,
                "flash_attn": self._settings.flash_attn and not self._settings.batch_invariant,
                "steps": st.steps,
                "batch_size_last": st.batch_seqs_last,
                "batch_size_mean": st.batch_seqs_mean,
                "batch_size_max": st.batch_seqs_max,
                "batch_size_steps": {str(k): v for k, v in st.batch_sizes.items()},
                "batch_tokens_last": st.batch_tokens_last,
                "running": st.running,
                "waiting": st.waiting,
                "prefix_cache_entries": st.cached,
                "prefix_cache_hits": st.prefix_hits,
                "prompt_tokens_evaluated": st.prompt_tokens_evaluated,
                "prompt_tokens_reused": st.prompt_tokens_reused,
                "prompt_tokens_shared": st.prompt_tokens_shared,
                "kv_copies": st.kv_copies,
                "prompt_chunks_preempted": st.prompt_chunks_preempted,
                "kv_cells_used": st.kv_cells_used,
                "kv_cells_total": self._settings.n_ctx * self._scheduler.n_seq_max,
                **text.stats(),
            },
        )

    # --- generation ---

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        """Decode with every other running stream; see the module doc for cancellation."""
        async with aclosing(self._decode(request, 1)) as choices:
            async for _, item in choices:
                yield item

    def generate_choices(
        self, request: EngineRequest, n: int
    ) -> AsyncGenerator[tuple[int, Chunk | Finish], None]:
        """`n` choices on `n` sequences; the prompt is evaluated once (the other choices
        copy its KV). Choice i samples with `choice_seed(request.seed, i)`. Closing it
        or cancelling it ends every choice, as for `generate_stream`."""
        return self._decode(request, n)

    async def _decode(
        self, request: EngineRequest, n: int
    ) -> AsyncGenerator[tuple[int, Chunk | Finish], None]:
        if not self._loaded:
            raise EngineError("the model is not loaded")
        check_fits(len(request.prompt_tokens), request.max_tokens, self._settings.n_ctx)
        if not request.prompt_tokens:
            raise EngineError("empty prompt")
        if request.grammar is not None:
            tokenizer = await self._text.constraint_tokenizer()  # built once, in a thread
            if self._runner is None:
                raise EngineError("the engine is closed")
            self._runner.constraint_tokenizer = tokenizer
        try:
            handles = self._scheduler.add_choices(
                request.prompt_tokens, request.max_tokens, n, scope=request.cache_scope,
                principal=request.principal, rank=request.priority_rank)
        except SchedulerFull:
            raise EngineError(
                f"more than {self._slots} generations at once: admission must not let "
                "more streams in than info().slots"
            ) from None
        plan = self._plan_in_flight
        if plan is not None and self._scheduler.preempts(plan, handles[0]):
            assert self._runner is not None
            self._runner.preempt.set()
        streams = [_Stream(handle, TextAssembler(request.stop)) for handle in handles]
        for i, stream in enumerate(streams):
            self._streams[stream.handle] = stream
            self._sampling[stream.handle] = _sampling(request, choice_seed(request.seed, i))
        self._kick()
        try:
            left = n
            while left:
                i, item = await self._next_item(streams)
                yield i, item
                if isinstance(item, Finish):
                    left -= 1
        finally:
            for stream in streams:
                del self._streams[stream.handle]
                self._sampling.pop(stream.handle, None)
                self._scheduler.release(stream.handle, cache=stream.error is None)
            self._kick()
            with trio.CancelScope(shield=True):
                await self._flush_ops(self._plans_started + 1)

    async def _next_item(self, streams: Sequence[_Stream]) -> tuple[int, Chunk | Finish]:
        """The next item of one of `streams` (the first in order that has one) and its
        position, waiting for (or starting) steps until there is one. A step failure
        of any of them fails them all (one request).

        Checks for cancellation first: a stream that has tokens buffered would otherwise
        never reach a cancellation point. Cancelled while waiting: the step goes on.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not any(s.items for s in streams):
            for stream in streams:
                if stream.error is not None:
                    raise EngineError(stream.error)
            if self._closing or self._runner is None:
                raise EngineError("the engine is closed")
            if not self._stepping and self._scheduler.needs_step():
                self._start_step()
            if self._stepping:
                await self._delivered.wait()  # tokens of the step in flight, or its end
            else:
                # Nothing can run (every other sequence waits for its consumer): wait
                # until a consumer takes a token or a stream ends.
                if self._changed.is_set():
                    self._changed = trio.Event()
                await self._changed.wait()
        i, stream = next((i, s) for i, s in enumerate(streams) if s.items)
        item = stream.items.popleft()
        if isinstance(item, Chunk) and item.tokens:
            self._scheduler.consumed(stream.handle, item.tokens)
            self._kick()
        return i, item

    async def _flush_ops(self, plan_number: int) -> None:
        """Return once plan `plan_number` (which carries the ops just queued: every plan
        takes all pending ops) has run: by a running step, or one started here."""
        while self._plans_done < plan_number and self._runner is not None:
            if self._stepping:
                await self._step_done.wait()
            elif self._closing:
                return  # aclose() frees the whole context
            else:
                await self._start_step(ops_only=not self._scheduler.needs_step()).wait()

    def _kick(self) -> None:
        """Something changed (a token taken, a stream added or released): wake streams
        waiting for work, and start a step if none runs and there is work."""
        self._changed.set()
        if (not self._stepping and not self._closing and self._runner is not None
                and self._scheduler.needs_step()):
            self._start_step()

    def _start_step(self, *, ops_only: bool = False) -> trio.Event:
        """Plan the next step and start it in a worker thread; the returned event is set
        once its tokens are delivered. Synchronous (no checkpoint): the caller checked
        that no step runs. `_step_finished` is called with its outcome in the trio
        thread, and chains the next step."""
        runner = self._runner
        assert runner is not None and not self._stepping and not self._closing
        plan = self._scheduler.plan(ops_only=ops_only)
        self._plan_in_flight = plan
        runner.preempt.clear()
        done = self._step_done = trio.Event()
        self._plans_started += 1
        snapshots, self._snapshot_requests = self._snapshot_requests, []
        running = frozenset(self._scheduler.running_ids())
        sampling = {e.handle: self._sampling[e.handle]
                    for e in plan.entries if e.sample and e.handle in self._sampling}
        trio_token = trio.lowlevel.current_trio_token()

        def early(result: StepResult) -> None:  # in the worker thread, mid-step
            trio_token.run_sync_soon(self._deliver_early, plan, result)

        def report(result: outcome.Outcome[StepResult]) -> None:  # in the worker thread
            trio_token.run_sync_soon(self._step_finished, plan, result, snapshots, running,
                                     done)

        trio.lowlevel.start_thread_soon(
            partial(runner.run, plan, sampling, snapshot=bool(snapshots), early=early), report
        )
        self._changed.set()
        return done

    def _step_finished(self, plan: StepPlan, result: outcome.Outcome[StepResult],
                       snapshots: list[list[KvSnapshot]], running: frozenset[int],
                       done: trio.Event) -> None:
        """Deliver a step's tokens and start the next step if there is work. Runs in the
        trio thread as a `run_sync_soon` callback: it must not raise."""
        try:
            if isinstance(result, outcome.Value):
                step: StepResult = result.value
                self._deliver(plan, step)
                if step.kv is not None:
                    snap = KvSnapshot(step.kv, running, self._scheduler.cached())
                    for box in snapshots:
                        box.append(snap)
            else:
                error = getattr(result, "error", None)
                log.error("batched step raised: %r", error)
                self._fail(plan, f"decode failed: {error!r}")
        except Exception:  # a bug in delivery: fail the step's streams, keep the loop alive
            log.exception("batched step delivery failed")
            self._fail(plan, "internal error while delivering a step")
        finally:
            if snapshots and not snapshots[0]:
                self._snapshot_requests += snapshots  # the step failed: the next one serves
            self._plans_done = self._plans_started
            self._plan_in_flight = None
            done.set()
            self._announce_delivery()
        try:
            self._kick()
        except Exception:
            log.exception("batched engine: could not start the next step")

    def _deliver_early(self, plan: StepPlan, result: StepResult) -> None:
        """Deliver the tokens of one pass of the step in flight (a prompt's first token,
        `BatchRunner.run(early=...)`) while its other passes run. A `run_sync_soon`
        callback: must not raise."""
        try:
            self._deliver(plan, result, early=True)
        except Exception:
            log.exception("batched step delivery failed")
            self._fail(plan, "internal error while delivering a step")
        self._announce_delivery()

    def _announce_delivery(self) -> None:
        """Wake the streams waiting for tokens; the next ones wait for the next delivery."""
        self._delivered.set()
        self._delivered = trio.Event()

    def _deliver(self, plan: StepPlan, result: StepResult, *, early: bool = False) -> None:
        """Turn sampled tokens into each stream's items (synchronous: no checkpoint)."""
        if result.error is not None:
            log.error("batched step failed: %s", result.error)
            self._fail(plan, result.error)
            return
        for sampled in self._scheduler.complete(plan, result.sampled, result.preempted,
                                                early=early):
            stream = self._streams.get(sampled.handle)
            if stream is None:
                continue
            self._tokens_generated += 1
            self._emit(stream, sampled, result.pieces.get(sampled.handle, b""),
                       result.logprobs.get(sampled.handle))

    def _emit(self, stream: _Stream, sampled: Sampled, piece: bytes,
              logprob: TokenLogprob | None) -> None:
        """Mirror `LlamaEngine`: one Chunk per token; EOG counts as a completion token."""
        produced = self._scheduler.n_generated(stream.handle)
        items = stream.items
        if sampled.eog:
            items += [stream.chunk(stream.assembler.flush(), 1, last=True),
                      Finish("stop", produced)]
            return
        stream.logprobs.add(logprob)
        text = stream.assembler.feed(piece)
        if stream.assembler.stopped:
            self._scheduler.finish(stream.handle)
            items += [stream.chunk(text, 1, last=True), Finish("stop", produced)]
            return
        items.append(stream.chunk(text, 1))
        if sampled.finish == "length":
            items += [stream.chunk(stream.assembler.flush(), 0, last=True),
                      Finish("length", produced)]

    def _fail(self, plan: StepPlan, message: str) -> None:
        for handle in self._scheduler.fail(plan):
            stream = self._streams.get(handle)
            if stream is not None:
                stream.error = message

    # --- test and status helpers ---

    async def kv_snapshot(self) -> KvSnapshot:
        """The KV cells after the next step (another stream's, or an ops-only one run
        here), which applies every KV op queued so far. For tests and debugging."""
        box: list[KvSnapshot] = []
        self._snapshot_requests.append(box)
        while not box and self._runner is not None and not self._closing:
            if self._stepping:
                await self._step_done.wait()
            else:
                await self._start_step(ops_only=True).wait()
        if not box:
            raise EngineError("the engine is closed")
        return box[0]

    @property
    def scheduler(self) -> BatchScheduler:
        return self._scheduler

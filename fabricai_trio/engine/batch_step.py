"""The llama.cpp side of the batched engine: one model, one context, one step at a time.

`BatchRunner.run()` applies one `StepPlan` (KV ops; one `llama_decode` for each prompt
chunk, in the plan's order, then one for the decoding sequences with the plan's pad
rows; one sample per sequence that asked for logits; each pass's tokens handed out as
soon as it has run) and is the only code that touches the context. The
engine calls it through `trio.to_thread.run_sync`, one call at a time, and never
abandons it, so the context is never used from two threads.

The context has one KV stream per sequence id (`kv_unified=false`): a sequence's
attention spans only its own cells, parked prefix-cache entries cost no compute, and a
copy between ids is a full-stream copy (the only kind llama.cpp supports across streams).
`swa_full` stays on (the llama.cpp default, as `LlamaEngine` uses), so a copied prefix
is always complete for Gemma's sliding-window layers.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ..core.engine import EngineError, ModelLoadError, TokenLogprob
from .abort_flag import ABORTED, AbortFlag
from .batch_scheduler import BatchEntry, PadRow, SeqCopy, SeqRemove, StepPlan
from .constraint import Constraint, compute_masks
from .logprobs import PENALTY_LAST_N, LogitProcessor, Logits, token_logprob

__all__ = ["PENALTY_LAST_N", "BatchRunner", "Sampling", "StepResult"]

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED
#: llama.cpp's `llama_token_data` as a numpy record, for candidate arrays over numpy.
TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
MIN_P = 0.05  # Llama.generate defaults, kept so sampled output matches LlamaEngine
TYPICAL_P = 1.0
PAD_TOKEN = 2  # any valid token: a pad row's cell is dropped right after its step


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repeat_penalty: float
    seed: int | None
    stop_tokens: frozenset[int] = frozenset()  # end the sequence like an EOG token
    min_p: float = MIN_P
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None  # llguidance's, checked beforehand (engine/grammar.py)
    logprobs: int | None = None  # report log-probabilities, with this many alternatives


@dataclass(slots=True)
class _Greedy:
    """Temperature 0, sampled in numpy: the logit bias, the penalties on the recent
    tokens (llama.cpp's: repeat, then frequency and presence), then argmax. The llama.cpp
    chain picks the same token, but scans the whole 262k-token vocabulary in several
    passes: ~0.4 ms a sequence per step, against ~0.03 ms here, which at 8 sequences is
    about 5% of a step."""

    processor: LogitProcessor

    @classmethod
    def of(cls, s: Sampling) -> _Greedy:
        return cls(_processor(s))

    def pick(self, logits: Logits) -> int:
        """Penalise `logits` in place (they are ours until the next decode), take the top."""
        self.processor.apply(logits)
        token = int(np.argmax(logits))
        self.processor.accept(token)
        return token


def _processor(s: Sampling) -> LogitProcessor:
    return LogitProcessor.of(repeat_penalty=s.repeat_penalty,
                             frequency_penalty=s.frequency_penalty,
                             presence_penalty=s.presence_penalty, logit_bias=s.logit_bias)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    sampled: dict[int, tuple[int, bool]]  # handle -> (token, end of generation)
    pieces: dict[int, bytes]  # handle -> the token's text bytes ("" for EOG)
    error: str | None = None
    margins: dict[int, float] | None = None  # top-1 minus top-2 logit, if recorded
    kv: dict[int, tuple[int, int]] | None = None  # `kv_positions()` after the step, if asked
    #: handle -> the sampled token's log-probabilities, for sequences that asked (not
    #: for an end-of-generation token)
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    #: prompt chunks not evaluated because `BatchRunner.preempt` was set (their KV is
    #: as before the step)
    preempted: tuple[int, ...] = ()


class BatchRunner:
    """Owns the llama model, context, batch and samplers; every method is blocking."""

    def __init__(
        self,
        path: Path,
        *,
        n_seq_max: int,
        n_ctx_seq: int,
        n_batch: int,
        n_outputs: int,
        n_threads: int,
        invariant: bool = False,
        flash_attn: bool = True,
    ) -> None:
        if n_seq_max > llama_cpp.llama_max_parallel_sequences():
            raise ModelLoadError(
                f"MAX_CONCURRENT_REQUESTS + PREFIX_CACHE_SEQUENCES = {n_seq_max} exceeds "
                f"llama.cpp's {llama_cpp.llama_max_parallel_sequences()} sequences"
            )
        _quiet_llama_logs()
        mparams = llama_cpp.llama_model_default_params()
        if invariant:
            _batch_invariant_kernels(mparams)
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"LLM_MODEL: cannot load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq_max
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_outputs_max = max(n_outputs, n_seq_max)  # llama.cpp reserves n_seq_max
        cparams.n_outputs_max_per_seq = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.kv_unified = False
        cparams.swa_full = True
        # Flash attention: 10-20 % more tok/s at 8 sequences. Not in batch-invariant mode:
        # its CPU kernel changes with the number of query rows of a prompt chunk.
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                                   if flash_attn and not invariant
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"cannot create a llama.cpp context for {path}")
        self._model = model
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        #: set from the trio thread: the prompt chunks of the step in flight that have
        #: not been evaluated yet are not (the one being evaluated stops at its next
        #: graph node); decode rows always run. Cleared before each step starts.
        self.preempt = AbortFlag(ctx)
        self._samplers: dict[int, Any] = {}  # handle -> llama.cpp sampler chain
        self._greedy: dict[int, _Greedy] = {}
        self._constraints: dict[int, Constraint] = {}  # handle -> its grammar's matcher
        #: llguidance's tokenizer for this model (`ModelText.constraint_tokenizer`), set
        #: before the first constrained sequence is added
        self.constraint_tokenizer: Any = None
        # handle -> bias and penalties for the log-probabilities of a sampled sequence
        # (a greedy one has them in `_greedy`)
        self._processors: dict[int, LogitProcessor] = {}
        self._candidates = np.empty(self._n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(self._n_vocab, dtype=np.intc)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(ctx)
        self.record_margins = False  # tests: how close each greedy pick was to a tie

    # --- one step ---

    def run(
        self, plan: StepPlan, sampling: Mapping[int, Sampling], *, snapshot: bool = False,
        early: Callable[[StepResult], None] | None = None,
    ) -> StepResult:
        """Apply the plan's KV ops, decode its batch once, sample. Never raises for a
        failed decode: the result carries the error and the KV is as llama.cpp left it.
        `snapshot`: also report which sequence ids hold cells afterwards. `early`: called
        (in this thread) with the tokens of each pass as soon as it has run, when more
        passes follow; the result returned holds only the last pass's."""
        result = self._run(plan, sampling, early)
        if snapshot:
            return replace(result, kv=self.kv_positions())
        return result

    def _run(self, plan: StepPlan, sampling: Mapping[int, Sampling],
             early: Callable[[StepResult], None] | None) -> StepResult:
        for handle in plan.released:
            self._greedy.pop(handle, None)
            self._processors.pop(handle, None)
            self._constraints.pop(handle, None)
            sampler = self._samplers.pop(handle, None)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        for op in plan.ops:
            if isinstance(op, SeqCopy):
                llama_cpp.llama_memory_seq_cp(self._mem, op.src, op.dst, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, op.dst, op.keep, -1)
            elif isinstance(op, SeqRemove):
                llama_cpp.llama_memory_seq_rm(self._mem, op.seq_id, -1, -1)
        final = self._new_result()
        preempted: list[int] = []
        # Prompt chunks first, in the plan's order, so that a prompt's first token can go
        # out (`early`) as soon as its own pass ends; the decode rows' tokens come at the
        # end of the step, as they would anyway. Except with pad rows: they sit at the
        # positions their ids hold when the step starts (a prompt chunk's id too), so
        # then the decode pass goes first.
        calls: list[tuple[list[BatchEntry], Sequence[PadRow]]] = [
            ([e], ()) for e in plan.entries if e.prefill]
        decoding = [e for e in plan.entries if not e.prefill]
        if decoding:
            calls.insert(0 if plan.pads else len(calls), (decoding, plan.pads))
        for i, (entries, pads) in enumerate(calls):
            prefill = entries[0].prefill
            if prefill and self.preempt.is_set():
                preempted.append(entries[0].handle)
                continue
            self.preempt.arm(prefill)
            out_index = self._decode(entries, pads)
            if out_index is None:  # a prompt chunk, preempted while it ran
                entry = entries[0]
                # llama.cpp dropped the chunk's cells (one ubatch: n_ubatch = n_batch);
                # cut at its start all the same, so n_past is true whatever it did.
                llama_cpp.llama_memory_seq_rm(self._mem, entry.seq_id, entry.pos, -1)
                preempted.append(entry.handle)
                continue
            if isinstance(out_index, str):
                return StepResult(sampled={}, pieces={}, error=out_index)
            if early is not None and out_index and i < len(calls) - 1:
                out = self._new_result()
                self._sample_rows(out_index, sampling, out)
                early(out)
            else:
                self._sample_rows(out_index, sampling, final)
        return replace(final, preempted=tuple(preempted))

    def _new_result(self) -> StepResult:
        return StepResult(sampled={}, pieces={}, logprobs={},
                          margins={} if self.record_margins else None)

    def _sample_rows(self, out_index: Mapping[int, int], sampling: Mapping[int, Sampling],
                     out: StepResult) -> None:
        """Sample the rows of the pass just decoded (before the next pass overwrites the
        logits) into `out`."""
        self._compute_masks(out_index, sampling)
        for handle, index in out_index.items():
            if out.margins is not None:
                out.margins[handle] = self._margin(index)
            token = self._sample(handle, sampling, index)
            eog = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)) or (
                handle in sampling and token in sampling[handle].stop_tokens
            )
            out.sampled[handle] = (token, eog)
            out.pieces[handle] = piece = b"" if eog else self._piece(token)
            s = sampling.get(handle)
            if s is not None and s.logprobs is not None and not eog:
                out.logprobs[handle] = self._logprob(handle, s, index, token, piece)

    def _decode(
        self, entries: Sequence[BatchEntry], pads: Sequence[PadRow]
    ) -> dict[int, int] | str | None:
        """One `llama_decode` of `entries` and `pads` (in seq_id order), then the pads'
        cells are dropped again. Returns handle -> logits row, an error message, or None
        if the abort flag stopped it."""
        batch = self._batch
        rows: list[BatchEntry | PadRow] = sorted([*entries, *pads], key=lambda r: r.seq_id)
        n = 0
        out_index: dict[int, int] = {}
        for row in rows:
            if isinstance(row, PadRow):
                batch.token[n], batch.pos[n], batch.logits[n] = PAD_TOKEN, row.pos, row.output
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, row.seq_id
                n += 1
                continue
            for k, token in enumerate(row.tokens):
                batch.token[n], batch.pos[n], batch.logits[n] = token, row.pos + k, 0
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, row.seq_id
                n += 1
            if row.sample:
                batch.logits[n - 1] = 1
                out_index[row.handle] = n - 1
        if n > self._n_batch:
            return f"batch of {n} tokens > {self._n_batch}"
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        for pad in pads:
            llama_cpp.llama_memory_seq_rm(self._mem, pad.seq_id, pad.pos, -1)
        if rc == ABORTED:
            return None
        return f"llama_decode returned {rc}" if rc != 0 else out_index

    def _logprob(self, handle: int, s: Sampling, index: int, token: int, piece: bytes
                 ) -> TokenLogprob:
        """`token`'s log-probabilities from logits row `index`, which a greedy sequence
        has already biased and penalised in place (`_Greedy.pick`); a sampled one's get
        the same here (llama.cpp's chain worked on a copy), and `token` is then counted
        for its next penalties, as the chain counted it."""
        logits = self._logits(index)
        processor = None
        if handle not in self._greedy:
            processor = self._processors.get(handle)
            if processor is None:
                processor = self._processors[handle] = _processor(s)
            processor.apply(logits)
        result = token_logprob(logits, token, s.logprobs or 0, self._piece, piece)
        if processor is not None:
            processor.accept(token)
        return result

    def _compute_masks(self, out_index: Mapping[int, int],
                       sampling: Mapping[int, Sampling]) -> None:
        """The token masks of the rows about to be sampled under a grammar (their
        matchers made at their first token), computed together (`compute_masks`)."""
        constrained = []
        for handle in out_index:
            s = sampling.get(handle)
            if s is None or s.grammar is None:
                continue
            constraint = self._constraints.get(handle)
            if constraint is None:
                if self.constraint_tokenizer is None:
                    raise EngineError("constrained decoding before its tokenizer was built")
                constraint = self._constraints[handle] = Constraint(
                    self.constraint_tokenizer, s.grammar, self._n_vocab)
            constrained.append(constraint)
        if constrained:
            compute_masks(constrained)

    def _sample(self, handle: int, sampling: Mapping[int, Sampling], index: int) -> int:
        greedy = self._greedy.get(handle)
        if greedy is None and handle not in self._samplers:
            s = sampling[handle]
            if s.temperature == 0:
                greedy = self._greedy[handle] = _Greedy.of(s)
            else:
                self._samplers[handle] = self._new_chain(s)
        constraint = self._constraints.get(handle)
        if constraint is not None:
            return self._sample_constrained(handle, greedy, constraint, index)
        if greedy is None:
            return int(llama_cpp.llama_sampler_sample(self._samplers[handle], self._ctx, index))
        return greedy.pick(self._logits(index))

    def _sample_constrained(self, handle: int, greedy: _Greedy | None,
                            constraint: Constraint, index: int) -> int:
        """Sample as if the tokens the grammar refuses had a logit of -inf (what
        llama.cpp's grammar sampler ahead of the chain does), from the mask computed
        for this step; the context's logits keep their values (log-probabilities are
        taken before the mask). Greedy: the best allowed token (`Constraint.argmax`);
        sampled: the chain over the masked logits, one draw of its seeded RNG."""
        logits = self._logits(index)
        if greedy is not None:
            greedy.processor.apply(logits)  # in place: the logits are ours until the next decode
            token = constraint.argmax(logits)
            greedy.processor.accept(token)
        else:
            chain = self._samplers[handle]
            cur = self._candidate_array(logits, constraint)
            token = self._apply(chain, cur)
            llama_cpp.llama_sampler_accept(chain, token)
        constraint.accept(token)
        return token

    def _candidate_array(self, logits: Logits, constraint: Constraint) -> Any:
        """Every token with its logit, -inf where `constraint` refuses it, as llama.cpp's
        candidate array (over our buffer)."""
        cand = self._candidates
        cand["id"] = self._ids
        constraint.masked(logits, out=cand["logit"])
        cand["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=self._n_vocab,
            selected=-1, sorted=False)

    @staticmethod
    def _apply(chain: Any, cur: Any) -> int:
        """Run a chain on a candidate array (without accepting): the token it selects."""
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        return int(cur.data[cur.selected].id)

    def _logits(self, index: int) -> Logits:
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,)
        )

    def _margin(self, index: int) -> float:
        top2 = np.partition(self._logits(index), -2)[-2:]
        return float(top2[1] - top2[0])

    def _new_chain(self, s: Sampling) -> Any:
        """For temperature != 0: the chain `Llama.generate` builds, so output matches
        `LlamaEngine`."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if s.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(s.logit_bias))(
                *(llama_cpp.llama_logit_bias(token, bias) for token, bias in s.logit_bias.items()))
            add(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        if (s.repeat_penalty > 1.0 and s.frequency_penalty >= 0 and s.presence_penalty >= 0
                and s.temperature > 0 and s.top_k > 0):
            # The penalty scan over the whole vocabulary (262k for Gemma) costs ~2 ms a
            # token. It only lowers the logits of at most PENALTY_LAST_N distinct tokens,
            # so the top (k + PENALTY_LAST_N) candidates hold every token the later
            # top-k can pick, in the same order: prefiltering changes nothing.
            add(llama_cpp.llama_sampler_init_top_k(PENALTY_LAST_N + s.top_k))
        add(llama_cpp.llama_sampler_init_penalties(
            self._n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty,
            s.presence_penalty))
        seed = RANDOM_SEED if s.seed is None else s.seed
        if s.temperature >= 0:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            add(llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1))
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # --- introspection and teardown ---

    def kv_positions(self) -> dict[int, tuple[int, int]]:
        """(pos_min, pos_max) of every sequence id that holds cells."""
        out = {}
        for seq_id in range(self.n_seq_max):
            hi = llama_cpp.llama_memory_seq_pos_max(self._mem, seq_id)
            if hi >= 0:
                out[seq_id] = (llama_cpp.llama_memory_seq_pos_min(self._mem, seq_id), hi)
        return out

    def close(self) -> None:
        for sampler in self._samplers.values():
            llama_cpp.llama_sampler_free(sampler)
        self._samplers.clear()
        self._constraints.clear()
        self._greedy.clear()
        if self._ctx is not None:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None


def _batch_invariant_kernels(mparams: Any) -> None:
    """Keep to the matmul kernels that compute a row the same way for any row count >= 2
    (docs/performance-batching.md): no repacked weights, and no "tiled" K-quant kernel,
    which ggml takes from 8 rows on. Its switch is an environment variable that ggml
    reads once per process, at the first matmul: this runs before ours."""
    mparams.use_extra_bufts = False
    os.environ["GGML_CPU_TILED_MM"] = "0"


def _quiet_llama_logs() -> None:
    """What `Llama(verbose=False)` does: llama.cpp logs errors only (process-wide)."""
    from llama_cpp import _logger

    _logger.set_verbose(False)


def check_fits(prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
    if prompt_tokens + max_tokens > n_ctx:
        raise EngineError("prompt and max_tokens do not fit the context window")


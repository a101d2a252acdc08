"""Continuous-batching bookkeeping with no I/O: which sequence feeds which tokens each step.

`BatchScheduler` knows nothing about trio or llama.cpp, so it is tested without a model.
It owns the sequence ids of one llama.cpp context (`n_seq_max = slots + cache_slots`):

* ids `0 .. slots-1` belong to running sequences. llama.cpp (non-unified KV) decodes a
  batch in one pass only over *consecutive* sequence ids, so a running sequence is moved
  down into a hole left by one that ended (`SeqCopy` + `SeqRemove`) when nobody waits to
  fill it: one full-stream copy instead of an extra forward pass on every later step.
* choices of one prompt (`add_choices`): the first sequence evaluates the prompt; each
  other one waits (`FORK`) until that KV holds all but the prompt's last two tokens,
  starts from a copy of it, and evaluates those two itself (never a lone token: see
  `_chunk`), sampling its own first token. n choices cost one prompt evaluation plus
  2 (n - 1) tokens.
* ids `slots ..` hold the prefix cache: the KV of finished sequences, keyed by their
  tokens, least recently used first. A new prompt that shares at least `min_reuse_tokens`
  with an entry starts from a copy of it and evaluates only the rest.
* in batch-invariant mode (`invariant=True`) each plan also carries pad rows (`_pads`),
  and a spare id is added if there would be no neighbour for one.

Each `plan()` returns a `StepPlan`: KV operations to apply in order, then one batch
within a per-step token budget (`step_tokens`): one token per decoding sequence first,
then prompt chunks of newly admitted sequences fill what is left (at least
`min_prefill_tokens`, so prompts never starve behind many decoders). A long prompt is
spread over steps, so no step is much longer than a decode step plus one budget's worth
of prompt: that bounds the inter-token latency a prefill adds to the running streams.
`complete()` records what the step sampled.

Who gets the prompt budget first (`_prefill_order`), like admission's fair queue: the
prompts of the highest priority class (`rank`, 0 first), then of the principal served
least, then in arrival order. "Served" counts the tokens each principal's sequences had
evaluated (prompt chunks and decode rows), start-time fair queueing style: a principal
that becomes active again starts no lower than one budget (`step_tokens`) below the
least-served active principal and no higher than the most served, so idle time earns a
short head start, never a long one, and old service costs nothing (`_activate`; the
counts survive a moment with no sequence at all, which does not make everyone equal
again). So a light key's new prompt goes into the next step whole
(if it fits) ahead of heavy keys' prompts. A prompt passed over for
`max_prefill_skips` plans in a row goes first (oldest first): class and service order
never starve a prompt. Without principals or classes the order is arrival order.

A step is not interrupted for the order, with one exception: a prompt that arrives while
a step evaluates another principal's prompt chunks, and is ahead of each of them by a
class or by a step budget of service (an idle principal against busy ones), preempts
them (`preempts`): the engine sets the runner's abort flag, the chunk being evaluated
stops at its next graph node and the others are not started, and `complete()` gives
them back their place. The new prompt then goes into the next step instead of waiting
for a pass of up to a budget's worth of someone else's prompt. Each sequence is
preempted at most once.

Only the first prompt in that order may be cut into a chunk; the budget left after it
goes to prompts that fit in it whole. Each prompt chunk is a forward pass of its own
(see `batch_step`), so a leftover piece of another prompt would cost one more pass
(its rest needs one later anyway) and lengthen the step that carries the first prompt
to its first token: a short prompt that arrives while heavy prompts wait then gets a
step of the decode rows and itself alone.

A sequence released at any time (finished, cancelled) gets its KV ops queued for the
*next* plan, so the context is only ever touched by the step that applies a plan.

There is no waiting line here: the scheduler holds at most `slots` sequences (`add()`
beyond that raises `SchedulerFull`); queueing is admission's job, sized from `slots`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

FinishReason = Literal["stop", "length"]
#: Idle principals whose service count `BatchScheduler` keeps (`_activate`).
MAX_REMEMBERED = 64


class Phase(Enum):
    WAITING = "waiting"  # added; gets its sequence id at the next plan
    FORK = "fork"  # has an id; waits for the first choice's prompt KV to copy
    PREFILL = "prefill"  # prompt partly evaluated
    DECODE = "decode"  # sampling one token per step
    DONE = "done"  # ended by itself or by `finish()`; waits for `release()`
    FAILED = "failed"  # the step that carried it failed


class SchedulerFull(RuntimeError):
    """`add()` with every slot taken: the caller admitted more than `slots` sequences."""


@dataclass(frozen=True, slots=True)
class SeqRemove:
    """Drop every KV cell of `seq_id`."""

    seq_id: int


@dataclass(frozen=True, slots=True)
class SeqCopy:
    """Copy the whole KV stream `src` to `dst`, then drop positions >= `keep` in `dst`."""

    src: int
    dst: int
    keep: int


KvOp = SeqRemove | SeqCopy


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchEntry:
    """Tokens of one sequence in one step, at positions `pos ..`; `sample`: logits wanted.
    A `prefill` entry (a prompt chunk) is decoded in a `llama_decode` of its own."""

    handle: int
    seq_id: int
    tokens: tuple[int, ...]
    pos: int
    sample: bool
    prefill: bool = False


@dataclass(frozen=True, slots=True)
class PadRow:
    """A throw-away token at `pos` of `seq_id`, decoded with the decode rows and removed
    right after (batch-invariant mode): it makes the decode rows one run of consecutive
    ids with at least two rows, so every step uses the same matmul kernels."""

    seq_id: int
    pos: int
    output: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPlan:
    ops: tuple[KvOp, ...]
    #: decode rows sorted by seq_id, then prompt chunks in the order they are evaluated
    entries: tuple[BatchEntry, ...]
    released: tuple[int, ...]  # handles whose per-sequence state (sampler) can be freed
    pads: tuple[PadRow, ...] = ()  # sorted by seq_id

    @property
    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    @property
    def empty(self) -> bool:
        return not (self.ops or self.entries or self.released)


@dataclass(frozen=True, slots=True)
class Sampled:
    """What a step produced for one sequence; `finish` is set when it ended by itself."""

    handle: int
    token: int
    eog: bool
    finish: FinishReason | None


@dataclass(slots=True)
class _Seq:
    handle: int
    prompt: tuple[int, ...]
    max_tokens: int
    scope: str | None = None  # whose prefix cache it may read and fill (None: shared)
    principal: str | None = None  # whose service it counts as (fair prompt order)
    rank: int = 0  # priority class, 0 first
    phase: Phase = Phase.WAITING
    seq_id: int | None = None
    n_past: int = 0  # tokens of (prompt + generated) held in the KV cache
    generated: list[int] = field(default_factory=list)
    backlog: int = 0  # sampled tokens the consumer has not taken yet
    reused: int = 0  # prompt tokens taken from the prefix cache
    parent: int | None = None  # choices: the handle whose prompt KV this one copies
    skipped: int = 0  # plans in a row that gave this prefilling sequence no tokens
    preempted: bool = False  # a chunk of its prompt was preempted (never twice)

    def tokens(self) -> tuple[int, ...]:
        return (self.prompt + tuple(self.generated))[: self.n_past]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerStats:
    steps: int
    batch_tokens_last: int
    batch_seqs_last: int
    batch_seqs_mean: float
    batch_seqs_max: int
    batch_sizes: dict[int, int]  # sequences per step -> how many steps had that many
    prompt_tokens_evaluated: int
    prompt_tokens_reused: int
    prompt_tokens_shared: int  # copied from the first choice of the same request
    prefix_hits: int
    kv_copies: int
    prompt_chunks_preempted: int
    running: int
    waiting: int
    cached: int
    kv_cells_used: int  # KV cells the running sequences and the cache entries hold


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (binary search on C-speed slice compares)."""
    a, b = tuple(a), tuple(b)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BatchScheduler:
    """Sequences, their ids and the prefix cache; `plan()`/`complete()` bracket each step.

    Not thread-safe: call it from one thread (the trio thread), never during the worker
    step except `release()`/`finish()`/`consumed()`, which only queue work for `plan()`.
    """

    def __init__(
        self,
        *,
        slots: int,
        cache_slots: int = 0,
        step_tokens: int = 128,
        min_prefill_tokens: int | None = None,
        max_backlog: int = 4,
        min_reuse_tokens: int = 32,
        invariant: bool = False,
        max_prefill_skips: int = 4,
    ) -> None:
        if (slots < 1 or cache_slots < 0 or step_tokens < 1 or max_backlog < 1
                or max_prefill_skips < 1):
            raise ValueError("slots, step_tokens, max_backlog and max_prefill_skips "
                             "must be >= 1")
        self.slots = slots
        self.cache_slots = cache_slots
        self.step_tokens = step_tokens
        # Prompt tokens a step takes even when decode rows fill the budget.
        self.min_prefill_tokens = max(2, step_tokens // 4 if min_prefill_tokens is None
                                      else min_prefill_tokens)
        self.max_backlog = max_backlog
        self.min_reuse_tokens = max(1, min_reuse_tokens)
        self.invariant = invariant
        self.max_prefill_skips = max_prefill_skips
        self._seqs: dict[int, _Seq] = {}
        # principal -> tokens its sequences had evaluated (see the module doc and
        # `_activate`)
        self._served: dict[str | None, int] = {}
        self._waiting: deque[int] = deque()
        self._running: dict[int, int] = {}  # seq_id -> handle, ids < slots
        # seq_id -> (scope, tokens), LRU; a prefix is reused only within its scope
        self._cache: OrderedDict[int, tuple[str | None, tuple[int, ...]]] = OrderedDict()
        self._ops: list[KvOp] = []
        self._released: list[int] = []
        self._next_handle = 0
        self._in_flight = False
        self._completed_early: set[int] = set()  # handles of the step in flight, recorded early
        # statistics
        self._steps = 0
        self._batch_tokens_last = 0
        self._batch_seqs_last = 0
        self._batch_seqs_sum = 0
        self._batch_sizes: dict[int, int] = {}  # sequences per step -> steps
        self._batch_seqs_max = 0
        self._prompt_evaluated = 0
        self._prompt_reused = 0
        self._prompt_shared = 0
        self._prefix_hits = 0
        self._copies = 0
        self._preempted = 0

    @property
    def max_batch_tokens(self) -> int:
        """Most tokens one plan's entries can hold (for sizing the llama.cpp batch): every
        slot decoding, plus the prompt budget, plus one token of `_chunk`'s rounding."""
        return self.slots + max(self.step_tokens, self.min_prefill_tokens) + 1

    @property
    def n_seq_max(self) -> int:
        """Running ids, cache ids, and in batch-invariant mode a spare id when there would
        be no neighbour for a pad row."""
        spare = self.invariant and self.slots + self.cache_slots < 2
        return self.slots + self.cache_slots + spare

    # --- sequences come and go ---

    def add(self, prompt: Sequence[int], max_tokens: int, *, scope: str | None = None,
            principal: str | None = None, rank: int = 0) -> int:
        """Register a sequence; it gets an id (and maybe a cached prefix) at the next plan.

        `scope` isolates the prefix cache: the sequence reuses only KV that sequences of
        the same scope left, and what it leaves is reused only by them (a principal's
        prompts never speed up another principal's: no timing side channel).
        `principal` and `rank` (its priority class, 0 first) order the prompt budget
        (see the module doc); None and 0 for every sequence: arrival order.

        Raises `SchedulerFull` if `slots` sequences are already registered (released ones
        do not count): queueing is the caller's job.
        """
        if not prompt:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(self._seqs) >= self.slots:
            raise SchedulerFull(f"all {self.slots} slots are taken")
        return self.add_choices(prompt, max_tokens, 1, scope=scope, principal=principal,
                                rank=rank)[0]

    def add_choices(
        self, prompt: Sequence[int], max_tokens: int, n: int, *, scope: str | None = None,
        principal: str | None = None, rank: int = 0,
    ) -> list[int]:
        """Register `n` sequences of one prompt (a request's choices): the first
        evaluates it, the others copy its KV (see the module doc). All or none: raises
        `SchedulerFull` if fewer than `n` slots are free."""
        if not prompt:
            raise ValueError("empty prompt")
        if max_tokens < 1 or n < 1:
            raise ValueError("max_tokens and n must be >= 1")
        if len(self._seqs) + n > self.slots:
            raise SchedulerFull(f"{n} sequence(s) do not fit: "
                                f"{len(self._seqs)} of {self.slots} slots are taken")
        self._activate(principal)
        handles = list(range(self._next_handle, self._next_handle + n))
        self._next_handle += n
        for handle in handles:
            parent = handles[0] if handle != handles[0] and len(prompt) > 2 else None
            self._seqs[handle] = _Seq(handle, tuple(prompt), max_tokens, scope,
                                      principal, rank, parent=parent)
            self._waiting.append(handle)
        return handles

    def _activate(self, principal: str | None) -> None:
        """`principal` gets a sequence. If it had none, its service count is brought into
        the active principals' range: no lower than one budget below the least served
        (what it did not use while idle earns it at most one budget's head start), no
        higher than the most served (what it used long ago costs it nothing now).

        The counts outlive a moment without sequences: when every stream ends at once
        and the next requests are on their way, the principals are not made equal
        again, so a light principal arriving then is still ahead of heavy ones."""
        active = {seq.principal for seq in self._seqs.values()}
        if principal in active:
            return
        if not active:
            return
        counts = [self._served.get(p, 0) for p in active]
        floor = min(counts) - self.step_tokens
        self._served[principal] = min(max(self._served.get(principal, 0), floor), max(counts))
        # Idle principals at or below the floor would be lifted to it anyway: forget them;
        # and all idle ones if the table grows past MAX_REMEMBERED.
        crowded = len(self._served) > MAX_REMEMBERED
        for p in [p for p, n in self._served.items()
                  if (n <= floor or crowded) and p not in active and p != principal]:
            del self._served[p]

    def finish(self, handle: int) -> None:
        """The consumer saw a stop string: decode no more for this sequence."""
        seq = self._seqs.get(handle)
        if seq is not None and seq.phase in (Phase.PREFILL, Phase.DECODE, Phase.WAITING,
                                             Phase.FORK):
            seq.phase = Phase.DONE

    def consumed(self, handle: int, n: int = 1) -> None:
        seq = self._seqs.get(handle)
        if seq is not None:
            seq.backlog = max(0, seq.backlog - n)

    def release(self, handle: int, *, cache: bool = True) -> None:
        """The stream ended (any reason). Its KV goes to the prefix cache (if `cache` and it
        can be reused) or is dropped; either way by the ops of the next plan."""
        seq = self._seqs.pop(handle, None)
        if seq is None:
            return
        self._released.append(handle)
        if seq.seq_id is None:
            self._waiting.remove(handle)
            return
        seq_id = seq.seq_id
        del self._running[seq_id]
        if cache and seq.phase is not Phase.FAILED:
            self._park(seq_id, seq.scope, seq.tokens())
        self._ops.append(SeqRemove(seq_id))

    def _park(self, seq_id: int, scope: str | None, tokens: tuple[int, ...]) -> None:
        if self.cache_slots == 0 or len(tokens) < self.min_reuse_tokens:
            return
        target: int | None = None
        for cid, (cached_scope, cached) in list(self._cache.items()):
            if cached_scope != scope:
                continue
            n = common_prefix(cached, tokens)
            if n == len(tokens):
                self._cache.move_to_end(cid)  # the new one adds nothing
                return
            if n == len(cached) and target is None:
                target = cid  # the cached one is a prefix of the new one: replace it
        if target is None:
            free = sorted(set(range(self.slots, self.slots + self.cache_slots))
                          - set(self._cache))
            target = free[0] if free else next(iter(self._cache))  # else evict the LRU
        self._cache.pop(target, None)
        self._cache[target] = (scope, tokens)
        self._ops.append(SeqCopy(seq_id, target, len(tokens)))
        self._copies += 1

    # --- steps ---

    def needs_step(self) -> bool:
        """True if a plan would do something (ops, a batch)."""
        return not self._peek_empty()

    def _peek_empty(self) -> bool:
        if self._ops or self._released:
            return False
        if self._waiting:
            return False
        return not any(self._schedulable(s) for s in self._seqs.values())

    def _schedulable(self, seq: _Seq) -> bool:
        if seq.phase is Phase.PREFILL:
            return True
        if seq.phase is Phase.FORK:
            return self._fork_source(seq) is not None
        return seq.phase is Phase.DECODE and seq.backlog < self.max_backlog

    def _fork_source(self, seq: _Seq) -> _Seq | None:
        """The sequence whose KV a waiting choice can copy now (its first choice, once
        that holds all of the prompt but the last two tokens); else None. A first
        choice that is gone or failed leaves it nothing to copy: `_forks` then has it
        evaluate the prompt itself."""
        parent = self._seqs.get(seq.parent) if seq.parent is not None else None
        if parent is None or parent.phase is Phase.FAILED or parent.seq_id is None:
            return seq if parent is None or parent.phase is Phase.FAILED else None
        return parent if parent.n_past >= len(seq.prompt) - 2 else None

    def plan(self, *, ops_only: bool = False) -> StepPlan:
        """Admit waiting sequences, compact ids, build the batch. `ops_only`: KV ops only."""
        if self._in_flight:
            raise RuntimeError("a step is already in flight")
        entries: list[BatchEntry] = []
        if not ops_only:
            self._admit()
            self._compact()
            self._forks()
            entries = self._build_batch()
        pads = self._pads(entries) if self.invariant else ()
        plan = StepPlan(ops=tuple(self._ops), entries=tuple(entries),
                        released=tuple(self._released), pads=pads)
        self._ops.clear()
        self._released.clear()
        self._in_flight = True
        return plan

    def _admit(self) -> None:
        while self._waiting:  # `add()` keeps len(_seqs) <= slots: there is a free id
            handle = self._waiting.popleft()
            seq = self._seqs[handle]
            seq_id = min(set(range(self.slots)) - set(self._running))
            self._running[seq_id] = handle
            seq.seq_id = seq_id
            if seq.phase is Phase.WAITING and seq.parent is not None:
                seq.phase = Phase.FORK  # `_forks` gives it its first choice's prompt KV
                continue
            seq.phase = Phase.PREFILL if seq.phase is Phase.WAITING else seq.phase
            best_id, best = None, 0
            for cid, (cached_scope, cached) in self._cache.items():
                if cached_scope != seq.scope:
                    continue
                n = common_prefix(cached, seq.prompt)
                if n > best:
                    best_id, best = cid, n
            keep = min(best, len(seq.prompt) - 2)  # leave a chunk of two (see _chunk)
            if best_id is not None and keep >= self.min_reuse_tokens:
                self._cache.move_to_end(best_id)
                self._ops.append(SeqCopy(best_id, seq_id, keep))
                seq.n_past = seq.reused = keep
                self._prompt_reused += keep
                self._prefix_hits += 1
                self._copies += 1

    def _compact(self) -> None:
        """Move the highest live sequences down into holes, so ids stay consecutive.

        Sequences that are done (waiting for their consumer to release them) stay put:
        they leave soon, and copying them would be wasted.
        """
        while True:
            live = [i for i, h in self._running.items()
                    if self._seqs[h].phase in (Phase.PREFILL, Phase.DECODE)]
            if not live:
                return
            src = max(live)
            holes = sorted(set(range(src)) - set(self._running))
            if not holes:
                return
            dst = holes[0]
            handle = self._running.pop(src)
            seq = self._seqs[handle]
            self._ops += [SeqCopy(src, dst, seq.n_past), SeqRemove(src)]
            self._copies += 1
            self._running[dst] = handle
            seq.seq_id = dst

    def _forks(self) -> None:
        """Waiting choices whose first choice now holds the prompt's KV (all of it but
        the last two tokens) start from a copy of it (after this plan's compaction, so
        the ids are the ones the step sees)."""
        for seq in self._seqs.values():
            if seq.phase is not Phase.FORK:
                continue
            source = self._fork_source(seq)
            if source is None:
                continue
            seq.phase = Phase.PREFILL
            if source is seq:  # nothing to copy: evaluate the prompt itself
                continue
            assert source.seq_id is not None and seq.seq_id is not None
            keep = len(seq.prompt) - 2
            self._ops.append(SeqCopy(source.seq_id, seq.seq_id, keep))
            seq.n_past = keep
            self._prompt_shared += keep
            self._copies += 1

    def _build_batch(self) -> list[BatchEntry]:
        """Decode rows first (one token each, by id), then prompt chunks in the budget
        left, in `_prefill_order` (the order the runner evaluates them): the first
        prompt as much as fits, the others only whole."""
        entries: list[BatchEntry] = []
        by_id = sorted(self._running.items())
        for _, handle in by_id:
            seq = self._seqs[handle]
            if seq.phase is Phase.DECODE and seq.backlog < self.max_backlog:
                assert seq.seq_id is not None
                entries.append(BatchEntry(handle=handle, seq_id=seq.seq_id,
                                          tokens=(seq.generated[-1],), pos=seq.n_past,
                                          sample=True))
        for entry in entries:
            self._serve(self._seqs[entry.handle].principal, 1)
        budget = max(self.step_tokens - len(entries), self.min_prefill_tokens)
        first = True
        for seq in self._prefill_order():
            assert seq.seq_id is not None
            remaining = len(seq.prompt) - seq.n_past
            take = _chunk(remaining, budget)
            if take == 0 or (take < remaining and not first):
                seq.skipped += 1
                continue
            first = False
            seq.skipped = 0
            budget = max(0, budget - take)
            self._serve(seq.principal, take)
            chunk = seq.prompt[seq.n_past : seq.n_past + take]
            last = seq.n_past + take == len(seq.prompt)
            entries.append(BatchEntry(handle=seq.handle, seq_id=seq.seq_id, tokens=chunk,
                                      pos=seq.n_past, sample=last, prefill=True))
        return entries

    def _prefill_order(self) -> list[_Seq]:
        """Prefilling sequences in the order they get the prompt budget: those passed
        over `max_prefill_skips` plans in a row first (oldest first), then by priority
        class, by their principal's service count, and in arrival order (handles grow
        with time)."""
        prefilling = [self._seqs[h] for h in self._running.values()
                      if self._seqs[h].phase is Phase.PREFILL]

        def key(seq: _Seq) -> tuple[int, int, int, int]:
            if seq.skipped >= self.max_prefill_skips:
                return (0, 0, 0, seq.handle)
            return (1, seq.rank, self._served.get(seq.principal, 0), seq.handle)

        return sorted(prefilling, key=key)

    def _serve(self, principal: str | None, tokens: int) -> None:
        self._served[principal] = self._served.get(principal, 0) + tokens

    def _pads(self, entries: Sequence[BatchEntry]) -> tuple[PadRow, ...]:
        """Pad rows for the ids between the lowest and highest decoding id that are not
        decoding (free, prefilling, paused or done: each gets a token at its next
        position, removed after the step), and a neighbour with logits when only one
        sequence decodes. Then the decode rows are always one ubatch of >= 2 rows."""
        ids = [e.seq_id for e in entries if not e.prefill]
        if not ids:
            return ()
        lo, hi = min(ids), max(ids)
        pads = [PadRow(i, self._next_pos(i), False) for i in range(lo, hi) if i not in ids]
        if lo == hi:
            neighbour = lo + 1 if lo + 1 < self.n_seq_max else lo - 1
            pads.append(PadRow(neighbour, self._next_pos(neighbour), True))
        return tuple(sorted(pads, key=lambda p: p.seq_id))

    def _next_pos(self, seq_id: int) -> int:
        """The position after the cells `seq_id` holds once this plan's ops are applied."""
        handle = self._running.get(seq_id)
        if handle is not None:
            return self._seqs[handle].n_past
        entry = self._cache.get(seq_id)
        return 0 if entry is None else len(entry[1])

    def preempts(self, plan: StepPlan, handle: int) -> bool:
        """Whether the new sequence `handle` should stop the prompt chunks of `plan`,
        the step in flight (`BatchRunner.preempt`): when its prompt is ahead of each of
        theirs in the prompt order by a class, or by at least a step budget of service
        (a principal that was idle, see `_activate`, against busy ones). Then it does
        not wait for another principal's prompt pass to end before its own. A sequence's
        prompt is preempted at most once, so the cost is bounded: at most one chunk
        evaluated twice per sequence, and no prompt waits for ever."""
        new = self._seqs.get(handle)
        chunks = [seq for e in plan.entries
                  if e.prefill and (seq := self._seqs.get(e.handle)) is not None]
        if new is None or not chunks:
            return False
        served = self._served.get(new.principal, 0)
        for seq in chunks:
            if seq.preempted or seq.principal == new.principal:
                return False
            if new.rank > seq.rank or (new.rank == seq.rank and served + self.step_tokens
                                       > self._served.get(seq.principal, 0)):
                return False
        return True

    def complete(self, plan: StepPlan, sampled: Mapping[int, tuple[int, bool]],
                 preempted: Iterable[int] = (), *, early: bool = False) -> list[Sampled]:
        """Record a finished step: `sampled[handle] = (token, is_end_of_generation)`;
        `preempted`: handles whose prompt chunk was not evaluated (they keep their place
        in the prompt, and the chunk no longer counts as service).

        `early`: the step is still in flight and these are the tokens of one of its
        passes (`BatchRunner.run(early=...)`): only their entries are recorded now, and
        the step's own `complete()` skips them."""
        if not early:
            self._in_flight = False
            self._record_stats(plan)
        out: list[Sampled] = []
        skip = set(preempted)
        for entry in plan.entries:
            if entry.handle in self._completed_early or (early and entry.handle not in sampled):
                continue
            seq = self._seqs.get(entry.handle)
            if seq is None:  # released while the step ran; its KV is already queued to go
                continue
            if entry.handle in skip:
                seq.preempted = True
                self._preempted += 1
                self._serve(seq.principal, -len(entry.tokens))
                continue
            seq.n_past = entry.pos + len(entry.tokens)
            if seq.phase is Phase.PREFILL:
                self._prompt_evaluated += len(entry.tokens)
            if not entry.sample or seq.phase not in (Phase.PREFILL, Phase.DECODE):
                continue
            token, eog = sampled[entry.handle]
            seq.generated.append(token)
            seq.backlog += 1
            finish: FinishReason | None = None
            if eog:
                finish = "stop"
            elif len(seq.generated) >= seq.max_tokens:
                finish = "length"
            seq.phase = Phase.DONE if finish else Phase.DECODE
            out.append(Sampled(entry.handle, token, eog, finish))
        if early:
            self._completed_early.update(sampled)
        else:
            self._completed_early.clear()
        return out

    def fail(self, plan: StepPlan) -> list[int]:
        """The step failed: every sequence it carried fails; their KV is dropped."""
        self._in_flight = False
        self._completed_early.clear()
        failed = []
        for entry in plan.entries:
            seq = self._seqs.get(entry.handle)
            if seq is not None:
                seq.phase = Phase.FAILED
                failed.append(entry.handle)
        return failed

    # --- introspection ---

    def phase(self, handle: int) -> Phase | None:
        seq = self._seqs.get(handle)
        return None if seq is None else seq.phase

    def seq_id(self, handle: int) -> int | None:
        seq = self._seqs.get(handle)
        return None if seq is None else seq.seq_id

    def reused(self, handle: int) -> int:
        seq = self._seqs.get(handle)
        return 0 if seq is None else seq.reused

    def n_generated(self, handle: int) -> int:
        seq = self._seqs.get(handle)
        return 0 if seq is None else len(seq.generated)

    def generated(self, handle: int) -> list[int]:
        seq = self._seqs.get(handle)
        return [] if seq is None else list(seq.generated)

    def running_ids(self) -> dict[int, int]:
        return dict(self._running)

    def cached(self) -> dict[int, tuple[int, ...]]:
        """Prefix cache (the tokens each cache id holds), least recently used first."""
        return {cid: tokens for cid, (_, tokens) in self._cache.items()}

    def _record_stats(self, plan: StepPlan) -> None:
        if not plan.entries:
            return
        self._steps += 1
        n = len(plan.entries)
        self._batch_tokens_last = plan.n_tokens
        self._batch_seqs_last = n
        self._batch_seqs_sum += n
        self._batch_sizes[n] = self._batch_sizes.get(n, 0) + 1
        self._batch_seqs_max = max(self._batch_seqs_max, n)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            steps=self._steps,
            batch_tokens_last=self._batch_tokens_last,
            batch_seqs_last=self._batch_seqs_last,
            batch_seqs_mean=round(self._batch_seqs_sum / self._steps, 3) if self._steps else 0.0,
            batch_seqs_max=self._batch_seqs_max,
            batch_sizes=dict(sorted(self._batch_sizes.items())),
            prompt_tokens_evaluated=self._prompt_evaluated,
            prompt_tokens_reused=self._prompt_reused,
            prompt_tokens_shared=self._prompt_shared,
            prefix_hits=self._prefix_hits,
            kv_copies=self._copies,
            prompt_chunks_preempted=self._preempted,
            running=len(self._running),
            waiting=len(self._waiting),
            cached=len(self._cache),
            kv_cells_used=sum(self._seqs[h].n_past for h in self._running.values())
            + sum(len(tokens) for _, tokens in self._cache.values()),
        )


def _chunk(remaining: int, budget: int) -> int:
    """Prompt tokens to evaluate now: at most `budget`, but never a lone token while more
    follow, nor a lone last one (take it with the chunk before, one over budget). A
    one-token chunk goes through other matmul kernels than a longer one (ggml picks them
    by row count), so avoiding it keeps prefix reuse identical to a cold run."""
    if remaining <= 1:
        return remaining
    take = min(budget, remaining)
    if remaining - take == 1:
        take += 1
    return take if take >= 2 else 0


def runs(ids: Iterable[int]) -> int:
    """Number of runs of consecutive ids (llama.cpp forward passes for one batch)."""
    s = sorted(set(ids))
    return sum(1 for i, x in enumerate(s) if i == 0 or s[i - 1] != x - 1)

"""The continuous-batching scheduler, with no model: plans checked against a fake KV cache.

`FakeKV` applies a plan the way `BatchRunner` does (ops in order, then the batch) and
checks that every batch entry continues exactly the tokens its sequence id holds, so the
id juggling (compaction, prefix-cache copies, releases mid-step) is verified end to end.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from fabricai_trio.engine.batch_scheduler import (
    BatchScheduler,
    Phase,
    Sampled,
    SchedulerFull,
    SeqCopy,
    SeqRemove,
    StepPlan,
    common_prefix,
    runs,
)

EOG = -1


class FakeKV:
    """Token lists per sequence id; `run()` mimics BatchRunner.run and samples tokens."""

    def __init__(self, n_seq: int) -> None:
        self.cells: dict[int, list[int]] = {i: [] for i in range(n_seq)}
        self.next_token = 1000

    def apply(
        self, plan: StepPlan, *, eog: frozenset[int] = frozenset(),
        preempted: frozenset[int] = frozenset(),
    ) -> dict[int, tuple[int, bool]]:
        """`preempted`: handles whose prompt chunk is not evaluated (BatchRunner.preempt)."""
        for op in plan.ops:
            if isinstance(op, SeqCopy):
                self.cells[op.dst] = list(self.cells[op.src][: op.keep])
            else:
                self.cells[op.seq_id] = []
        ids = [e.seq_id for e in plan.entries]
        decoding = [e.seq_id for e in plan.entries if not e.prefill]
        assert decoding == sorted(decoding) and len(set(ids)) == len(ids)
        assert ids[: len(decoding)] == decoding  # decode rows first, then prompt chunks
        self.check_pads(plan)
        sampled = {}
        for e in plan.entries:
            assert len(self.cells[e.seq_id]) == e.pos, "entry does not continue its KV"
            if e.handle in preempted:
                assert e.prefill, "only prompt chunks are preempted"
                continue
            self.cells[e.seq_id] += e.tokens
            if e.sample:
                self.next_token += 1
                sampled[e.handle] = (self.next_token, e.handle in eog)
        return sampled

    def check_pads(self, plan: StepPlan) -> None:
        """Pad rows continue their id's KV (they are dropped after the step, so they leave
        no trace here), and with them the decode rows are one run of >= 2 ids, >= 2 of
        them with logits, and never a one-token prompt chunk while more follow."""
        if not plan.pads:
            return
        decode = [e for e in plan.entries if not e.prefill]
        pad_ids = [p.seq_id for p in plan.pads]
        assert pad_ids == sorted(pad_ids) and not set(pad_ids) & {e.seq_id for e in decode}
        for pad in plan.pads:
            assert len(self.cells[pad.seq_id]) == pad.pos, "pad does not continue its KV"
        ids = sorted([e.seq_id for e in decode] + pad_ids)
        assert len(ids) >= 2 and runs(ids) == 1
        assert len(decode) + sum(p.output for p in plan.pads) >= 2



def assert_kv_holds_prompts_and_tokens(s: BatchScheduler, kv: FakeKV,
                                       prompts: Mapping[int, tuple[int, ...]]) -> None:
    """Every running sequence's cells are a prefix of its prompt and sampled tokens."""
    for seq_id, h in s.running_ids().items():
        if s.phase(h) in (Phase.PREFILL, Phase.DECODE):
            held = kv.cells[seq_id]
            assert tuple(held) == (prompts[h] + tuple(s.generated(h)))[: len(held)]


def release_done(s: BatchScheduler, live: list[int], rng: random.Random) -> None:
    """Release about half of the finished sequences (the others' consumers lag)."""
    for h in list(live):
        if s.phase(h) is Phase.DONE and rng.random() < 0.5:
            live.remove(h)
            s.release(h)


def release_all(s: BatchScheduler, kv: FakeKV, live: list[int]) -> None:
    """Release every live sequence and apply the plan that frees them: nothing runs."""
    for h in live:
        s.release(h)
    plan = s.plan(ops_only=True)
    kv.apply(plan)
    s.complete(plan, {})
    assert s.running_ids() == {}

def step(s: BatchScheduler, kv: FakeKV, **kw: frozenset[int]) -> tuple[StepPlan, list[Sampled]]:
    plan = s.plan()
    return plan, s.complete(plan, kv.apply(plan, **kw))


def test_prefill_in_chunks_then_one_token_per_step_until_length() -> None:
    s, kv = BatchScheduler(slots=2, step_tokens=4), FakeKV(2)
    h = s.add(list(range(10)), max_tokens=3)
    plans = [step(s, kv) for _ in range(5)]
    assert [p.entries[0].tokens for p, _ in plans[:3]] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [p.entries[0].sample for p, _ in plans[:3]] == [False, False, True]
    sampled = [out[0] for _, out in plans[2:]]
    assert [x.finish for x in sampled] == [None, None, "length"]
    # Each decode step feeds the previously sampled token at the next position.
    assert plans[3][0].entries[0].tokens == (sampled[0].token,)
    assert plans[3][0].entries[0].pos == 10
    assert s.phase(h) is Phase.DONE
    assert not s.needs_step() or s.plan().entries == ()


def test_end_of_generation_stops_and_is_not_fed_back() -> None:
    s, kv = BatchScheduler(slots=1), FakeKV(1)
    h = s.add([1, 2, 3], max_tokens=10)
    _, out = step(s, kv, eog=frozenset({h}))
    assert out[0].eog and out[0].finish == "stop"
    assert s.phase(h) is Phase.DONE
    s.release(h, cache=False)
    plan = s.plan()
    assert plan.entries == () and plan.ops == (SeqRemove(0),) and plan.released == (h,)


def test_decoding_sequences_go_first_and_prefill_shares_one_budget() -> None:
    s, kv = BatchScheduler(slots=4, step_tokens=6), FakeKV(4)
    a = s.add([1, 2], max_tokens=50)
    step(s, kv)  # a is decoding now: its row leaves 5 of the 6 tokens for prompts
    b = s.add(list(range(8)), max_tokens=50)
    c = s.add(list(range(8)), max_tokens=50)
    plan, _ = step(s, kv)
    by_handle = {e.handle: e for e in plan.entries}
    assert len(by_handle[a].tokens) == 1  # decoding streams never wait for a prompt
    assert len(by_handle[b].tokens) == 5 and c not in by_handle  # the prompt budget is 5
    plan, _ = step(s, kv)
    by_handle = {e.handle: e for e in plan.entries}
    assert len(by_handle[a].tokens) == 1
    assert by_handle[b].tokens == (5, 6, 7) and by_handle[b].sample
    # Only the first prompt is cut: a piece of c would be one more forward pass in this
    # step (c needs one later anyway); it waits for a budget of its own.
    assert c not in by_handle and plan.n_tokens == 1 + 3
    plan, _ = step(s, kv)
    by_handle = {e.handle: e for e in plan.entries}
    assert by_handle[c].tokens == (0, 1, 2, 3) and len(by_handle[b].tokens) == 1


def test_join_and_leave_between_steps_with_a_step_in_flight() -> None:
    s, kv = BatchScheduler(slots=2), FakeKV(2)
    a = s.add([1, 2, 3], max_tokens=50)
    b = s.add([4, 5, 6], max_tokens=50)
    step(s, kv)
    plan = s.plan()
    # While the step runs: b is cancelled, c arrives.
    s.release(b, cache=False)
    c = s.add([7, 8], max_tokens=50)
    with pytest.raises(RuntimeError):
        s.plan()
    out = s.complete(plan, kv.apply(plan))
    assert [x.handle for x in out] == [a]  # b's token is dropped
    plan, _ = step(s, kv)
    assert SeqRemove(1) in plan.ops
    assert plan.ops == (SeqRemove(1),)  # before c's prompt lands in id 1
    assert {e.handle: e.seq_id for e in plan.entries} == {a: 0, c: 1}


def test_more_sequences_than_slots_is_refused_not_queued() -> None:
    """Admission is the one queue: the scheduler never holds more than `slots`."""
    s, kv = BatchScheduler(slots=2), FakeKV(2)
    hs = [s.add([i, i + 1], max_tokens=50) for i in range(2)]
    with pytest.raises(SchedulerFull):
        s.add([7, 8], max_tokens=50)
    plan, _ = step(s, kv)
    assert {e.handle for e in plan.entries} == set(hs)
    s.finish(hs[0])  # done but not released: still holds its slot
    with pytest.raises(SchedulerFull):
        s.add([7, 8], max_tokens=50)
    s.release(hs[0], cache=False)
    c = s.add([7, 8], max_tokens=50)  # released: the slot is free again, even mid-step
    plan, _ = step(s, kv)
    assert s.seq_id(c) == 0 and c in {e.handle for e in plan.entries}
    assert s.stats().waiting == 0


def test_decode_rows_take_the_budget_first_and_prompts_fill_the_rest() -> None:
    s, kv = BatchScheduler(slots=4, step_tokens=8, min_prefill_tokens=2), FakeKV(4)
    decoders = [s.add([i, i + 1], max_tokens=50) for i in range(3)]
    step(s, kv)  # three two-token prompts (6 tokens)
    long = s.add(list(range(100, 130)), max_tokens=5)
    sizes = []
    while s.phase(long) is not Phase.DECODE:
        plan, _ = step(s, kv)
        for h in decoders:
            s.consumed(h)
        rows = [e for e in plan.entries if not e.prefill]
        assert {e.handle for e in rows} == set(decoders)  # every step: all three decode
        sizes.append(plan.n_tokens)
    # 3 decode rows + 5 prompt tokens per step: the prompt is spread, the steps stay small
    assert sizes == [8] * 6
    s2, kv2 = BatchScheduler(slots=4, step_tokens=4, min_prefill_tokens=3), FakeKV(4)
    early = [s2.add([i, i + 1], max_tokens=50) for i in range(3)]
    while any(s2.phase(h) is not Phase.DECODE for h in early):
        step(s2, kv2)
    late = s2.add(list(range(10)), max_tokens=5)
    plan, _ = step(s2, kv2)  # 3 decoders leave 1 of 4, but prompts never starve
    assert [len(e.tokens) for e in plan.entries if e.handle == late] == [3]


def test_slow_consumer_pauses_its_sequence_only() -> None:
    s, kv = BatchScheduler(slots=2, max_backlog=2), FakeKV(2)
    fast = s.add([1, 2], max_tokens=50)
    slow = s.add([3, 4], max_tokens=50)
    for _ in range(4):
        plan, _ = step(s, kv)
        s.consumed(fast)
    assert {e.handle for e in plan.entries} == {fast}
    s.consumed(slow, 2)
    plan, _ = step(s, kv)
    assert {e.handle for e in plan.entries} == {fast, slow}


def test_a_hole_is_compacted_so_ids_stay_consecutive() -> None:
    s, kv = BatchScheduler(slots=4), FakeKV(4)
    hs = [s.add([i, i + 1, i + 2], max_tokens=50) for i in range(4)]
    step(s, kv)
    s.release(hs[1], cache=False)
    plan, _ = step(s, kv)
    assert plan.ops == (SeqRemove(1), SeqCopy(3, 1, 3), SeqRemove(3))
    assert sorted(e.seq_id for e in plan.entries) == [0, 1, 2]
    assert runs(e.seq_id for e in plan.entries) == 1
    assert kv.cells[1][:3] == [3, 4, 5]  # hs[3]'s prompt moved with it


def test_a_new_sequence_fills_the_hole_instead_of_a_move() -> None:
    s, kv = BatchScheduler(slots=2), FakeKV(2)
    a, b = (s.add([i], max_tokens=50) for i in range(2))
    step(s, kv)
    s.release(a, cache=False)
    c = s.add([5], max_tokens=50)
    plan, _ = step(s, kv)
    assert plan.ops == (SeqRemove(0),)
    assert s.seq_id(c) == 0 and s.seq_id(b) == 1


def test_done_sequences_are_not_moved() -> None:
    s, kv = BatchScheduler(slots=3), FakeKV(3)
    a, b, c = (s.add([i, i], max_tokens=50) for i in range(3))
    step(s, kv)
    s.finish(c)  # waits for its consumer to release it
    s.release(a, cache=False)
    plan, _ = step(s, kv)
    assert plan.ops == (SeqRemove(0), SeqCopy(1, 0, 2), SeqRemove(1))
    assert {e.handle for e in plan.entries} == {b}


PROMPT = tuple(range(100, 140))  # 40 tokens


def test_prefix_cache_parks_then_reuses_a_finished_sequence() -> None:
    s, kv = BatchScheduler(slots=1, cache_slots=2, step_tokens=64, min_reuse_tokens=8), FakeKV(3)
    a = s.add(PROMPT, max_tokens=3)
    for _ in range(3):
        step(s, kv)
    parked = PROMPT + tuple(s.generated(a)[:2])  # the last sampled token was never fed
    s.release(a)
    follow_up = (*parked, s.generated(a)[2] if s.generated(a) else 7, 1, 2, 3)
    b = s.add(follow_up, max_tokens=2)
    plan, _ = step(s, kv)
    assert plan.ops[:2] == (SeqCopy(0, 1, len(parked)), SeqRemove(0))
    assert plan.ops[2] == SeqCopy(1, 0, len(parked))
    (entry,) = plan.entries
    assert entry.pos == len(parked) and entry.tokens == follow_up[len(parked):]
    assert s.reused(b) == len(parked)
    assert s.stats().prompt_tokens_reused == len(parked) and s.stats().prefix_hits == 1
    assert kv.cells[1] == list(parked)


def test_identical_prompt_reuses_all_but_its_last_two_tokens() -> None:
    s, kv = BatchScheduler(slots=1, cache_slots=1, step_tokens=64, min_reuse_tokens=8), FakeKV(2)
    a = s.add(PROMPT, max_tokens=2)
    step(s, kv)
    step(s, kv)
    s.release(a)
    b = s.add(PROMPT, max_tokens=2)
    plan, _ = step(s, kv)
    # Two, not one: a one-token chunk would go through other matmul kernels.
    assert plan.entries[0].pos == len(PROMPT) - 2 and plan.entries[0].sample
    assert len(plan.entries[0].tokens) == 2 and s.reused(b) == len(PROMPT) - 2


def test_prefix_cache_is_reused_only_within_its_scope() -> None:
    """Two principals sending the same prompt never hit each other's cache entries; the
    same principal (and the shared scope, None, with itself) does."""
    s, kv = BatchScheduler(slots=1, cache_slots=8, step_tokens=64, min_reuse_tokens=8), FakeKV(9)

    def run(scope: str | None) -> int:
        handle = s.add(PROMPT, max_tokens=2, scope=scope)
        step(s, kv)
        step(s, kv)
        reused = s.reused(handle)
        s.release(handle)
        return reused

    assert run("key:a") == 0
    assert run("key:b") == 0  # same prompt, another principal: a miss
    assert run(None) == 0  # the shared scope is a scope of its own
    assert s.stats().prefix_hits == 0
    assert run("key:a") == len(PROMPT) - 2
    assert run("key:b") == len(PROMPT) - 2
    assert run(None) == len(PROMPT) - 2
    assert s.stats().prefix_hits == 3


def test_short_matches_and_short_sequences_are_not_cached() -> None:
    s, kv = BatchScheduler(slots=1, cache_slots=2, min_reuse_tokens=8), FakeKV(3)
    a = s.add([1, 2, 3], max_tokens=2)
    step(s, kv)
    s.release(a)
    assert s.cached() == {}
    b = s.add(PROMPT, max_tokens=1)
    step(s, kv)
    s.release(b)
    assert list(s.cached().values()) == [PROMPT]
    c = s.add((*PROMPT[:5], 9, 9, 9, 9, 9), max_tokens=1)
    plan, _ = step(s, kv)
    assert s.reused(c) == 0 and plan.entries[0].pos == 0


def test_cache_evicts_least_recently_used_and_replaces_dominated_entries() -> None:
    s, kv = BatchScheduler(slots=1, cache_slots=2, step_tokens=64, min_reuse_tokens=4), FakeKV(3)

    def run(prompt: tuple[int, ...]) -> None:
        h = s.add(prompt, max_tokens=1)
        step(s, kv)
        s.release(h)

    p1, p2, p3 = (tuple(range(k, k + 10)) for k in (0, 100, 200))
    run(p1)
    run(p2)
    assert list(s.cached().values()) == [p1, p2]
    run((*p1, 5, 5))  # reuses p1, and its longer sequence replaces p1
    assert list(s.cached().values()) == [p2, (*p1, 5, 5)]
    run(p3)  # evicts p2, the least recently used
    assert list(s.cached().values()) == [(*p1, 5, 5), p3]
    plan = s.plan()
    kv.apply(plan)
    for cid, tokens in s.cached().items():
        assert cid >= 1 and kv.cells[cid] == list(tokens)


def test_failed_step_fails_its_sequences_and_they_are_not_cached() -> None:
    s = BatchScheduler(slots=1, cache_slots=1, min_reuse_tokens=1)
    a = s.add([1, 2, 3], max_tokens=5)
    plan = s.plan()
    assert s.fail(plan) == [a]
    assert s.phase(a) is Phase.FAILED
    s.release(a)
    assert s.cached() == {}
    assert s.plan().ops == (SeqRemove(0),)


def test_helpers() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert runs([0, 1, 2, 5, 6, 9]) == 3 and runs([]) == 0
    with pytest.raises(ValueError):
        BatchScheduler(slots=1).add([], max_tokens=1)


@pytest.mark.parametrize("seed", range(40))
def test_random_traffic_keeps_the_kv_consistent(seed: int) -> None:
    """Random joins, cancels, stops and slow consumers; every step must continue exactly
    the tokens each id holds, and cached entries must match their KV."""
    rng = random.Random(seed)
    slots, cache = rng.randint(1, 4), rng.randint(0, 3)
    invariant = seed % 2 == 1
    s = BatchScheduler(slots=slots, cache_slots=cache, step_tokens=rng.choice([3, 8, 64]),
                       max_backlog=rng.randint(1, 3), min_reuse_tokens=rng.choice([1, 4]),
                       invariant=invariant)
    kv = FakeKV(s.n_seq_max)
    pads = 0
    base = [rng.randrange(50) for _ in range(20)]
    live: list[int] = []
    prompts: dict[int, tuple[int, ...]] = {}
    for _ in range(120):
        r = rng.random()
        if r < 0.25 and len(live) < slots:
            prompt = tuple(base[: rng.randint(1, 20)] + [rng.randrange(50) for _ in range(3)])
            h = s.add(prompt, max_tokens=rng.randint(1, 8))
            live.append(h)
            prompts[h] = prompt
        elif r < 0.35 and live:
            h = live.pop(rng.randrange(len(live)))
            s.release(h, cache=rng.random() < 0.7)
        elif r < 0.4 and live:
            s.finish(rng.choice(live))
        if live and rng.random() < 0.5:
            s.consumed(rng.choice(live), rng.randint(1, 2))
        plan = s.plan()
        released_mid_step = [h for h in live if rng.random() < 0.05]
        for h in released_mid_step:
            live.remove(h)
            s.release(h)
        eog = frozenset(h for h in live if rng.random() < 0.05)
        s.complete(plan, kv.apply(plan, eog=eog))
        pads += len(plan.pads)
        n_dec = sum(not e.prefill for e in plan.entries)
        budget = max(s.step_tokens - n_dec, s.min_prefill_tokens)
        assert plan.n_tokens - n_dec <= budget + 1  # + 1: never a lone last prompt token
        assert plan.n_tokens <= s.max_batch_tokens
        assert invariant or not plan.pads
        for e in plan.entries:
            assert len(e.tokens) >= 2 or not e.prefill or e.pos + 1 == len(prompts[e.handle])
        running = s.running_ids()
        assert all(0 <= i < slots for i in running)
        assert_kv_holds_prompts_and_tokens(s, kv, prompts)
        release_done(s, live, rng)
    release_all(s, kv, live)
    assert all(kv.cells[i] == [] for i in range(slots))
    for cid, tokens in s.cached().items():
        assert slots <= cid < slots + cache and kv.cells[cid] == list(tokens)
    assert s.stats().kv_cells_used == sum(len(cells) for cells in kv.cells.values())
    assert pads > 0 or not invariant


def test_batch_invariant_pads_a_lone_decoder_and_the_gaps() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=64, invariant=True), FakeKV(3)
    a = s.add(PROMPT, max_tokens=8)
    plan, _ = step(s, kv)  # prefill: its own llama_decode, nothing to pad
    assert plan.entries[0].prefill and plan.pads == ()
    plan, _ = step(s, kv)  # alone: a neighbour with logits makes it two rows
    assert [p.seq_id for p in plan.pads] == [1] and plan.pads[0].output
    b, c = s.add(PROMPT[:10], max_tokens=8), s.add(PROMPT[:12], max_tokens=8)
    for _ in range(3):
        step(s, kv)
        for h in (a, b, c):
            s.consumed(h, 1)
    s.finish(b)  # id 1 is done but not released yet: a hole between 0 and 2
    plan, _ = step(s, kv)
    assert [e.seq_id for e in plan.entries] == [0, 2]
    assert plan.pads[0].seq_id == 1 and not plan.pads[0].output
    assert plan.pads[0].pos == len(kv.cells[1])
    s.release(a)
    s.release(b)
    s.release(c)


def test_prompt_chunks_are_never_a_lone_token() -> None:
    s, kv = BatchScheduler(slots=1, step_tokens=len(PROMPT) - 1), FakeKV(1)
    s.add(PROMPT, max_tokens=1)
    plan, _ = step(s, kv)  # one over budget rather than a lone last token
    assert len(plan.entries[0].tokens) == len(PROMPT)
    s2, kv2 = BatchScheduler(slots=2, step_tokens=5), FakeKV(2)
    h1, h2 = s2.add(PROMPT[:4], max_tokens=1), s2.add(PROMPT[:9], max_tokens=1)
    plan, _ = step(s2, kv2)  # 4 tokens leave a budget of 1: the next prompt waits
    assert [len(e.tokens) for e in plan.entries] == [4]
    s2.release(h1)
    s2.release(h2)


# --- choices of one prompt ---


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 2, 3, 10, 40])
def test_choices_evaluate_the_prompt_once_and_copy_its_kv(invariant: bool, prompt_len: int
                                                          ) -> None:
    """n choices: the first evaluates the prompt (in chunks), the others wait, then start
    from a copy of all but its last two tokens and evaluate those two themselves; every
    entry continues the KV of its id (FakeKV checks), and each samples its own tokens."""
    n = 3
    s = BatchScheduler(slots=4, cache_slots=1, step_tokens=8, invariant=invariant)
    kv = FakeKV(s.n_seq_max)
    prompt = list(range(100, 100 + prompt_len))
    handles = s.add_choices(prompt, 4, n)
    sampled: dict[int, list[int]] = {h: [] for h in handles}
    copies: list[SeqCopy] = []
    for _ in range(30):
        if not s.needs_step():
            break
        plan, out = step(s, kv)
        copies += [op for op in plan.ops if isinstance(op, SeqCopy)]
        for item in out:
            sampled[item.handle].append(item.token)
            s.consumed(item.handle)
    assert all(len(tokens) == 4 for tokens in sampled.values())
    assert len({tuple(t) for t in sampled.values()}) == n  # each its own tokens
    stats = s.stats()
    if prompt_len > 2:
        assert stats.prompt_tokens_evaluated == prompt_len + 2 * (n - 1)
        assert stats.prompt_tokens_shared == (n - 1) * (prompt_len - 2)
        first = s.seq_id(handles[0])
        assert [(c.src, c.keep) for c in copies] == [(first, prompt_len - 2)] * (n - 1)
    else:  # too short to share: each evaluates it
        assert stats.prompt_tokens_evaluated == n * prompt_len and not copies
    for h in handles:
        assert kv.cells[s.seq_id(h)][:prompt_len] == prompt  # type: ignore[index]


def test_choices_take_their_slots_together_or_not_at_all() -> None:
    s = BatchScheduler(slots=3)
    s.add([1, 2, 3], 2)
    with pytest.raises(SchedulerFull):
        s.add_choices([1, 2, 3], 2, 3)
    assert s.stats().waiting == 1  # nothing of the refused request stays
    s.add_choices([1, 2, 3], 2, 2)


def test_a_choice_whose_first_choice_is_released_evaluates_the_prompt_itself() -> None:
    """The first choice gone before its prompt KV could be copied (its request is being
    cancelled): the others never wait for it forever."""
    s, kv = BatchScheduler(slots=3, step_tokens=4), FakeKV(3)
    handles = s.add_choices(list(range(20)), 2, 2)
    step(s, kv)  # the first choice's first chunk; the second waits
    assert s.phase(handles[1]) is Phase.FORK
    s.release(handles[0])
    for _ in range(20):
        if not s.needs_step():
            break
        step(s, kv)
    assert s.phase(handles[1]) is Phase.DONE
    assert s.n_generated(handles[1]) == 2

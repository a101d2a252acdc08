"""Who gets a step's prompt budget: priority class, then the principal served least, then
arrival; a prompt passed over too long goes first. Plans are checked against the fake KV
cache of test_batch_scheduler (every entry continues exactly the tokens its id holds)."""

from __future__ import annotations

import math
import random

import pytest

from fabricai_trio.engine.batch_scheduler import (
    MAX_REMEMBERED,
    BatchScheduler,
    Phase,
    SeqCopy,
    StepPlan,
)

from .test_batch_scheduler import (
    FakeKV,
    assert_kv_holds_prompts_and_tokens,
    release_all,
    release_done,
    step,
)


def decode_until_all_decode(s: BatchScheduler, kv: FakeKV, handles: list[int]) -> None:
    for _ in range(50):
        if all(s.phase(h) is Phase.DECODE for h in handles):
            return
        _, out = step(s, kv)
        for item in out:
            s.consumed(item.handle)
    raise AssertionError("prompts did not finish")


def prompt_tokens_by_handle(plan_entries: object) -> dict[int, int]:
    return {e.handle: len(e.tokens) for e in plan_entries if e.prefill}  # type: ignore[attr-defined]


def test_a_light_principals_prompt_goes_whole_into_the_next_step_ahead_of_heavy_ones() -> None:
    """Three heavy principals decode and have long prompts waiting (arrived first); a
    light principal's prompt arrives last and still takes the next step's budget first,
    whole, and samples its first token in that step."""
    s, kv = BatchScheduler(slots=6, step_tokens=24), FakeKV(6)
    running = [s.add([i, i + 1], 100, principal=f"heavy{i}") for i in range(3)]
    decode_until_all_decode(s, kv, running)
    for _ in range(5):  # the heavy keys have had tokens evaluated
        for item in step(s, kv)[1]:
            s.consumed(item.handle)
    heavy = [s.add(list(range(10 * i, 10 * i + 40)), 100, principal=f"heavy{i}")
             for i in range(2)]
    light = s.add(list(range(500, 516)), 8, principal="light")
    plan, out = step(s, kv)
    # Whole, though it arrived after both heavy prompts; the 5 tokens left would be a
    # piece of a heavy prompt (one more forward pass in this step): they wait.
    assert prompt_tokens_by_handle(plan.entries) == {light: 16}
    assert light in {item.handle for item in out}  # its first token, this step
    plan, _ = step(s, kv)
    assert prompt_tokens_by_handle(plan.entries) in ({heavy[0]: 20}, {heavy[1]: 20})


def test_only_the_first_prompt_is_cut_the_budget_left_goes_to_whole_prompts() -> None:
    s, kv = BatchScheduler(slots=4, step_tokens=16), FakeKV(4)
    long_ = s.add(list(range(40)), 4, principal="a")
    mid = s.add(list(range(100, 110)), 4, principal="b")
    short = s.add(list(range(200, 204)), 4, principal="c")
    plan, _ = step(s, kv)
    assert prompt_tokens_by_handle(plan.entries) == {long_: 16}
    plan, _ = step(s, kv)  # b and c were served least: b whole, then c whole
    assert prompt_tokens_by_handle(plan.entries) == {mid: 10, short: 4}


def test_without_principals_or_classes_prompts_go_in_arrival_order() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=8), FakeKV(3)
    a, b, c = (s.add(list(range(n)), 4) for n in (12, 6, 6))
    chunks = [prompt_tokens_by_handle(step(s, kv)[0].entries) for _ in range(4)]
    # b does not fit whole behind a's rest, nor c behind b (a decode row each now)
    assert chunks == [{a: 8}, {a: 4}, {b: 6}, {c: 6}]


def test_a_higher_class_prompt_goes_first_even_for_a_principal_served_more() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=8), FakeKV(3)
    busy = s.add(list(range(20)), 50, principal="p", rank=0)
    decode_until_all_decode(s, kv, [busy])
    low = s.add(list(range(6)), 4, principal="fresh", rank=2)
    high = s.add(list(range(6)), 4, principal="p", rank=0)
    plan, _ = step(s, kv)
    # "fresh" was served less than "p" (it just became active), but its class is lower.
    assert prompt_tokens_by_handle(plan.entries) == {high: 6}  # 1 token left: not a chunk
    assert s.phase(high) is Phase.DECODE
    plan, _ = step(s, kv)
    assert prompt_tokens_by_handle(plan.entries) == {low: 6}


def test_idle_time_earns_at_most_one_budget_of_head_start() -> None:
    """A principal that becomes active starts one budget below the least-served active
    one: its long prompt goes first for about one budget, then the two alternate by the
    tokens they had evaluated, instead of the newcomer taking every step until it has
    caught up with everything the other was ever served."""
    s, kv = BatchScheduler(slots=3, step_tokens=8, min_prefill_tokens=8), FakeKV(3)
    old = s.add(list(range(200)), 4, principal="old")
    for _ in range(10):  # "old" has 80 prompt tokens evaluated
        step(s, kv)
    new = s.add(list(range(1000, 1200)), 4, principal="new")
    firsts = []
    for _ in range(8):
        plan, _ = step(s, kv)
        firsts.append(next(e.handle for e in plan.entries if e.prefill))
    assert firsts[0] == new  # its head start: one budget ...
    assert firsts.count(old) >= 3 and firsts.count(new) >= 3  # ... then they alternate


def test_a_prompt_passed_over_goes_first_within_the_skip_bound() -> None:
    """Higher-class prompts arriving back to back would take every budget; the low-class
    prompt still gets tokens at least every `max_prefill_skips + 1` plans, and decode
    rows filling the budget still leave `min_prefill_tokens` for it."""
    s = BatchScheduler(slots=8, step_tokens=8, min_prefill_tokens=4, max_prefill_skips=2)
    kv = FakeKV(8)
    decoders = [s.add([i, i + 1], 1000, principal="d", rank=0) for i in range(6)]
    decode_until_all_decode(s, kv, decoders)  # 6 decode rows: the budget is the minimum 4
    low = s.add(list(range(40)), 4, principal="low", rank=2)
    high: list[int] = []
    gaps, since = [], 0
    for i in range(60):
        if len(high) < 1 or s.phase(high[-1]) is not Phase.PREFILL:
            if high:
                s.release(high[-1])
            high.append(s.add(list(range(100 + i, 112 + i)), 1, principal=f"h{i}", rank=0))
        plan, out = step(s, kv)
        for item in out:
            s.consumed(item.handle)
        chunks = prompt_tokens_by_handle(plan.entries)
        assert sum(chunks.values()) <= 4 + 1
        if low in chunks:
            gaps.append(since)
            since = 0
        else:
            since += 1
        if s.phase(low) is not Phase.PREFILL:
            break
    assert gaps and max(gaps) <= 2
    assert s.phase(low) is not Phase.PREFILL  # it got through all 40 tokens


def busy_heavy_with_a_prompt_in_flight() -> tuple[BatchScheduler, FakeKV, int, StepPlan]:
    """Two heavy principals decoding for a while; a new 40-token prompt of one of them is
    in the plan now in flight."""
    s, kv = BatchScheduler(slots=5, step_tokens=16), FakeKV(5)
    running = [s.add([i, i + 1], 100, principal=f"heavy{i}") for i in range(2)]
    decode_until_all_decode(s, kv, running)
    for _ in range(5):
        for item in step(s, kv)[1]:
            s.consumed(item.handle)
    prompt = s.add(list(range(100, 140)), 4, principal="heavy0")
    plan = s.plan()
    assert prompt_tokens_by_handle(plan.entries) == {prompt: 14}
    return s, kv, prompt, plan


def test_an_idle_principals_prompt_preempts_a_busy_ones_chunk_in_flight() -> None:
    """The light principal's prompt arrives while a heavy prompt chunk is evaluated: it
    preempts it, goes whole into the next step, and the heavy chunk is evaluated again
    from where it was (the KV continues), after it. The same heavy prompt is never
    preempted twice."""
    s, kv, heavy, plan = busy_heavy_with_a_prompt_in_flight()
    light = s.add(list(range(500, 508)), 8, principal="light")
    assert s.preempts(plan, light)
    out = s.complete(plan, kv.apply(plan, preempted=frozenset({heavy})), [heavy])
    assert heavy not in {item.handle for item in out}  # decode rows were delivered
    assert len(out) == 2 and s.stats().prompt_chunks_preempted == 1
    for item in out:
        s.consumed(item.handle)
    plan, out = step(s, kv)
    assert prompt_tokens_by_handle(plan.entries) == {light: 8}
    assert light in {item.handle for item in out}
    plan = s.plan()
    assert prompt_tokens_by_handle(plan.entries) == {heavy: 13}  # a decode row more now
    other = s.add(list(range(600, 608)), 8, principal="light2")
    assert not s.preempts(plan, other)  # heavy's prompt was preempted once already
    s.complete(plan, kv.apply(plan))


def test_service_counts_survive_a_moment_with_no_sequence() -> None:
    """Heavy principals in lockstep all finish at once and come back: they are not made
    equal to the light principal again, so its prompt, arriving while a heavy prompt is
    evaluated, still preempts it."""
    s, kv = BatchScheduler(slots=4, step_tokens=16), FakeKV(4)
    for round_ in range(3):
        heavy = [s.add(list(range(100 * i + round_, 100 * i + round_ + 20)), 8,
                       principal=f"heavy{i}") for i in range(3)]
        while any(s.phase(h) is not Phase.DONE for h in heavy):
            for item in step(s, kv)[1]:
                s.consumed(item.handle)
        for h in heavy:
            s.release(h)  # the engine is empty now
    s.add(list(range(900, 920)), 8, principal="heavy0")
    plan = s.plan()
    light = s.add([5, 6, 7], 4, principal="light")
    assert s.preempts(plan, light)
    s.complete(plan, kv.apply(plan))


def test_idle_principals_are_forgotten_beyond_a_bound() -> None:
    s, kv = BatchScheduler(slots=2, step_tokens=4), FakeKV(2)
    busy = s.add(list(range(10)), 500, principal="busy")
    for i in range(2 * MAX_REMEMBERED):
        h = s.add([i, i + 1, i + 2], 1, principal=f"p{i}")
        for _ in range(3):
            for item in step(s, kv)[1]:
                s.consumed(item.handle)
        s.release(h)
    assert len(s._served) <= MAX_REMEMBERED + 2
    s.release(busy)


def test_no_preemption_by_the_same_principal_a_busy_one_or_a_lower_class() -> None:
    s, _, _, plan = busy_heavy_with_a_prompt_in_flight()
    assert not s.preempts(plan, s.add([7, 8, 9], 4, principal="heavy0"))  # its own
    # heavy1 was served as much as heavy0, not a budget less
    assert not s.preempts(plan, s.add([7, 8, 9], 4, principal="heavy1"))
    s2, _, _, plan2 = busy_heavy_with_a_prompt_in_flight()
    assert not s2.preempts(plan2, s2.add([7, 8, 9], 4, principal="light", rank=1))
    s3, _, _, plan3 = busy_heavy_with_a_prompt_in_flight()
    assert s3.preempts(plan3, s3.add([7, 8, 9], 4, principal="heavy1", rank=-1))  # a class up


def test_no_preemption_without_principals_or_without_a_prompt_in_flight() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=8), FakeKV(3)
    s.add(list(range(20)), 4)
    plan = s.plan()
    assert not s.preempts(plan, s.add([1, 2, 3], 4))  # arrival order: nothing to jump
    s.complete(plan, kv.apply(plan))
    s2, kv2 = BatchScheduler(slots=3, step_tokens=8), FakeKV(3)
    busy = s2.add([1, 2], 50, principal="a")
    decode_until_all_decode(s2, kv2, [busy])
    plan2 = s2.plan()  # decode rows only
    assert not s2.preempts(plan2, s2.add([5, 6, 7], 4, principal="b"))


def test_choices_and_prefix_cache_work_whatever_the_order() -> None:
    """A heavy principal's choices (their forks) and a cached prefix of a light principal
    keep working when the light prompt is served first."""
    s, kv = BatchScheduler(slots=5, cache_slots=1, step_tokens=8, min_reuse_tokens=4), \
        FakeKV(6)
    warm = s.add(list(range(300, 320)), 1, principal="light", scope="light")
    for _ in range(5):
        if s.phase(warm) is Phase.DONE:
            break
        step(s, kv)
    s.release(warm)
    choices = s.add_choices(list(range(30)), 3, 2, principal="heavy", scope="heavy")
    step(s, kv)  # the first choice starts on its prompt
    light = s.add([*range(300, 320), 7, 8, 9], 3, principal="light", scope="light")
    copies: list[SeqCopy] = []
    for _ in range(30):
        if not s.needs_step():
            break
        plan, out = step(s, kv)
        copies += [op for op in plan.ops if isinstance(op, SeqCopy)]
        for item in out:
            s.consumed(item.handle)
    assert s.reused(light) == 20  # from the cache, its own scope
    assert all(s.n_generated(h) == 3 for h in [*choices, light])
    assert s.stats().prompt_tokens_shared == 28  # the second choice copied the first's KV


@pytest.mark.parametrize("seed", range(30))
def test_random_traffic_with_principals_classes_and_choices(seed: int) -> None:
    """Random joins (some with choices), cancels, stops and slow consumers, each with a
    principal and a class: every step continues exactly the tokens each id holds, and no
    prompt waits more than a bounded number of plans for a chunk."""
    rng = random.Random(seed)
    slots, cache = rng.randint(2, 5), rng.randint(0, 2)
    skips = rng.randint(1, 4)
    s = BatchScheduler(slots=slots, cache_slots=cache, step_tokens=rng.choice([3, 8, 24]),
                       max_backlog=rng.randint(1, 3), min_reuse_tokens=rng.choice([1, 4]),
                       invariant=seed % 2 == 1, max_prefill_skips=skips)
    kv = FakeKV(s.n_seq_max)
    base = [rng.randrange(50) for _ in range(20)]
    live: list[int] = []
    prompts: dict[int, tuple[int, ...]] = {}
    waited: dict[int, int] = {}
    # A sequence waits at most its own skip bound plus every older sequence's prompt,
    # and one plan more if its chunk was preempted (once at most).
    bound = skips + slots * math.ceil(23 / s.min_prefill_tokens) + 3
    for _ in range(150):
        r = rng.random()
        if r < 0.3 and len(live) < slots:
            prompt = tuple(base[: rng.randint(1, 20)] + [rng.randrange(50) for _ in range(3)])
            n = rng.randint(1, min(3, slots - len(live)))
            principal = rng.choice(["a", "b", "c", None])
            hs = s.add_choices(prompt, rng.randint(1, 8), n, principal=principal,
                               scope=principal, rank=rng.randint(0, 2))
            live += hs
            prompts.update(dict.fromkeys(hs, prompt))
        elif r < 0.38 and live:
            h = live.pop(rng.randrange(len(live)))
            s.release(h, cache=rng.random() < 0.7)
        elif r < 0.42 and live:
            s.finish(rng.choice(live))
        for h in live:
            if rng.random() < 0.6:
                s.consumed(h, rng.randint(1, 2))
        plan = s.plan()
        served = {e.handle for e in plan.entries if e.prefill}
        for h in live:
            if s.phase(h) is Phase.PREFILL:
                waited[h] = 0 if h in served else waited.get(h, 0) + 1
                assert waited[h] <= bound
        preempted: frozenset[int] = frozenset()
        if rng.random() < 0.3 and len(live) < slots:  # arrives while the step runs
            principal = rng.choice(["a", "b", "c", "d", None])
            prompt = (*base[: rng.randint(1, 20)], rng.randrange(50))
            h = s.add(prompt, rng.randint(1, 8), principal=principal, scope=principal,
                      rank=rng.randint(0, 2))
            live.append(h)
            prompts[h] = prompt
            if s.preempts(plan, h):  # the chunks from a random one on are not run
                chunks = [e.handle for e in plan.entries if e.prefill]
                preempted = frozenset(chunks[rng.randrange(len(chunks)):])
                for c in preempted:  # a chunk that is not run is a plan without tokens
                    waited[c] = waited.get(c, 0) + 1
        eog = frozenset(h for h in live if rng.random() < 0.05) - preempted
        s.complete(plan, kv.apply(plan, eog=eog, preempted=preempted), preempted)
        assert_kv_holds_prompts_and_tokens(s, kv, prompts)
        release_done(s, live, rng)
    release_all(s, kv, live)
    for cid, tokens in s.cached().items():
        assert kv.cells[cid] == list(tokens)

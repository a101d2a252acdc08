"""The time budget for prompt chunks: `StepCosts` (measured pass durations) and how
`BatchScheduler` sizes a step's prompt work with it beside decode rows."""

from __future__ import annotations

import pytest

from fabricai_trio.engine.batch_scheduler import BatchScheduler, Phase
from fabricai_trio.engine.step_costs import MIN_MEASURED_CHUNK, StepCosts

from .test_batch_scheduler import FakeKV, step


def test_no_budget_until_both_costs_are_measured() -> None:
    costs = StepCosts(factor=2.0)
    assert costs.prompt_budget() is None
    costs.observe_decode(0.020)
    assert costs.prompt_budget() is None
    costs.observe_prompt(MIN_MEASURED_CHUNK - 1, 0.5)  # too short to say what a token costs
    assert costs.prompt_budget() is None
    costs.observe_prompt(40, 0.080)  # 2 ms a token
    assert costs.prompt_budget() == 10  # one more decode pass (20 ms) of prompt tokens


@pytest.mark.parametrize(("factor", "expected"), [(0.0, None), (1.0, 0), (3.0, 20), (1.5, 5)])
def test_the_factor_counts_decode_passes(factor: float, expected: int | None) -> None:
    costs = StepCosts(factor=factor)
    costs.observe_decode(0.020)
    costs.observe_prompt(40, 0.080)
    assert costs.prompt_budget() == expected


def test_costs_follow_the_machine_as_it_changes() -> None:
    costs = StepCosts(factor=2.0)
    costs.observe_decode(0.020)
    costs.observe_prompt(40, 0.080)
    for _ in range(40):  # the decode passes get twice as long (more rows, a busier machine)
        costs.observe_decode(0.040)
        costs.observe_prompt(40, 0.080)
    assert costs.decode_pass_s == pytest.approx(0.040, rel=0.01)
    assert costs.prompt_budget() == 19  # about 20, from below as the average converges
    costs.observe_decode(1.0)  # one outlier moves it, but not all the way
    assert 20 < costs.prompt_budget() < 500  # type: ignore[operator]


def _prefilling_beside_decoders(s: BatchScheduler, kv: FakeKV) -> list[int]:
    """Prompt tokens per step for a 60-token prompt while two streams decode; then
    every sequence is released."""
    decoders = [s.add([i, i + 1], max_tokens=500) for i in range(2)]
    step(s, kv)
    long = s.add(list(range(100, 160)), max_tokens=5)
    sizes = []
    while s.phase(long) is not Phase.DECODE:
        plan, _ = step(s, kv)
        for h in decoders:
            s.consumed(h)
        sizes.append(sum(len(e.tokens) for e in plan.entries if e.prefill))
    for h in [*decoders, long]:
        s.release(h)
    return sizes


def test_the_scheduler_sizes_prompt_chunks_in_time_beside_decoders() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=32, min_prefill_tokens=4,
                           step_factor=2.0), FakeKV(3)
    s.costs.observe_decode(0.020)
    s.costs.observe_prompt(40, 0.080)  # 10 prompt tokens cost one decode pass
    assert _prefilling_beside_decoders(s, kv) == [10] * 6
    # Without decoders the token budget alone applies: the whole step for the prompt.
    alone = s.add(list(range(200, 264)), max_tokens=1)
    plan, _ = step(s, kv)
    assert [len(e.tokens) for e in plan.entries if e.handle == alone] == [32]


def test_the_time_budget_never_exceeds_the_token_budget_nor_starves_prompts() -> None:
    slow_decode = BatchScheduler(slots=3, step_tokens=16, min_prefill_tokens=4,
                                 step_factor=2.0)
    slow_decode.costs.observe_decode(1.0)  # a decode pass costs 500 prompt tokens
    slow_decode.costs.observe_prompt(40, 0.080)
    assert set(_prefilling_beside_decoders(slow_decode, FakeKV(3))[:-1]) == {14}  # 16 - 2
    fast_decode = BatchScheduler(slots=3, step_tokens=16, min_prefill_tokens=4,
                                 step_factor=2.0)
    fast_decode.costs.observe_decode(0.001)  # half a prompt token
    fast_decode.costs.observe_prompt(40, 0.080)
    assert set(_prefilling_beside_decoders(fast_decode, FakeKV(3))) == {4}


def test_factor_zero_keeps_the_token_budget() -> None:
    s, kv = BatchScheduler(slots=3, step_tokens=12, min_prefill_tokens=4), FakeKV(3)
    s.costs.observe_decode(0.020)
    s.costs.observe_prompt(40, 0.080)
    assert _prefilling_beside_decoders(s, kv) == [10] * 6  # 12 less the two decode rows

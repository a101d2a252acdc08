"""A `BatchRunner` for one sequence, and that sequence decoded alone on it (the grammar
tests' reference runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fabricai_trio.engine.batch_scheduler import BatchScheduler, Phase
from fabricai_trio.engine.batch_step import BatchRunner, Sampling


def one_sequence_runner(model_path: Path) -> BatchRunner:
    """One sequence of 512 tokens, one thread: what the grammar tests decode on."""
    return BatchRunner(model_path, n_seq_max=1, n_ctx_seq=512, n_batch=264, n_outputs=1,
                       n_threads=1)


def decode_alone(runner: BatchRunner, prompt: Sequence[int], sampling: Sampling, n: int
                 ) -> tuple[list[int], str, bool]:
    """`n` tokens at most after `prompt`, alone in the batch: (tokens, text, ended by
    itself). The sequence is released (not cached) before it returns."""
    sched = BatchScheduler(slots=1, step_tokens=256)
    handle = sched.add(prompt, n)
    text, eog = b"", False
    while sched.phase(handle) is not Phase.DONE:
        plan = sched.plan()
        result = runner.run(plan, {handle: sampling})
        assert result.error is None
        for sampled in sched.complete(plan, result.sampled):
            text += result.pieces[sampled.handle]
            eog = eog or sampled.eog
        sched.consumed(handle, n)
    tokens = sched.generated(handle)
    sched.release(handle, cache=False)
    plan = sched.plan()
    runner.run(plan, {})
    sched.complete(plan, {})
    return tokens, text.decode("utf-8"), eog

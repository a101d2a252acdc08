"""What constrained decoding costs per token, in-process on the batched engine's runner:
decode steps of N sequences with and without a grammar (llama.cpp's grammar sampler, as
`response_format` / `grammar` requests get), rounds alternating, as a ratio.

Two pairs: greedy (temperature 0: the numpy path unconstrained, llama.cpp's chain with a
grammar) and sampled (temperature 0.8: llama.cpp's chain either way).

    .venv/bin/python bench/constrained.py [--streams 1,8] [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF

from fabricai_trio.engine.batch_scheduler import BatchScheduler
from fabricai_trio.engine.batch_step import BatchRunner, Sampling
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.1, seed=0)
SAMPLED = Sampling(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=0)


def decode_ms_per_step(runner: BatchRunner, streams: int, sampling: Sampling,
                       tokens: int, prompt: list[int]) -> float:
    """Median wall time of a decode step of `streams` sequences (prompts evaluated first),
    over the steps where all of them still decode."""
    sched = BatchScheduler(slots=streams, step_tokens=256)
    handles = [sched.add([*prompt, 1000 + i], tokens + 8) for i in range(streams)]
    per_handle = {h: sampling for h in handles}
    while any(sched.n_generated(h) == 0 for h in handles):
        plan = sched.plan()
        sched.complete(plan, runner.run(plan, per_handle).sampled)
    times = []
    for _ in range(tokens):
        for h in handles:
            sched.consumed(h, 1)
        plan = sched.plan()
        start = time.perf_counter()
        result = runner.run(plan, per_handle)
        if len(plan.entries) == streams:  # only steps where every sequence still decodes
            times.append((time.perf_counter() - start) * 1000)
        sched.complete(plan, result.sampled)
    for h in handles:
        sched.release(h, cache=False)
    plan = sched.plan(ops_only=True)
    runner.run(plan, {})
    sched.complete(plan, {})
    return statistics.median(times) if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    slots = max(streams)
    path = embedded_model_path(Settings().model_cache_dir)
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    prompt = vocab.tokenize(b"A city described in JSON, with its name, population and "
                            b"history, then a long story about it:\n")
    runner = BatchRunner(path, n_seq_max=slots,
                         n_ctx_seq=512, n_batch=256 + slots, n_outputs=slots,
                         n_threads=args.threads)
    print(f"decode step ms, median of per-round medians ({args.rounds} alternating rounds)")
    print("streams | sampling | plain | JSON grammar | ratio")
    for n in streams:
        for name, plain in (("greedy", GREEDY), ("sampled", SAMPLED)):
            constrained = replace(plain, grammar=JSON_GBNF)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(decode_ms_per_step(runner, n, plain, args.tokens, prompt))
                b.append(decode_ms_per_step(runner, n, constrained, args.tokens, prompt))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{n:>7} | {name:>8} | {ma:5.1f} | {mb:12.1f} | {mb / ma:5.2f}x")
    runner.close()


if __name__ == "__main__":
    main()

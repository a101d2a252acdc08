"""What constrained decoding costs per token, in-process on the batched engine's runner:
decode steps of N sequences with and without a grammar (llguidance's token mask, as
`response_format` / `grammar` requests get), rounds alternating, as a ratio.

Two pairs: greedy (temperature 0: the numpy path; constrained, each row's mask is
computed and the top token checked against it, the masked argmax taken if it is
refused) and sampled (temperature 0.8: llama.cpp's chain either way; constrained, over
the masked logits). Also reported: the time to build llguidance's tokenizer for the
model's vocabulary (once per model load).

    .venv/bin/python bench/constrained.py [--streams 1,8] [--rounds 5] [--tokens 48]
        [--threads 2] [--clock wall|cpu] [--grammar json|schema] [--sampling sampled]
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

from fabricai_trio.engine.batch_scheduler import BatchScheduler
from fabricai_trio.engine.batch_step import BatchRunner, Sampling
from fabricai_trio.engine.constraint import constraint_tokenizer
from fabricai_trio.engine.grammar import json_schema_grammar
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

#: `--grammar schema`: a JSON Schema whose keys the grammar forces, so that it often
#: allows only a handful of tokens, far from the model's choice.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "population": {"type": "integer"},
    "coastal": {"type": "boolean"}, "founded": {"type": "integer"}},
    "required": ["name", "population", "coastal", "founded"]}
#: Wall time; `--clock cpu`: the process's CPU time, which other processes on a loaded
#: machine disturb far less (with `--threads 1`: ggml's threads then never spin-wait).
CLOCK = time.perf_counter
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.1, seed=0)
SAMPLED = Sampling(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=0)


def decode_ms_per_step(runner: BatchRunner, streams: int, sampling: Sampling,
                       tokens: int, prompt: list[int]) -> tuple[float, float]:
    """Median and mean time of a decode step of `streams` sequences (prompts evaluated
    first), over the steps where all of them still decode. The mean is the cost per
    token: it counts the rare steps where the grammar masks the whole vocabulary, which
    the median does not see."""
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
        start = CLOCK()
        result = runner.run(plan, per_handle)
        if len(plan.entries) == streams:  # only steps where every sequence still decodes
            times.append((CLOCK() - start) * 1000)
        sched.complete(plan, result.sampled)
    for h in handles:
        sched.release(h, cache=False)
    plan = sched.plan(ops_only=True)
    runner.run(plan, {})
    sched.complete(plan, {})
    if not times:
        return float("nan"), float("nan")
    return statistics.median(times), statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--grammar", choices=["json", "schema"], default="json",
                        help="json: response_format json_object; schema: a JSON Schema")
    parser.add_argument("--sampling", default="greedy,sampled",
                        help="which pairs to run: greedy, sampled or both")
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
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    start = time.perf_counter()
    runner.constraint_tokenizer = constraint_tokenizer(vocab._model.vocab)
    print(f"llguidance tokenizer for {vocab.n_vocab()} tokens: "
          f"{time.perf_counter() - start:.2f} s (wall)")
    grammar = json_schema_grammar({"type": "object"} if args.grammar == "json" else SCHEMA,
                                  "response_format")
    print(f"{args.grammar} grammar; decode step ms ({args.clock} clock, {args.threads} "
          f"thread(s)), {args.rounds} "
          "rounds, each running plain and constrained one after the other; ratio: median "
          "over rounds of the round's ratio (of median steps; of mean steps = per token)")
    print("streams | sampling | plain median/mean | constrained median/mean | "
          "ratio of medians | ratio of means (per round)")
    for n in streams:
        for name, plain in (("greedy", GREEDY), ("sampled", SAMPLED)):
            if name not in args.sampling.split(","):
                continue
            constrained = replace(plain, grammar=grammar)
            a: list[tuple[float, float]] = []
            b: list[tuple[float, float]] = []
            for _ in range(args.rounds):
                a.append(decode_ms_per_step(runner, n, plain, args.tokens, prompt))
                b.append(decode_ms_per_step(runner, n, constrained, args.tokens, prompt))
            medians = [y[0] / x[0] for x, y in zip(a, b, strict=True)]
            means = [y[1] / x[1] for x, y in zip(a, b, strict=True)]
            print(f"{n:>7} | {name:>8} | "
                  f"{statistics.median(x[0] for x in a):.1f}/"
                  f"{statistics.median(x[1] for x in a):.1f} | "
                  f"{statistics.median(y[0] for y in b):.1f}/"
                  f"{statistics.median(y[1] for y in b):.1f} | "
                  f"{statistics.median(medians):.2f}x | {statistics.median(means):.2f}x "
                  f"({' '.join(f'{r:.2f}' for r in means)})", flush=True)
    runner.close()


if __name__ == "__main__":
    main()

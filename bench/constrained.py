"""What constrained decoding costs per token, in-process on the batched engine's runner:
decode steps of N sequences with and without a grammar (llama.cpp's grammar sampler, as
`response_format` / `grammar` requests get), rounds alternating, as a ratio.

Two pairs: greedy (temperature 0: the numpy path, plus the grammar's check of the chosen
token and, when it refuses, of the next most likely ones) and sampled (temperature 0.8:
llama.cpp's chain either way; when the grammar refuses the sampled token, the top-k
allowed tokens found among the most likely ones, or the whole vocabulary masked). Each
also runs the previous way, alternating (`--tops 1` for greedy, any refusal masking the
whole vocabulary for sampled). Also counted, for the constrained runs: how often the grammar refused
the first choice, and how often the whole vocabulary was masked.

    .venv/bin/python bench/constrained.py [--streams 1,8] [--rounds 5] [--tokens 48] [--tops 1]
        [--threads 2] [--clock wall|cpu] [--grammar json|schema] [--sampling sampled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from fabricai_trio.engine.batch_scheduler import BatchScheduler
from fabricai_trio.engine.batch_step import BatchRunner, Sampling
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
    parser.add_argument("--tops", default=None,
                        help="greedy: BatchRunner.grammar_tops, e.g. 1 for the full mask "
                        "after any refusal (the previous way)")
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
    if args.tops is not None:
        runner.grammar_tops = tuple(int(x) for x in args.tops.split(",") if x)
    tops = runner.grammar_tops
    grammar = JSON_GBNF if args.grammar == "json" else json_schema_to_gbnf(json.dumps(SCHEMA))
    counts = count_grammar_work(runner)
    print(f"{args.grammar} grammar; decode step ms ({args.clock} clock, {args.threads} "
          f"thread(s)), {args.rounds} "
          "rounds, each running plain and constrained one after the other; ratio: median "
          "over rounds of the round's ratio (of median steps; of mean steps = per token)")
    print("streams | sampling | grammar asks about | plain median/mean | constrained "
          "median/mean | ratio of medians | ratio of means (per round) | refused | "
          "full masks (per constrained token)")
    for n in streams:
        for name, plain in (("greedy", GREEDY), ("sampled", SAMPLED)):
            if name not in args.sampling.split(","):
                continue
            constrained = replace(plain, grammar=grammar)
            # the previous way: greedy, the top token then the whole vocabulary;
            # sampled, the whole vocabulary at any refusal
            previous = (1,) if name == "greedy" else ()
            variants = [tops, previous] if tops not in ((1,), ()) else [tops]
            a: list[tuple[float, float]] = []
            b: dict[tuple[int, ...], list[tuple[float, float]]] = {v: [] for v in variants}
            work = {v: dict.fromkeys(("refused", "masks", "steps"), 0) for v in variants}
            for _ in range(args.rounds):
                a.append(decode_ms_per_step(runner, n, plain, args.tokens, prompt))
                for variant in variants:
                    runner.grammar_tops = variant
                    before = dict(counts)
                    b[variant].append(decode_ms_per_step(runner, n, constrained, args.tokens,
                                                         prompt))
                    keys = (("refused", "refused"), ("masks", "masks"), ("steps", "samples"))
                    if name == "sampled":
                        keys = (("refused", "sampled_refused"), ("masks", "sampled_masks"),
                                ("steps", "samples"))
                    for key, total in keys:
                        work[variant][key] += counts[total] - before[total]
            runner.grammar_tops = tops
            for variant in variants:
                rows = b[variant]
                medians = [y[0] / x[0] for x, y in zip(a, rows, strict=True)]
                means = [y[1] / x[1] for x, y in zip(a, rows, strict=True)]
                steps = max(work[variant]["steps"], 1)
                masks, refused = work[variant]["masks"], work[variant]["refused"]
                asks = "top 1, then all" if variant == (1,) else "all" if not variant else (
                    "top " + ", ".join(map(str, variant)) + ", then all")
                print(f"{n:>7} | {name:>8} | {asks} | "
                      f"{statistics.median(x[0] for x in a):.1f}/"
                      f"{statistics.median(x[1] for x in a):.1f} | "
                      f"{statistics.median(y[0] for y in rows):.1f}/"
                      f"{statistics.median(y[1] for y in rows):.1f} | "
                      f"{statistics.median(medians):.2f}x | {statistics.median(means):.2f}x "
                      f"({' '.join(f'{r:.2f}' for r in means)}) | "
                      f"{refused / steps:.3f} | {masks / steps:.3f}")
    runner.close()


def count_grammar_work(runner: BatchRunner) -> dict[str, int]:
    """Count samples, refused greedy picks and whole-vocabulary masks from now on; for
    sampled sequences, refused samples and those the top tokens did not answer."""
    counts = {"samples": 0, "refused": 0, "masks": 0, "steps": 0, "sampled_refused": 0,
              "sampled_masks": 0}
    sample, allowed, mask = runner._sample, runner._allowed_argmax, runner._candidate_array
    sample_allowed, top_allowed = runner._sample_allowed, runner._top_allowed

    def counted_sample_allowed(*args: Any) -> int:
        counts["sampled_refused"] += 1
        counts["sampled_masks"] += 1  # unless the top tokens answer
        return sample_allowed(*args)

    def counted_top_allowed(*args: Any) -> Any:
        found = top_allowed(*args)
        counts["sampled_masks"] -= found is not None
        return found

    def counted_sample(*args: Any) -> int:
        counts["samples"] += 1
        return sample(*args)

    def counted_allowed(*args: Any) -> int:
        counts["refused"] += 1
        return allowed(*args)

    def counted_mask(*args: Any) -> Any:
        counts["masks"] += 1
        return mask(*args)

    runner._sample = counted_sample  # type: ignore[method-assign, assignment]
    runner._allowed_argmax = counted_allowed  # type: ignore[method-assign, assignment]
    runner._candidate_array = counted_mask  # type: ignore[method-assign, assignment]
    runner._sample_allowed = counted_sample_allowed  # type: ignore[method-assign, assignment]
    runner._top_allowed = counted_top_allowed  # type: ignore[method-assign, assignment]
    return counts


if __name__ == "__main__":
    main()

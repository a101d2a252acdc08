"""What one batched step costs, in-process: decode rows alone, and decode rows plus one
prompt chunk of each size. It is what sizing `PREFILL_CHUNK_TOKENS` (the per-step token
budget) trades: a bigger chunk evaluates prompts in fewer steps (better TTFT), a smaller
one keeps the step short for the streams decoding beside it (better inter-token latency).

    .venv/bin/python bench/step_cost.py [--threads 2] [--decoders 1,4,8] \\
        [--chunks 0,16,32,64,128,256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabricai_trio.engine.batch_scheduler import BatchScheduler
from fabricai_trio.engine.batch_step import BatchRunner, Sampling
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.1, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decoders", default="1,4,8")
    parser.add_argument("--chunks", default="0,16,32,64,128,256")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    decoders = [int(x) for x in args.decoders.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    slots = max(decoders) + 1
    model = embedded_model_path(Settings().model_cache_dir)
    runner = BatchRunner(model, n_seq_max=slots, n_ctx_seq=2048, n_batch=max(chunks) + slots + 8,
                         n_outputs=slots, n_threads=args.threads)
    print(f"step ms (median of {args.repeat}), {args.threads} threads")
    print("decoders | " + " | ".join(f"+{c:>4} prompt" for c in chunks))
    for d in decoders:
        row = []
        for c in chunks:
            times = []
            for _ in range(args.repeat):
                sched = BatchScheduler(slots=slots, step_tokens=max(c, 2) + d)
                hs = [sched.add([2, 100 + i, 200 + i], 10_000) for i in range(d)]
                while any(sched.n_generated(h) == 0 for h in hs):  # prompts in, decoding
                    plan = sched.plan()
                    sched.complete(plan, runner.run(plan, {h: GREEDY for h in hs}).sampled)
                for _ in range(3):  # a few tokens into the KV
                    plan = sched.plan()
                    sched.complete(plan, runner.run(plan, {h: GREEDY for h in hs}).sampled)
                    for h in hs:
                        sched.consumed(h, 1)
                p = sched.add([2] + [300 + k for k in range(c)], 4) if c else None
                plan = sched.plan()
                sampling = {h: GREEDY for h in hs} | ({p: GREEDY} if p is not None else {})
                start = time.perf_counter()
                result = runner.run(plan, sampling)
                times.append((time.perf_counter() - start) * 1000)
                sched.complete(plan, result.sampled)
                for h in [*hs, *([p] if p is not None else [])]:
                    sched.release(h, cache=False)
                plan = sched.plan(ops_only=True)
                runner.run(plan, {})
                sched.complete(plan, {})
            row.append(statistics.median(times))
        print(f"{d:>8} | " + " | ".join(f"{t:12.1f}" for t in row))
    runner.close()


if __name__ == "__main__":
    main()

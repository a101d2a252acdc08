"""What a busy neighbour core costs llama.cpp's decode, with no server at all.

    .venv/bin/python bench/neighbour_core.py [--rounds 3] [--tokens 128] [--threads 1]

Raw llama-cpp-python on the embedded model decodes up to `--tokens` greedy tokens on
`--threads` threads (`bench/sse_vs_raw.py`'s raw round; its decode tok/s after the
first token), alone and then beside another process that spins a pure-Python loop (no
I/O, no shared memory, no lock with the decode), rounds alternating. On a 2-core
machine whose cores share hardware (hyperthreads of one physical core, or a host's
shared caches and memory bandwidth), the second core's work can slow the first core's
decode even though the decode has its core to itself: this is how much of the running
streams' loss during a refusal storm (issue 18; the storm's event loop and load
generator run on the other core) the hardware alone explains.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse_vs_raw import prompt_for, raw_round
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    llm = Llama(str(embedded_model_path(Settings().model_cache_dir)), n_ctx=512,
                n_threads=args.threads, verbose=False)
    raw_round(llm, 16, prompt_for(-1))  # warm
    ratios = []
    for r in range(args.rounds):
        alone = raw_round(llm, args.tokens, prompt_for(r))[1]
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            beside = raw_round(llm, args.tokens, prompt_for(r))[1]
        finally:
            spinner.kill()
            spinner.wait()
        time.sleep(0.5)
        ratios.append(beside / alone)
        print(f"round {r}: alone {alone:.1f} tok/s, beside a busy core {beside:.1f} tok/s, "
              f"{beside / alone:.2f}x", flush=True)
    print(f"median {statistics.median(ratios):.2f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()

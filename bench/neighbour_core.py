"""What a busy neighbour core costs llama.cpp's decode, with no server at all.

    .venv/bin/python bench/neighbour_core.py [--rounds 3] [--tokens 128] [--threads 1]

Raw llama-cpp-python on the embedded model decodes `--tokens` greedy tokens (end of
generation banned) on `--threads` threads, alone and then beside another process that
spins a pure-Python loop (no I/O, no shared memory, no lock with the decode), rounds
alternating. On a 2-core machine whose cores share hardware (hyperthreads of one
physical core, or a host's shared caches and memory bandwidth), the second core's work
slows the first core's decode even though the decode has its core to itself. That is
the floor under issue 18's bound on the streams' tok/s during a refusal storm: the
storm's event loop and load generator must run on the other core.
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

from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

#: Gemma's end-of-generation ids, banned so that every round decodes `--tokens` tokens.
NO_EOG = {1: -100.0, 106: -100.0, 212: -100.0}


def decode_rate(llm: Llama, tokens: int) -> float:
    """Tokens per second of one greedy generation from a fresh context."""
    llm.reset()
    started = time.perf_counter()
    n = sum(1 for _ in llm("Once upon a time", max_tokens=tokens, stream=True,
                           temperature=0.0, logit_bias=NO_EOG))
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    llm = Llama(str(embedded_model_path(Settings().model_cache_dir)), n_ctx=512,
                n_threads=args.threads, verbose=False)
    decode_rate(llm, 16)  # warm
    ratios = []
    for r in range(args.rounds):
        alone = decode_rate(llm, args.tokens)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            beside = decode_rate(llm, args.tokens)
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

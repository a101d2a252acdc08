"""What a busy neighbour core costs llama.cpp's decode, with no server of ours at all.

    .venv/bin/python bench/neighbour_core.py [--rounds 3] [--tokens 128] [--threads 1]
        [--neighbour spin|storm] [--connections 50]

Raw llama-cpp-python on the embedded model decodes up to `--tokens` greedy tokens on
`--threads` threads (`bench/sse_vs_raw.py`'s raw round; its decode tok/s after the
first token), alone and then beside a neighbour, rounds alternating. The neighbours:

* `spin`: another process spinning a pure-Python loop (no I/O, little memory traffic,
  no lock shared with the decode).
* `storm`: the refusal storm of `bench/refusals.py` (`wrk`, `--connections` kept-alive
  connections) against its floor, a bare ASGI app under our Hypercorn configuration
  that answers every request with a prebuilt 429: the load a storm puts on the machine
  (the load generator, the loopback network, an event loop), without any of our code.

On a 2-core machine whose cores share hardware (hyperthreads of one physical core, or a
host's shared caches and memory bandwidth), the neighbour's work can slow the decode
even though it has a core to itself: this is the part of the running streams' loss
during a refusal storm (issue 18) that the machine alone explains.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.refusals import bare_server, write_wrk_script, wrk_command
from bench.sse_vs_raw import prompt_for, raw_round
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings


@contextmanager
def spinner() -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def storm(url: str, connections: int, script: Path) -> Iterator[None]:
    """`wrk` refused by the bare server for as long as the block runs."""
    proc = subprocess.Popen(wrk_command(url, connections, 600, script),
                            stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--neighbour", choices=("spin", "storm"), default="spin")
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if args.neighbour == "storm" and not shutil.which("wrk"):
        parser.error("--neighbour storm needs wrk (apt-get install wrk)")
    llm = Llama(str(embedded_model_path(Settings().model_cache_dir)), n_ctx=512,
                n_threads=args.threads, verbose=False)
    raw_round(llm, 16, prompt_for(-1))  # warm
    ratios = []
    with tempfile.TemporaryDirectory() as tmp, \
            (bare_server() if args.neighbour == "storm" else nullcontext()) as served:
        url = served[0] if served else None
        script = write_wrk_script(Path(tmp))
        for r in range(args.rounds):
            alone = raw_round(llm, args.tokens, prompt_for(r))[1]
            with spinner() if url is None else storm(url, args.connections, script):
                beside = raw_round(llm, args.tokens, prompt_for(r))[1]
            time.sleep(0.5)
            ratios.append(beside / alone)
            print(f"round {r}: alone {alone:.1f} tok/s, beside the {args.neighbour} "
                  f"{beside:.1f} tok/s, {beside / alone:.2f}x", flush=True)
    print(f"median {statistics.median(ratios):.2f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()

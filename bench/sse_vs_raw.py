"""Server overhead: raw llama-cpp-python in-process vs the same generation over SSE.

    .venv/bin/python bench/sse_vs_raw.py [--engine batched|llama] [--tokens 128] [--rounds 5]
        [--threads 2]

Both sides decode the same prompt greedily for the same number of tokens on the same
model and thread count, alternating rounds so machine noise hits both alike. Each round
has a fresh ~15-token prompt (a new first token: no prefix reuse on either side); the
server is one slot of `--engine` (default: the default engine) over SSE with one reused
`httpx.Client`. Reports medians and the ratios (targets: server tok/s >= 0.98x raw, TTFT
overhead <= 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings
from tests.server_process import ServerProcess

NAMES = ("Anna", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines",
         "Jonas", "Kenji", "Lucia", "Marek", "Nadia", "Oscar", "Paula", "Quentin", "Rosa")


def prompt_for(i: int) -> str:
    """About 15 tokens; the first word (the first token after BOS) changes every round."""
    return f"{NAMES[i % len(NAMES)]} opened the old book and read: once upon a time, in"


def raw_round(llama: llama_cpp.Llama, tokens: int, text: str) -> tuple[float, float, int]:
    """(ttft seconds, decode tok/s after the first token, tokens) in-process."""
    prompt = llama.tokenize(text.encode(), special=True)
    llama.reset()  # no KV reuse between rounds: the server gets none either
    start = time.perf_counter()
    first = 0.0
    n = 0
    for token in llama.generate(prompt, temp=0.0, top_k=40, top_p=0.95, repeat_penalty=1.1):
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            break
        llama.detokenize([token])
        n += 1
        if n == 1:
            first = time.perf_counter()
        if n == tokens:
            break
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


def server_round(client: httpx.Client, tokens: int, text: str) -> tuple[float, float, int]:
    """(ttft seconds, decode tok/s after the first token, tokens) over SSE."""
    body = {"prompt": text, "max_tokens": tokens, "temperature": 0}
    start = time.perf_counter()
    first = 0.0
    n = 0
    with client.stream("POST", "/v1/inference_sse", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("event: token"):
                n += 1
                if n == 1:
                    first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", default="batched")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = embedded_model_path(Settings().model_cache_dir)
    threads = args.threads
    llama = llama_cpp.Llama(
        model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )
    env = {  # ENGINE=llama runs the very `Llama` decode loop measured raw here
        "ENGINE": args.engine, "LLM_MODEL": str(model), "MAX_CONCURRENT_REQUESTS": "1",
        "N_CTX": "1024",
        "N_THREADS": str(threads), "LOG_LEVEL": "WARNING",
    }
    raw: list[tuple[float, float, int]] = []
    served: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as logs, ServerProcess(env, log_dir=Path(logs)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        server_round(client, 8, prompt_for(1000))  # warm up both sides
        raw_round(llama, 8, prompt_for(1000))
        for r in range(args.rounds):
            if r % 2:
                raw.append(raw_round(llama, args.tokens, prompt_for(r)))
                served.append(server_round(client, args.tokens, prompt_for(r)))
            else:
                served.append(server_round(client, args.tokens, prompt_for(r)))
                raw.append(raw_round(llama, args.tokens, prompt_for(r)))

    def med(rows: list[tuple[float, float, int]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    result = {
        "engine": args.engine,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "raw_tok_s": round(med(raw, 1), 2),
        "server_tok_s": round(med(served, 1), 2),
        "tok_s_ratio": round(med(served, 1) / med(raw, 1), 3),
        "raw_ttft_ms": round(med(raw, 0) * 1000, 2),
        "server_ttft_ms": round(med(served, 0) * 1000, 2),
        "ttft_overhead_ms": round((med(served, 0) - med(raw, 0)) * 1000, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

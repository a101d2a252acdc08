"""Aggregate tok/s of N equal streams: our server (`ENGINE=batched`) vs llama-server -np N.

    .venv/bin/python bench/streams.py --llama-server /path/to/llama-server \\
        [--streams 1,2,4,8,16,32] [--rounds 5] [--tokens 128] [--threads 2] \\
        [--png docs/streams.png] [--json out.json]

For each N, both servers run side by side with N slots and the same context per
sequence (`N_CTX` 1024; llama-server `-c 1024*N`); a round starts N streaming
`/v1/completions` requests at once (distinct prompts of ~20 tokens, `max_tokens`
`--tokens`, greedy), and its aggregate tok/s is the tokens received divided by the
round's wall time. Rounds alternate between the servers; the table shows the medians
and their ratio, and `--png` plots tok/s against N for both (matplotlib, a bench-only
dependency: `pip install 'fabricai-trio[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    completion_body,
    fresh_client,
    llama_server,
    model_id,
    our_server,
    stream_completion,
)
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

N_CTX = 1024


def prompt_for(i: int) -> str:
    return f"Story number {i}. Once upon a time, in a small village by the sea,"


async def one_round(url: str, model: str, n: int, tokens: int, offset: int) -> dict[str, float]:
    results = []
    async with fresh_client(url, n + 2) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            body = completion_body(model, prompt_for(offset + i), tokens)
            results.append(await stream_completion(client, body))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        wall = time.perf_counter() - start
    bad = [r for r in results if r.status != 200 or r.error]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests: {bad[0]}")
    total = sum(r.tokens for r in results)
    return {"tok_s": total / wall, "tokens": total,
            "ttft_ms": statistics.median(r.ttft or 0.0 for r in results) * 1000}


def plot(raw: dict[int, dict[str, list[dict[str, float]]]], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(raw)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, style in (("ours", "o-"), ("llama-server", "s--")):
        med = [statistics.median(r["tok_s"] for r in raw[n][name]) for n in ns]
        lo = [min(r["tok_s"] for r in raw[n][name]) for n in ns]
        hi = [max(r["tok_s"] for r in raw[n][name]) for n in ns]
        label = "fabricai-trio (batched)" if name == "ours" else "llama-server -np N"
        ax.plot(ns, med, style, label=label)
        ax.fill_between(ns, lo, hi, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent streams (slots = streams)")
    ax.set_ylabel("aggregate tok/s (median, band: min-max)")
    ax.set_title(f"Gemma 3 270M Q4_K_M, {threads} threads, alternating rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--streams", default="1,2,4,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--env", action="append", default=[],
                        help="extra NAME=VALUE for our server")
    parser.add_argument("--png", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", action="append", default=[],
                        help="earlier --json outputs to add to the table and plot")
    args = parser.parse_args()
    model = embedded_model_path(Settings().model_cache_dir)
    extra = dict(kv.split("=", 1) for kv in args.env)
    raw: dict[int, dict[str, list[dict[str, float]]]] = {}
    for old in args.merge:
        raw.update({int(k): v for k, v in json.loads(Path(old).read_text())["raw"].items()})
    with tempfile.TemporaryDirectory(prefix="streams_bench_") as tmp:
        logs = Path(tmp)
        for n in (int(x) for x in args.streams.split(",") if x):
            with ExitStack() as stack:
                common = {"slots": n, "n_ctx": N_CTX, "threads": args.threads}
                servers = {
                    "ours": stack.enter_context(our_server(model, logs, queue=n, **common,
                                                           **extra)),
                    "llama-server": stack.enter_context(
                        llama_server(args.llama_server, model, logs, **common)),
                }
                models = {name: model_id(url) for name, url in servers.items()}
                for name, url in servers.items():  # warm-up, not recorded
                    trio.run(one_round, url, models[name], n, 8, 1000)
                raw[n] = {name: [] for name in servers}
                for r in range(args.rounds):
                    order = list(servers) if r % 2 == 0 else list(reversed(servers))
                    for name in order:
                        res = trio.run(one_round, servers[name], models[name], n, args.tokens,
                                       100 * r)
                        raw[n][name].append(res)
                        print(f"streams={n} round {r} {name}: {res['tok_s']:.1f} tok/s",
                              file=sys.stderr, flush=True)
            print(f"streams={n}: done", file=sys.stderr, flush=True)
    print(f"\nAggregate tok/s, {args.tokens} tokens/stream, median of {args.rounds} "
          f"alternating rounds, {args.threads} threads")
    print("streams |       ours | llama-server | ratio | rounds ours / llama-server")
    for n in sorted(raw):
        a = statistics.median(r["tok_s"] for r in raw[n]["ours"])
        b = statistics.median(r["tok_s"] for r in raw[n]["llama-server"])
        rounds = " ".join(f"{r['tok_s']:.0f}" for r in raw[n]["ours"]) + " / " + " ".join(
            f"{r['tok_s']:.0f}" for r in raw[n]["llama-server"])
        print(f"{n:>7} | {a:10.1f} | {b:12.1f} | {a / b:5.2f} | {rounds}")
    if args.png:
        plot(raw, Path(args.png), args.threads)
    if args.json:
        out: dict[str, Any] = {"args": vars(args), "raw": raw}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Open-loop mixed workload against our server and llama.cpp's llama-server, side by side.

    .venv/bin/python bench/mixed.py --llama-server /path/to/llama-server \\
        [--slots 8] [--threads 2] [--rates 0.3,0.9,1.8] [--duration 30] [--rounds 2] \\
        [--seed 1] [--json out.json]

Each load (light, at capacity, overload) is a list of requests drawn from `--seed`:
Poisson arrivals at the load's rate (requests/s) for `--duration` seconds, prompt lengths
log-uniform in 10..900 tokens, output lengths log-uniform in 16..256 tokens. The *same*
list goes to both servers through `/v1/completions` (streaming, greedy), one server after
the other, the order alternating round by round (round r draws a new list from seed + r).
Arrivals are open-loop: a request is sent at its time whatever the server is doing.

Reported per load and server, over all rounds: output tok/s (tokens received / time from
the first send to the last byte), TTFT p50/p95/p99 and inter-token latency p50/p99 over
the accepted requests, the longest inter-token gap (the worst stall a stream saw), mean
queue wait, 429s. Queue wait comes from each server's own queue-depth gauge sampled
every 0.25 s (ours: `queued` of `/v1/status`; llama-server: `requests_deferred` of
`/metrics`), turned into a mean wait by Little's law (mean depth / accepted arrival
rate). Our server refuses beyond `MAX_QUEUE_SIZE` (default 2 x slots) with 429;
llama-server never refuses, its queue just grows: compare TTFT together with the 429
counts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Prompts,
    Result,
    completion_body,
    fresh_client,
    llama_server,
    model_id,
    our_server,
    pct,
    stream_completion,
)
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

LOADS = ("light", "capacity", "overload")
N_CTX = 2048  # per sequence: 900-token prompts + 256 tokens + headroom


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def workload(prompts: Prompts, seed: int, rate: float, duration: float
             ) -> list[tuple[float, str, int]]:
    """(arrival second, prompt, max_tokens) for one round."""
    rng = random.Random(seed)
    out: list[tuple[float, str, int]] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append((t, prompts.make(rng, log_uniform(rng, 10, 900)), log_uniform(rng, 16, 256)))
        t += rng.expovariate(rate)
    return out


async def queue_depth(client: httpx.AsyncClient, kind: str) -> float:
    try:
        if kind == "ours":
            return float((await client.get("/v1/status")).json()["concurrency"]["queued"])
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("llamacpp:requests_deferred"):
                return float(line.split()[-1])
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    return math.nan


async def run_round(url: str, kind: str, model: str, requests: list[tuple[float, str, int]]
                    ) -> dict[str, Any]:
    results: list[Result] = []
    depths: list[float] = []
    async with fresh_client(url, len(requests) + 4) as client, \
            httpx.AsyncClient(base_url=url, timeout=10) as poller:
        start = time.perf_counter()

        async def one(at: float, prompt: str, max_tokens: int) -> None:
            await trio.sleep(max(0.0, start + at - time.perf_counter()))
            results.append(await stream_completion(client, completion_body(model, prompt,
                                                                           max_tokens)))

        async def poll(cancel: trio.CancelScope) -> None:
            with cancel:
                while True:
                    depths.append(await queue_depth(poller, kind))
                    await trio.sleep(0.25)

        async with trio.open_nursery() as outer:
            cancel = trio.CancelScope()
            outer.start_soon(poll, cancel)
            async with trio.open_nursery() as nursery:
                for at, prompt, max_tokens in requests:
                    nursery.start_soon(one, at, prompt, max_tokens)
            cancel.cancel()
        wall = max(r.end for r in results) - start
    ok = [r for r in results if r.status == 200 and r.error is None]
    arrival_rate = len(ok) / max(requests[-1][0], 1e-9)
    mean_depth = statistics.fmean(d for d in depths if not math.isnan(d)) if depths else math.nan
    return {
        "sent": len(results),
        "ok": len(ok),
        "rejected_429": sum(r.status == 429 for r in results),
        "errors": sum(r.error is not None or r.status not in (200, 429) for r in results),
        "tokens": sum(r.tokens for r in ok),
        "wall_s": wall,
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "itl": [x for r in ok for x in r.itl],
        "queue_wait_s": mean_depth / arrival_rate if arrival_rate else math.nan,
    }


def merge(rounds: list[dict[str, Any]]) -> dict[str, float]:
    ttft = [x for r in rounds for x in r["ttft"]]
    itl = [x for r in rounds for x in r["itl"]]
    return {
        "tok_s": sum(r["tokens"] for r in rounds) / sum(r["wall_s"] for r in rounds),
        "ttft_p50_ms": pct(ttft, 50) * 1000,
        "ttft_p95_ms": pct(ttft, 95) * 1000,
        "ttft_p99_ms": pct(ttft, 99) * 1000,
        "itl_p50_ms": pct(itl, 50) * 1000,
        "itl_p99_ms": pct(itl, 99) * 1000,
        # the longest a stream waited between two tokens: a whole prompt evaluated in
        # one pass beside it shows here, even when such stalls are under 1 % of the gaps
        "itl_max_ms": max(itl, default=math.nan) * 1000,
        "queue_wait_ms": statistics.fmean(r["queue_wait_s"] for r in rounds) * 1000,
        "ok": sum(r["ok"] for r in rounds),
        "rejected_429": sum(r["rejected_429"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "tokens": sum(r["tokens"] for r in rounds),
    }


def report(summary: dict[str, dict[str, dict[str, float]]], rates: dict[str, float],
           args: argparse.Namespace) -> None:
    print(f"\nMixed open-loop workload: {args.slots} slots each, {args.threads} threads, "
          f"{args.rounds} alternating rounds of {args.duration:.0f} s per load, seed "
          f"{args.seed}; prompts 10-900 tokens, outputs 16-256 tokens")
    keys = ["tok_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
            "itl_max_ms", "queue_wait_ms", "ok", "rejected_429", "errors"]
    for load, per in summary.items():
        print(f"\n{load} ({rates[load]} req/s)")
        print(f"{'':16} | {'ours':>10} | {'llama-server':>12} | ratio")
        for k in keys:
            a, b = per["ours"][k], per["llama-server"][k]
            ratio = a / b if b else math.nan
            print(f"{k:16} | {a:10.1f} | {b:12.1f} | {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--queue", type=int, default=None,
                        help="our MAX_QUEUE_SIZE (default: 2 x slots)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", default="0.3,0.9,1.8",
                        help="requests/s for light, capacity, overload")
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--env", action="append", default=[],
                        help="extra NAME=VALUE for our server (e.g. PREFILL_CHUNK_TOKENS=64)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--logs", default=None)
    args = parser.parse_args()
    rates = dict(zip(LOADS, (float(x) for x in args.rates.split(",")), strict=True))
    loads = [x for x in args.loads.split(",") if x]
    model = embedded_model_path(Settings().model_cache_dir)
    prompts = Prompts(model)
    extra = dict(kv.split("=", 1) for kv in args.env)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="mixed_bench_") as tmp, ExitStack() as stack:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        common = {"slots": args.slots, "n_ctx": N_CTX, "threads": args.threads}
        servers = {
            "ours": stack.enter_context(our_server(
                model, logs, queue=args.queue if args.queue is not None else 2 * args.slots,
                **common, **extra)),
            "llama-server": stack.enter_context(llama_server(args.llama_server, model, logs,
                                                             **common)),
        }
        models = {name: model_id(url) for name, url in servers.items()}
        kinds = {"ours": "ours", "llama-server": "llama"}
        warm = [(0.0, prompts.make(random.Random(0), 200), 16)] * 2
        for name, url in servers.items():
            trio.run(run_round, url, kinds[name], models[name], warm)
        for load in loads:
            raw[load] = {name: [] for name in servers}
            for r in range(args.rounds):
                reqs = workload(prompts, args.seed * 1000 + r, rates[load], args.duration)
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    res = trio.run(run_round, servers[name], kinds[name], models[name], reqs)
                    raw[load][name].append(res)
                    print(f"{load} round {r} {name}: {res['tokens']} tokens in "
                          f"{res['wall_s']:.1f} s, {res['ok']} ok, {res['rejected_429']} 429",
                          file=sys.stderr, flush=True)
    summary = {load: {name: merge(rounds) for name, rounds in per.items()}
               for load, per in raw.items()}
    report(summary, rates, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rates": rates,
                                               "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

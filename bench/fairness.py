"""Fair sharing between API keys under unequal load, on the real model.

    nice -n 5 .venv/bin/python bench/fairness.py [--duration 40] [--json out.json]

Four keys. Three heavy ones keep 6, 3 and 2 requests outstanding (closed loop: a new one
as soon as one ends; prompts of 32 tokens, 16 tokens out); the light one keeps one
(8 tokens out) and pauses 1 s after each. Each configuration first measures the light
key's TTFT alone on the idle server (20 requests in a row), then runs the mix for
`--duration` seconds.

Configurations (each a fresh server):

* `fair+cap`: QUEUE_POLICY=fair, 4 slots, MAX_CONCURRENT_PER_KEY=1: the three heavy
  keys use three slots, so the light key's request finds the fourth free.
* `fair`: QUEUE_POLICY=fair, 4 slots, no cap: keys take turns in the queue.
* `fifo`: QUEUE_POLICY=fifo, 4 slots, no cap: the queue in arrival order.
* `priority`: `fair`, with the light key in the `high` priority class, `heavy2` in
  `normal` and the other two heavy keys in `low` (API_KEYS_FILE `priority=`).

Reported per configuration: tokens/s per key, Jain's fairness index, the light
key's TTFT p50/p99 under load over its idle p50/p99, and TTFT p50/p99 per priority
class (`normal` for every key when the configuration has no classes).

Jain's index is taken over each key's throughput divided by its max-min fair share
(Jain 1984): the light key never has more than one request out, so it asks for less
than an equal share and its share is what it got; the heavy keys split the rest
equally. So the index says whether the heavy keys, whose loads differ (6:3:2), got
equal throughput; `jain_heavy_only` is the plain index over those three. 1.0 is
perfectly fair; a FIFO queue gives a key a share proportional to what it keeps
outstanding (6:3:2 gives 0.82).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Prompts, Result, completion_body, our_server, pct
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

KEYS = {"heavy6": 6, "heavy3": 3, "heavy2": 2}  # key -> requests kept outstanding
LIGHT = "light"
HEAVY_TOKENS, LIGHT_TOKENS, PROMPT_TOKENS = 16, 8, 32
LIGHT_PAUSE_S = 1.0
IDLE_REQUESTS = 20  # the light key alone first: enough for its idle p99 to mean something

CONFIGS: dict[str, dict[str, str]] = {
    "fair+cap": {"QUEUE_POLICY": "fair", "MAX_CONCURRENT_REQUESTS": "4",
                 "MAX_CONCURRENT_PER_KEY": "1"},
    "fair": {"QUEUE_POLICY": "fair", "MAX_CONCURRENT_REQUESTS": "4"},
    "fifo": {"QUEUE_POLICY": "fifo", "MAX_CONCURRENT_REQUESTS": "4"},
    "priority": {"QUEUE_POLICY": "fair", "MAX_CONCURRENT_REQUESTS": "4"},
}
#: Each key's priority class, per configuration (absent: every key is `normal`).
CLASSES: dict[str, dict[str, str]] = {
    "priority": {LIGHT: "high", "heavy2": "normal", "heavy3": "low", "heavy6": "low"},
}


def client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(300, connect=30),
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
    )


async def stream(http: httpx.AsyncClient, body: dict[str, Any], tokens: list[float],
                 first: list[tuple[float, float]] | None = None) -> Result:
    """One streamed `/v1/completions`; the arrival time of each token is appended to
    `tokens` (so a request cut at the end of the window still counts what it got), and
    (sent, TTFT) to `first` at the first token."""
    r = Result(sent=time.perf_counter())
    async with http.stream("POST", "/v1/completions", json=body) as response:
        r.status = response.status_code
        if r.status != 200:
            await response.aread()
            return r
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if r.ttft is None:
                    r.ttft = now - r.sent
                    if first is not None:
                        first.append((r.sent, r.ttft))
                tokens.append(now)
                r.tokens += 1
    r.end = time.perf_counter()
    return r


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


async def run_config(url: str, prompts: Prompts, duration: float, seed: int,
                     classes: dict[str, str]) -> dict[str, Any]:
    rng = random.Random(seed)
    clients = {key: client(url, key) for key in [*KEYS, LIGHT]}
    model = str((await clients[LIGHT].get("/v1/models")).json()["data"][0]["id"])

    def body(max_tokens: int) -> dict[str, Any]:
        return completion_body(model, prompts.make(rng, PROMPT_TOKENS), max_tokens)

    try:
        idle: list[float] = []
        for _ in range(IDLE_REQUESTS):
            r = await stream(clients[LIGHT], body(LIGHT_TOKENS), [])
            assert r.status == 200 and r.ttft is not None, r
            idle.append(r.ttft)

        arrivals: dict[str, list[float]] = {key: [] for key in [*KEYS, LIGHT]}
        light_ttft: list[float] = []
        heavy_first: dict[str, list[tuple[float, float]]] = {key: [] for key in KEYS}
        refused: dict[str, int] = dict.fromkeys([*KEYS, LIGHT], 0)
        light_sent = 0

        async def heavy_loop(key: str) -> None:
            while True:
                r = await stream(clients[key], body(HEAVY_TOKENS), arrivals[key],
                                 heavy_first[key])
                if r.status != 200:
                    refused[key] += 1
                    await trio.sleep(0.1)

        async def light_one() -> None:
            r = await stream(clients[LIGHT], body(LIGHT_TOKENS), arrivals[LIGHT])
            if r.status != 200:
                refused[LIGHT] += 1
            elif r.ttft is not None:
                light_ttft.append(r.ttft)
            await trio.sleep(LIGHT_PAUSE_S)

        async with trio.open_nursery() as nursery:
            for key, outstanding in KEYS.items():
                for _ in range(outstanding):
                    nursery.start_soon(heavy_loop, key)
            await trio.sleep(2.0)  # warm: every heavy key has requests running and queued
            start = time.perf_counter()
            while time.perf_counter() - start < duration:
                await light_one()
                light_sent += 1
            end = time.perf_counter()
            nursery.cancel_scope.cancel()
        engine = (await clients[LIGHT].get("/v1/status")).json()["engine"]
    finally:
        for http in clients.values():
            await http.aclose()

    window = end - start
    rates = {key: sum(1 for t in times if start <= t <= end) / window
             for key, times in arrivals.items()}
    light_share = min(rates[LIGHT], sum(rates.values()) / 4)
    heavy_share = (sum(rates.values()) - light_share) / len(KEYS)
    normalized = [rates[key] / heavy_share for key in KEYS] + [rates[LIGHT] / light_share]
    return {
        "tokens_per_s": {key: round(v, 2) for key, v in rates.items()},
        "jain": round(jain(normalized), 3),
        "jain_heavy_only": round(jain([rates[key] for key in KEYS]), 3),
        "light_requests": light_sent,
        "light_completed": len(light_ttft),
        "refused": refused,
        "idle_ttft_ms": {"p50": round(pct(idle, 50) * 1000, 1),
                         "p99": round(pct(idle, 99) * 1000, 1)},
        "light_ttft_ms": {"p50": round(pct(light_ttft, 50) * 1000, 1),
                          "p99": round(pct(light_ttft, 99) * 1000, 1)},
        "light_ttft_ms_sorted": sorted(round(t * 1000, 1) for t in light_ttft),
        "light_ttft_p99_over_idle_p50": round(pct(light_ttft, 99) / pct(idle, 50), 2),
        "light_ttft_p99_over_idle_p99": round(pct(light_ttft, 99) / pct(idle, 99), 2),
        # prompt chunks the batched engine stopped for a less served principal's prompt
        "prompt_chunks_preempted": engine.get("prompt_chunks_preempted"),
        "ttft_ms_by_class": ttft_by_class(
            {**{key: [ttft for sent, ttft in firsts if start <= sent <= end]
                for key, firsts in heavy_first.items()}, LIGHT: light_ttft}, classes),
    }


def ttft_by_class(ttfts: dict[str, list[float]], classes: dict[str, str]
                  ) -> dict[str, dict[str, float]]:
    """TTFT p50/p99 (ms) and count of the keys of each priority class."""
    grouped: dict[str, list[float]] = {}
    for key, values in ttfts.items():
        grouped.setdefault(classes.get(key, "normal"), []).extend(values)
    return {name: {"p50": round(pct(values, 50) * 1000, 1),
                   "p99": round(pct(values, 99) * 1000, 1), "n": len(values)}
            for name, values in grouped.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = embedded_model_path(Settings().model_cache_dir)
    prompts = Prompts(model)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as logs:
        for name in args.configs.split(","):
            settings = CONFIGS[name]
            slots = int(settings["MAX_CONCURRENT_REQUESTS"])
            classes = CLASSES.get(name, {})
            keys_file = Path(logs) / f"keys-{name}"
            keys_file.write_text("".join(
                f"{key} priority={classes[key]}\n" if key in classes else f"{key}\n"
                for key in [*KEYS, LIGHT]))
            with ExitStack() as stack:
                url = stack.enter_context(our_server(
                    model, Path(logs), slots=slots, n_ctx=256,
                    threads=args.threads, queue=64, API_KEYS_FILE=str(keys_file),
                    **{k: v for k, v in settings.items() if k != "MAX_CONCURRENT_REQUESTS"},
                ))
                results[name] = trio.run(run_config, url, prompts, args.duration, args.seed,
                                         classes)
            print(name, json.dumps(results[name], indent=1), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

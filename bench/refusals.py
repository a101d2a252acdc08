"""How cheap is a refusal? 429s per second and their latency with every slot busy.

    .venv/bin/python bench/refusals.py [--engine tests.fakes:FakeEngine] [--connections 50]
        [--seconds 10] [--py-spy out.svg]

Starts our server with 2 slots and no queue (`MAX_QUEUE_SIZE=0`), starts two long
streams that keep both slots busy, then `--connections` clients (one kept-alive
connection each) POST `/v1/completions` as fast as they can for `--seconds`: every one
of those requests is refused with 429. Reports refusals per second, their latency
p50/p99, and the tok/s of the two running streams before and during the storm. With
`--py-spy`, records the server process during the storm (needs py-spy: the `bench`
extra). The client is Python too and shares the machine: a refusal rate measured here
is a floor; the latency and the server's profile are the point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ServerProcess, pct
from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings


async def stream_forever(url: str, counts: list[float], stop: trio.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
            "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                counts.append(time.perf_counter())
            if stop.is_set():
                return


async def storm(url: str, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    body = {"prompt": "Hello there", "max_tokens": 16, "stream": True}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - start)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    wall = time.perf_counter() - start
    return {"refusals_per_s": statuses.get(429, 0) / wall, "p50_ms": pct(latencies, 50) * 1000,
            "p99_ms": pct(latencies, 99) * 1000, "statuses": statuses}  # type: ignore[dict-item]


async def run(url: str, args: argparse.Namespace, server_pid: int) -> dict[str, object]:
    ticks: list[float] = []
    stop = trio.Event()
    result: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(stream_forever, url, ticks, stop)
            await trio.sleep(1)  # admitted one after the other (there is no queue)
        await trio.sleep(2)  # both streams decoding
        t0 = time.perf_counter()
        n0 = len(ticks)
        await trio.sleep(args.seconds)
        before = (len(ticks) - n0) / (time.perf_counter() - t0)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy",  # noqa: ASYNC220 (started, then awaited in a thread) "record", "-p", str(server_pid), "-o", args.py_spy,
                                    "-d", str(int(args.seconds)), "-r", "200", "--nonblocking"])
        n1, t1 = len(ticks), time.perf_counter()
        result = await storm(url, args.connections, args.seconds)
        during = (len(ticks) - n1) / (time.perf_counter() - t1)
        if spy is not None:
            await trio.to_thread.run_sync(spy.wait)
        result.update(stream_tok_s_before=before, stream_tok_s_during=during,
                      stream_ratio=during / before if before else float("nan"))
        stop.set()
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="batched")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--py-spy", default=None)
    args = parser.parse_args()
    env = {"ENGINE": args.engine, "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "0",
           "N_CTX": "8192", "N_THREADS": str(args.threads),
           "MAX_TOKENS_LIMIT": "8192"}
    if args.engine in ("batched", "llama"):
        env["LLM_MODEL"] = str(embedded_model_path(Settings().model_cache_dir))
    with tempfile.TemporaryDirectory() as logs, ServerProcess(env, log_dir=Path(logs)) as srv:
        assert srv.proc is not None
        result = trio.run(run, srv.url, args, srv.proc.pid)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Figures for operations: resume latency, Redis memory per resumable stream, drain time.

    .venv/bin/python bench/operations.py --rounds 5

Two real servers on the embedded model share one private redis-server (never 6379):

* resume latency: a resumable stream on replica A is cut after 10 tokens; the client
  reconnects with `Last-Event-ID` to A (same replica, the local log) and, in another
  round, to B (the other replica, the Redis Stream): the time from sending the reconnect
  to the first event it gets;
* Redis memory: `MEMORY USAGE` of the Redis Stream of a finished resumable stream of
  128 tokens, and of the end record kept for a stream that was not resumable;
* drain: SIGTERM with two streams decoding: the time to exit when they may finish
  (DRAIN_TIMEOUT_SECONDS=60) and when the deadline cuts them (DRAIN_TIMEOUT_SECONDS=1).

Rounds alternate; the machine is shared, so read the medians side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fabricai_trio.engine.model_files import embedded_model_path  # noqa: E402
from fabricai_trio.settings import Settings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.server_process import ServerProcess, model_env  # noqa: E402
from tests.sse_client import parse_lines  # noqa: E402

PREFIX = "bench-ops:"
PROMPT = "Write a story about a lighthouse keeper and the sea."


def events_key(request_id: str, owner: str = "anonymous") -> str:
    return f"{PREFIX}events:{hashlib.sha256(owner.encode()).hexdigest()[:32]}:{request_id}"


def cut_after(url: str, body: dict[str, object], tokens: int) -> str:
    """Start a stream and drop the connection after `tokens` tokens; the last event id."""
    last = ""
    seen = 0
    with httpx.stream("POST", f"{url}/v1/inference_sse", json=body, timeout=120) as response:
        for event in parse_lines(response.iter_lines()):
            if event.id:
                last = event.id
            if event.event == "token":
                seen += 1
                if seen == tokens:
                    break
    return last


def resume_latency(url: str, last_id: str) -> tuple[float, int]:
    """Milliseconds to the first resumed event, and how many events came in all."""
    started = time.perf_counter()
    first = None
    count = 0
    with httpx.stream("GET", f"{url}/v1/inference_sse", headers={"Last-Event-ID": last_id},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        for event in parse_lines(response.iter_lines()):
            if event.event is None:
                continue
            if first is None:
                first = time.perf_counter()
            count += 1
    assert first is not None
    return (first - started) * 1000, count


def complete(url: str, body: dict[str, object]) -> None:
    httpx.post(f"{url}/v1/inference_sse", json=body, timeout=120).read()


def drain_seconds(model: Path, logs: Path, drain_timeout: str, max_tokens: int) -> float:
    env = model_env(model, DRAIN_TIMEOUT_SECONDS=drain_timeout, MAX_TOKENS_LIMIT="1024")
    with ServerProcess(env, log_dir=logs) as server:
        flowing = threading.Barrier(3)

        def stream() -> None:
            body = {"prompt": PROMPT, "max_tokens": max_tokens}
            with httpx.stream("POST", f"{server.url}/v1/inference_sse", json=body,
                              timeout=120) as response:
                waited = False
                for line in response.iter_lines():
                    if not waited and line.startswith("event: token"):
                        waited = True
                        flowing.wait()

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        flowing.wait()
        assert server.proc is not None
        started = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(120)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = embedded_model_path(Settings().model_cache_dir)
    logs = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    same: list[float] = []
    other: list[float] = []
    with RedisServer() as redis_server:
        env = model_env(model, REDIS_URL=redis_server.url, REDIS_PREFIX=PREFIX)
        with ServerProcess(env, log_dir=logs) as a, ServerProcess(env, log_dir=logs) as b:
            for round_ in range(args.rounds):
                for target, samples in ((a, same), (b, other))[:: 1 if round_ % 2 else -1]:
                    rid = f"ops-{uuid.uuid4().hex}"
                    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                            "request_id": rid, "resumable": True}
                    last = cut_after(a.url, body, 10)
                    latency, _ = resume_latency(target.url, last)
                    samples.append(latency)
            client = redis.Redis.from_url(redis_server.url)
            rid = f"ops-mem-{uuid.uuid4().hex}"
            complete(a.url, {"prompt": PROMPT, "max_tokens": 128, "temperature": 0,
                             "request_id": rid, "resumable": True})
            plain = f"ops-plain-{uuid.uuid4().hex}"
            complete(a.url, {"prompt": PROMPT, "max_tokens": 128, "temperature": 0,
                             "request_id": plain})
            time.sleep(0.5)  # the writer task batches its writes
            resumable_bytes = client.memory_usage(events_key(rid)) or 0
            entries = client.xlen(events_key(rid))
            plain_bytes = client.memory_usage(events_key(plain)) or 0
    finish = [drain_seconds(model, logs, "60", 64) for _ in range(max(1, args.rounds // 2))]
    cut = [drain_seconds(model, logs, "1", 900) for _ in range(max(1, args.rounds // 2))]

    def ms(samples: list[float]) -> str:
        return f"median {statistics.median(samples):.1f} ms (min {min(samples):.1f}, " \
               f"max {max(samples):.1f}, n={len(samples)})"

    print(f"resume on the same replica (local log):  {ms(same)}")
    print(f"resume on the other replica (Redis):     {ms(other)}")
    print(f"Redis memory, resumable stream of 128 tokens: {resumable_bytes} bytes "
          f"({entries} events, {resumable_bytes / max(entries, 1):.0f} bytes per event)")
    print(f"Redis memory, end record of a stream that was not resumable: {plain_bytes} bytes")
    print(f"drain, two 64-token streams finishing: median {statistics.median(finish):.2f} s "
          f"SIGTERM to exit")
    print(f"drain, two long streams cut at DRAIN_TIMEOUT_SECONDS=1: median "
          f"{statistics.median(cut):.2f} s SIGTERM to exit")


if __name__ == "__main__":
    main()

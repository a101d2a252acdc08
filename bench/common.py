"""Shared pieces of the side-by-side benches: servers, prompts of a given token length,
one streamed OpenAI `/v1/completions` request, percentiles.

Both servers get the same requests through the same OpenAI route (`/v1/completions`,
`stream: true`, greedy, `top_k` 40, `repeat_penalty` 1.1), each over a fresh connection
(llama-server's HTTP library may drop kept-alive connections between requests), the same
model file, threads and context per sequence.
"""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_process import ServerProcess

# Words that are one token each for Gemma 3's tokenizer (with the leading space), so a
# prompt of n words is about n tokens; `Prompts` trims to the exact count.
_WORDS = (
    "the of and to in is was for on with as by at from that this it be are or an "
    "which one all were when there can has more also new time two first been other "
    "into its only after over most years such city people school world may where many "
    "while some these would then music film state water house river island family "
    "group house north south east west game year part name small large old long high "
    "light night day road line field sea ship train book story king queen war peace "
    "church town village market garden tree stone hill valley forest bird horse dog"
)
WORDS = tuple(_WORDS.split())


class Prompts:
    """Seeded prompts of an exact token count (BOS included), distinct from their first
    word on, so no server can reuse one request's prefix for another."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self._vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def make(self, rng: random.Random, n_tokens: int) -> str:
        words = [f"Request {rng.randrange(10**9)}:"]
        words += [rng.choice(WORDS) for _ in range(n_tokens)]
        text = " ".join(words)
        tokens = self._vocab.tokenize(text.encode(), add_bos=True, special=True)
        while len(tokens) > n_tokens and len(words) > 2:
            del words[-min(len(tokens) - n_tokens, len(words) - 2):]
            text = " ".join(words)
            tokens = self._vocab.tokenize(text.encode(), add_bos=True, special=True)
        return text

    def count(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode(), add_bos=True, special=True))


@dataclass
class Result:
    """One request as the client saw it; times in seconds from its send."""

    sent: float = 0.0  # monotonic
    status: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0  # monotonic
    error: str | None = None


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
        "temperature": 0, "top_k": 40, "top_p": 0.95, "repeat_penalty": 1.1,
    }


async def stream_completion(client: httpx.AsyncClient, body: dict[str, Any]) -> Result:
    """POST a streaming `/v1/completions`; TTFT and inter-token gaps are taken at each
    `data:` chunk that carries text (one token each on both servers)."""
    r = Result(sent=time.perf_counter())
    last = r.sent
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            r.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                r.end = time.perf_counter()
                return r
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                choices = data.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if r.ttft is None:
                    r.ttft = now - r.sent
                else:
                    r.itl.append(now - last)
                last = now
                r.tokens += 1
    except httpx.HTTPError as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    r.end = time.perf_counter()
    return r


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def our_server(model: Path, logs: Path, *, slots: int, n_ctx: int, threads: int,
               queue: int, **extra: str) -> Iterator[str]:
    """Our server on the embedded model (`extra`: more settings by name)."""
    env = {
        "ENGINE": "batched", "LLM_MODEL": str(model), "CHAT_FORMAT": "gemma",
        "MAX_CONCURRENT_REQUESTS": str(slots), "MAX_QUEUE_SIZE": str(queue),
        "N_CTX": str(n_ctx), "N_THREADS": str(threads), "LOG_LEVEL": "WARNING",
        "MAX_TOKENS_LIMIT": "4096",
        # No grammar here: building llguidance's tokenizer after the load (~2 s of CPU)
        # would run into the first measurements.
        "CONSTRAINT_WARMUP": "false", **extra,
    }
    with ServerProcess(env, log_dir=logs) as proc:
        yield proc.url


@contextmanager
def llama_server(binary: str, model: Path, logs: Path, *, slots: int, n_ctx: int,
                 threads: int, extra: Sequence[str] = ()) -> Iterator[str]:
    """llama.cpp's server with its defaults (unified KV, flash attention auto, prompt
    cache), `-np slots` and `slots * n_ctx` cells so each sequence gets `n_ctx`."""
    port = free_port()
    log = (logs / f"llama-server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "-np", str(slots), "-c", str(n_ctx * slots), "-t", str(threads),
         "-tb", str(threads), "--no-webui", "--metrics", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("llama-server did not become healthy")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def fresh_client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(900, connect=30),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0),
    )


def model_id(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


ServerProcess = ServerProcess  # re-exported for the benches

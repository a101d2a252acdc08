"""Soak: many clients that finish, disconnect mid-stream, give up while queued or send
garbage, against the real server and model. Nothing may leak.

FABRICAI_SOAK=short (CI, the default) runs 60 clients; FABRICAI_SOAK=long runs 600.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .server_process import ServerProcess
from .sse_client import aparse

pytestmark = [pytest.mark.model, pytest.mark.slow]

CLIENTS = 600 if os.environ.get("FABRICAI_SOAK") == "long" else 60


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_soak_leaves_nothing_behind(model_path: Path, server_logs: Path) -> None:
    env = {
        "LLM_MODEL": str(model_path), "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "4",
        "N_CTX": "512", "SSE_KEEPALIVE_SECONDS": "0.5",
    }
    rng = random.Random(20261126)
    outcomes: dict[str, int] = {}

    async def client(http: httpx.AsyncClient, i: int) -> None:
        kind = rng.choice(["complete", "disconnect", "queued-leave", "garbage"])
        body: dict[str, Any] = {"prompt": f"Story {i}:", "max_tokens": rng.randint(4, 24)}
        if kind == "garbage":
            response = await http.post("/v1/inference_sse", content=b"{" * rng.randint(1, 50),
                                       headers={"content-type": "application/json"})
            assert response.status_code == 400
            outcomes[kind] = outcomes.get(kind, 0) + 1
            return
        stop_after = rng.randint(1, 6)
        async with http.stream("POST", "/v1/inference_sse", json=body) as response:
            if response.status_code == 429:
                outcomes["429"] = outcomes.get("429", 0) + 1
                return
            assert response.status_code == 200
            tokens = 0
            async for event in aparse(response.aiter_lines()):
                if kind == "queued-leave" and event.event == "queued":
                    break
                if event.event == "token":
                    tokens += 1
                    if kind == "disconnect" and tokens >= stop_after:
                        break
                if event.event == "complete":
                    assert event.data["usage"]["completion_tokens"] <= body["max_tokens"]
        outcomes[kind] = outcomes.get(kind, 0) + 1

    with ServerProcess(env, log_dir=server_logs) as server:
        assert server.proc is not None
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            # Warm up, then measure memory from here.
            await http.post("/v1/inference_sse", json={"prompt": "warm", "max_tokens": 4})
            start_rss = rss_kib(server.proc.pid)
            async with trio.open_nursery() as nursery:
                for i in range(CLIENTS):
                    nursery.start_soon(client, http, i)
                    await trio.sleep(rng.random() * 0.1)
            with trio.fail_after(60):  # a hang guard: the last streams wind down
                while True:
                    status = (await http.get("/v1/status")).json()
                    concurrency = status["concurrency"]
                    if concurrency["active"] == 0 and concurrency["queued"] == 0:
                        break
                    await trio.sleep(0.05)
            settled = status["engine"]["tokens_generated"]
            await trio.sleep(0.5)
            status = (await http.get("/v1/status")).json()
            assert status["engine"]["tokens_generated"] == settled
            final = await http.post("/v1/inference_sse", json={"prompt": "end", "max_tokens": 3})
            assert "event: complete" in final.text
            growth_mib = (rss_kib(server.proc.pid) - start_rss) / 1024
        assert growth_mib < 64, f"server RSS grew by {growth_mib:.1f} MiB"
    assert sum(outcomes.values()) == CLIENTS
    assert outcomes.get("disconnect", 0) and outcomes.get("complete", 0)

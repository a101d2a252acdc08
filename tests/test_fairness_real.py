"""Fair sharing and rate limits on the real model, over a real socket.

One slot, so the order of service is the order of completion: key A floods 20
requests, key B sends one; B runs right after A's running request and is never
refused, while A gets 429 `per_key_limit` beyond its share. Key C spends its tokens
per minute: what a cancelled request did not generate is given back, and a request
over the budget gets 429 `rate_limited` with `X-RateLimit-*`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel

from .server_process import ServerProcess, model_env
from .sse_client import aparse

pytestmark = pytest.mark.model

KEYS = {"a": "real-fair-a", "b": "real-fair-b", "c": "real-fair-c"}
TOKENS_PER_MINUTE = 600


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def fair_server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(
        model_path,
        API_KEYS=",".join(KEYS.values()),
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="24",
        MAX_QUEUED_PER_KEY="10",
        MAX_TOKENS_LIMIT="512",
        RATE_LIMIT_TOKENS_PER_MINUTE=str(TOKENS_PER_MINUTE),
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


async def concurrency(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/status", headers=auth("a"))
    data: dict[str, Any] = response.json()["concurrency"]
    return data


async def wait_for(client: httpx.AsyncClient, *, active: int, queued: int) -> None:
    with trio.fail_after(120):  # a hang guard
        while True:
            now = await concurrency(client)
            if (now["active"], now["queued"]) == (active, queued):
                return
            await trio.sleep(0.02)


async def test_a_flood_by_one_key_does_not_hold_back_another(fair_server: ServerProcess) -> None:
    completed: list[str] = []
    refused: list[tuple[str, int, str]] = []
    b_queued: list[dict[str, Any]] = []

    async def send(client: httpx.AsyncClient, name: str, rid: str) -> None:
        body = {"prompt": "Count: one, two,", "max_tokens": 2, "temperature": 0,
                "request_id": rid}
        async with client.stream("POST", "/v1/inference_sse", json=body,
                                 headers=auth(name)) as response:
            if response.status_code != 200:
                error = json.loads(await response.aread())["error"]
                refused.append((rid, response.status_code, error["code"]))
                return
            async for event in aparse(response.aiter_lines()):
                if event.event == "queued" and name == "b":
                    b_queued.append(event.data)
                if event.event == "complete":
                    completed.append(rid)

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=fair_server.url, timeout=120, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(send, client, "a", f"a{i}")
                await trio.lowlevel.checkpoint()
            await wait_for(client, active=1, queued=10)
            nursery.start_soon(send, client, "b", "b")
        assert len(refused) == 9
        assert {(status, code) for _, status, code in refused} == {(429, "per_key_limit")}
        assert all(rid.startswith("a") for rid, _, _ in refused)
        assert b_queued == [{"request_id": "b", "position": 0}]
        # One slot, and B queued first in line: it runs right after the A request that
        # held the slot when it arrived; that is A's first or, when A's first 2-token
        # request ended before B's reached the server, A's second (the exact order is
        # checked on a fake engine with MockClock in test_fairness_routes.py).
        assert completed.index("b") <= 2
        assert len(completed) == 12


async def test_tokens_per_minute_reserved_given_back_and_refused(
    fair_server: ServerProcess,
) -> None:
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 500}
    async with httpx.AsyncClient(base_url=fair_server.url, timeout=120) as client:
        # Cut after its first token: the ~499 tokens it never generated come back.
        async with client.stream("POST", "/v1/inference_sse", json=body,
                                 headers=auth("c")) as first:
            assert first.status_code == 200
            assert int(first.headers["x-ratelimit-limit"]) == TOKENS_PER_MINUTE
            assert int(first.headers["x-ratelimit-remaining"]) < TOKENS_PER_MINUTE - 500
            async for event in aparse(first.aiter_lines()):
                if event.event == "token":
                    break
        await wait_for(client, active=0, queued=0)
        with trio.fail_after(30):  # the give-back follows the release of the slot
            while True:
                second = client.stream("POST", "/v1/inference_sse", json=body,
                                       headers=auth("c"))
                response = await second.__aenter__()
                if response.status_code == 200:
                    break
                await second.__aexit__(None, None, None)
                await trio.sleep(0.05)
        try:
            # The second holds ~510 of 600: a third is over the budget.
            third = await client.post("/v1/inference_sse", json=body, headers=auth("c"))
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "rate_limited"
            assert int(third.headers["retry-after"]) >= 1
            assert third.headers["x-ratelimit-limit"] == str(TOKENS_PER_MINUTE)
            assert int(third.headers["x-ratelimit-remaining"]) < 500
        finally:
            await second.__aexit__(None, None, None)

"""The time budget for prompt chunks (`PREFILL_STEP_FACTOR`) on the real model, over a
real socket (httpx): the engine measures what a decode pass and a prompt token cost,
shows it in /v1/status, and beside a decoding stream spreads a long prompt over the
steps that budget allows instead of the few the token budget alone would take.

What is checked is counted (steps, tokens), not timed: with a factor just above 1 the
time budget is always below its floor (a quarter of `PREFILL_CHUNK_TOKENS`), whatever
the machine's speed, so the chunk size beside a decoder is known exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from .server_process import ServerProcess, model_env
from .test_fair_prefill_real import long_prompt
from .test_sse_real import status, wait_idle

pytestmark = pytest.mark.model

CHUNK = 128  # PREFILL_CHUNK_TOKENS
FLOOR = CHUNK // 4  # the least prompt work a step beside decoders carries
NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: the stream goes on


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(model_path, ENGINE="batched", MAX_CONCURRENT_REQUESTS="2",
                    PREFILL_CHUNK_TOKENS=str(CHUNK), PREFILL_STEP_FACTOR="1.01",
                    PREFIX_CACHE_SEQUENCES="0")
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


async def test_costs_are_measured_and_shown(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        before = (await status(client))["engine"]
        assert before["decode_pass_ms"] is None and before["prompt_budget_timed"] is None
        response = await client.post("/v1/completions", json={
            "prompt": long_prompt("warm")[:200], "max_tokens": 8, "temperature": 0,
            "logit_bias": NO_END})
        assert response.status_code == 200, response.text
        engine = (await status(client))["engine"]
        assert engine["decode_pass_ms"] > 0 and engine["prompt_token_ms"] > 0
        assert engine["prompt_budget_timed"] == FLOOR  # (1.01 - 1) decode passes: the floor


async def test_a_long_prompt_beside_a_decoding_stream_takes_small_chunks(
        server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        warm = await client.post("/v1/completions", json={
            "prompt": long_prompt("warm2")[:200], "max_tokens": 4, "temperature": 0,
            "logit_bias": NO_END})
        assert warm.status_code == 200, warm.text  # costs measured (the first test may not run)
        tokens_seen = trio.Event()
        stream_tokens = 0

        async def decode_along() -> None:
            nonlocal stream_tokens
            body = {"prompt": "Count: one, two,", "max_tokens": 1000, "temperature": 0,
                    "stream": True, "logit_bias": NO_END}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        stream_tokens += 1
                        if stream_tokens == 3:
                            tokens_seen.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(decode_along)
            with trio.fail_after(120):
                await tokens_seen.wait()
            steps0 = (await status(client))["engine"]["steps"]
            during0 = stream_tokens
            response = await client.post("/v1/completions", json={
                "prompt": long_prompt("beside"), "max_tokens": 1, "temperature": 0})
            assert response.status_code == 200, response.text
            steps = (await status(client))["engine"]["steps"] - steps0
            during = stream_tokens - during0
            nursery.cancel_scope.cancel()
        prompt = response.json()["usage"]["prompt_tokens"]
        assert prompt > 4 * CHUNK  # the token budget alone: at most 5 prompt steps
        # Every step beside the decoder carries at most FLOOR + 1 prompt tokens.
        assert steps >= math.ceil(prompt / (FLOOR + 1)), (steps, prompt)
        assert during >= steps - 2  # and the stream got a token from (almost) each of them
        data = await wait_idle(client)
        assert json.dumps(data["engine"]["prompt_budget_timed"]) == str(FLOOR)

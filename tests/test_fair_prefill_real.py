"""The batched engine's prompt order on the real model, over a real socket (httpx).

Four slots and a small step budget (PREFILL_CHUNK_TOKENS=16), so a ~600-token prompt
takes dozens of steps. Every request is admitted at once (no queue): what is checked is
the order in which the engine evaluates prompts, by the order of first tokens (events,
not wall clock). A light key's short prompt sent after two heavy keys' long ones gets
its first token before either of them (in arrival order it would wait for both); a
`high` key's long prompt sent after a `low` key's gets its first token first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from .server_process import ServerProcess, model_env
from .sse_client import aparse
from .test_sse_real import status, wait_idle

pytestmark = pytest.mark.model

KEYS = {"heavy1": "real-fp-heavy1", "heavy2": "real-fp-heavy2", "light": "real-fp-light",
        "bulk": "real-fp-bulk", "vip": "real-fp-vip"}
CLASSES = {"bulk": "low", "vip": "high"}


def long_prompt(seed: str) -> str:
    return " ".join(f"{seed} {i}." for i in range(150))  # ~600 tokens


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("fair-prefill") / "keys"
    keys.write_text("".join(
        f"{key} priority={CLASSES[name]}\n" if name in CLASSES else f"{key}\n"
        for name, key in KEYS.items()))
    env = model_env(model_path, API_KEYS_FILE=str(keys), MAX_CONCURRENT_REQUESTS="4",
                    PREFILL_CHUNK_TOKENS="16", MAX_QUEUE_SIZE="8", ENGINE="batched")
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


async def active(client: httpx.AsyncClient) -> int:
    response = await client.get("/v1/status", headers={
        "Authorization": f"Bearer {KEYS['light']}"})
    return int(response.json()["concurrency"]["active"])


async def first_tokens_in_order(url: str, sends: list[tuple[str, str]]) -> list[str]:
    """Send each (key name, prompt) once the ones before it run; the key names in the
    order their first token arrived."""
    order: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def send(name: str, prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
            async with client.stream("POST", "/v1/inference_sse", json=body, headers={
                    "Authorization": f"Bearer {KEYS[name]}"}) as response:
                assert response.status_code == 200, await response.aread()
                async for event in aparse(response.aiter_lines()):
                    if event.event == "token" and name not in order:
                        order.append(name)

        async with trio.open_nursery() as nursery:
            for i, (name, prompt) in enumerate(sends):
                nursery.start_soon(send, name, prompt)
                with trio.fail_after(60):  # admitted: its prompt is in the engine
                    while await active(client) < i + 1:
                        await trio.sleep(0.01)
    return order


async def test_a_light_keys_short_prompt_goes_before_heavy_keys_long_ones(
        server: ServerProcess) -> None:
    order = await first_tokens_in_order(server.url, [
        ("heavy1", long_prompt("alpha")), ("heavy2", long_prompt("beta")),
        ("light", "Count: one, two,")])
    assert order[0] == "light", order


async def test_a_higher_class_prompt_goes_before_a_lower_class_one(
        server: ServerProcess) -> None:
    order = await first_tokens_in_order(server.url, [
        ("bulk", long_prompt("gamma")), ("vip", long_prompt("delta"))])
    assert order == ["vip", "bulk"], order


@pytest.fixture(scope="module")
def preempt_server(model_path: Path, server_logs: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A step budget larger than the long prompt's first chunk (one pass of ~510
    tokens), batch-invariant decoding and no prefix cache, so a preempted chunk is
    evaluated again from scratch and the heavy answer can be compared token for token."""
    keys = tmp_path_factory.mktemp("preempt") / "keys"
    keys.write_text(f"{KEYS['heavy1']}\n{KEYS['light']}\n")
    env = model_env(model_path, API_KEYS_FILE=str(keys), MAX_CONCURRENT_REQUESTS="2",
                    PREFILL_CHUNK_TOKENS="512", PREFIX_CACHE_SEQUENCES="0",
                    BATCH_INVARIANT="true", ENGINE="batched")
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


async def test_a_light_keys_prompt_preempts_a_heavy_prompt_pass_in_flight(
        preempt_server: ServerProcess) -> None:
    """The light key's prompt arrives while the heavy key's first ~510-token chunk is
    being evaluated: that pass is aborted (the engine counts one preempted chunk), the
    light key gets its first token first, and the heavy answer, its chunk evaluated
    again, is token for token what it is alone (batch-invariant mode)."""
    heavy_body = {"prompt": long_prompt("alpha"), "max_tokens": 8, "temperature": 0}
    auth = {name: {"Authorization": f"Bearer {KEYS[name]}"} for name in ("heavy1", "light")}
    # /v1/status as the light key; each generation names its own key
    async with httpx.AsyncClient(base_url=preempt_server.url, timeout=300,
                                 headers=auth["light"]) as client:
        alone = await client.post("/v1/completions", json=heavy_body, headers=auth["heavy1"])
        assert alone.status_code == 200, alone.text

        async def preempted() -> int:
            return int((await status(client))["engine"]["prompt_chunks_preempted"])

        assert await preempted() == 0
        order: list[str] = []
        answers: dict[str, str] = {}

        async def send(name: str, body: dict[str, object]) -> None:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                                     headers=auth[name]) as response:
                assert response.status_code == 200, await response.aread()
                text = []
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        if name not in order:
                            order.append(name)
                        text.append(json.loads(line[6:])["choices"][0]["text"])
                answers[name] = "".join(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "heavy1", heavy_body)
            with trio.fail_after(60):  # admitted: its first chunk is being evaluated
                while await active(client) < 1:
                    await trio.sleep(0.005)
            nursery.start_soon(send, "light", {"prompt": "Count: one, two,", "max_tokens": 4,
                                               "temperature": 0})
        count = await preempted()
        assert order[0] == "light", (order, count, preempt_server.log()[-3000:])
        assert count == 1
        assert answers["heavy1"] == alone.json()["choices"][0]["text"]
        await wait_idle(client, timeout=30)  # both slots given back, nothing queued

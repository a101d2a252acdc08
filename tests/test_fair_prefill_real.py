"""The batched engine's prompt order on the real model, over a real socket (httpx).

Four slots and a small step budget (PREFILL_CHUNK_TOKENS=16), so a ~600-token prompt
takes dozens of steps. Every request is admitted at once (no queue): what is checked is
the order in which the engine evaluates prompts, by the order of first tokens (events,
not wall clock). A light key's short prompt sent after two heavy keys' long ones gets
its first token before either of them (in arrival order it would wait for both); a
`high` key's long prompt sent after a `low` key's gets its first token first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from .server_process import ServerProcess, model_env
from .sse_client import aparse

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

"""SSE over a real socket against the real llama.cpp engine and the embedded model."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
import trio

from .live import ended_normally
from .server_process import ServerProcess
from .sse_client import SSEEvent, aparse

pytestmark = pytest.mark.model


async def stream_events(
    client: httpx.AsyncClient, body: dict[str, Any], *, method: str = "POST"
) -> tuple[httpx.Response, list[SSEEvent]]:
    kwargs: dict[str, Any] = {"json": body} if method == "POST" else {"params": body}
    async with client.stream(method, "/v1/inference_sse", **kwargs) as response:
        if response.status_code != 200:
            await response.aread()
            return response, []
        events = [e async for e in aparse(response.aiter_lines()) if e.comment is None]
    return response, events


async def status(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/status")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


async def wait_idle(client: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /v1/status until nothing is active or queued (`timeout`: a hang guard)."""
    with trio.fail_after(timeout):
        while True:
            data = await status(client)
            if data["concurrency"]["active"] == 0 and data["concurrency"]["queued"] == 0:
                return data
            await trio.sleep(0.02)


@pytest.fixture(scope="module")
def server(each_engine_server: ServerProcess) -> ServerProcess:
    """Every test here runs on both built-in engines."""
    return each_engine_server


@pytest.fixture
async def client(server: ServerProcess) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        yield c


def vocab(model_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)


async def test_stream_events_in_order_and_consistent(
    client: httpx.AsyncClient, model_path: Path
) -> None:
    prompt = "Once upon a time"
    response, events = await stream_events(
        client, {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    names = [e.event for e in events]
    assert names[0] == "queued" and names[-1] == "complete"
    assert set(names[1:-1]) == {"token"}
    rid = events[0].data["request_id"]
    assert all(e.data["request_id"] == rid for e in events)
    tokens = events[1:-1]
    assert [e.id for e in events] == [f"{rid}:{i}" for i in range(len(events))]
    assert [e.data["index"] for e in tokens] == list(range(len(tokens)))
    complete = events[-1].data
    assert "".join(e.data["text"] for e in tokens) == complete["text"]
    usage = complete["usage"]
    assert ended_normally(complete["finish_reason"], usage["completion_tokens"], 16)
    assert usage["prompt_tokens"] == len(vocab(model_path).tokenize(prompt.encode(), special=True))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert complete["timings"]["ttft_ms"] > 0
    await wait_idle(client)


async def test_deterministic_with_temperature_zero_and_seed(client: httpx.AsyncClient) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "seed": 7}
    first = (await stream_events(client, body))[1][-1].data["text"]
    second = (await stream_events(client, body))[1][-1].data["text"]
    assert first == second and first
    sampled = {"prompt": "Tell me a story.", "max_tokens": 12, "temperature": 1.0, "seed": 42}
    a = (await stream_events(client, sampled))[1][-1].data["text"]
    b = (await stream_events(client, sampled))[1][-1].data["text"]
    assert a == b


async def test_stop_string_ends_the_stream(client: httpx.AsyncClient) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
    full = (await stream_events(client, body))[1][-1].data["text"]
    # Stop on a word that the greedy continuation is known to contain.
    stop = full.split()[3]
    _, events = await stream_events(client, {**body, "stop": [stop]})
    complete = events[-1].data
    assert complete["finish_reason"] == "stop"
    assert stop not in complete["text"]
    assert full.startswith(complete["text"])
    assert complete["usage"]["completion_tokens"] < 64


async def test_get_for_event_source(client: httpx.AsyncClient) -> None:
    response, events = await stream_events(
        client, {"prompt": "Hello", "max_tokens": "4", "temperature": "0"}, method="GET"
    )
    assert response.status_code == 200
    assert events[-1].event == "complete"
    assert events[-1].data["usage"]["completion_tokens"] <= 4


async def test_chat_messages_use_the_gemma_template(client: httpx.AsyncClient) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    response, events = await stream_events(client, body)
    assert response.status_code == 200
    complete = events[-1].data
    assert complete["finish_reason"] in ("stop", "length")
    assert "<end_of_turn>" not in complete["text"]
    # The rendered chat prompt is longer than the raw user text.
    assert complete["usage"]["prompt_tokens"] > 15


def test_curl_streams(server: ServerProcess) -> None:
    out = subprocess.run(
        [
            "curl", "-sN", "-X", "POST", f"{server.url}/v1/inference_sse",
            "-H", "content-type: application/json",
            "-d", json.dumps({"prompt": "Once upon a time", "max_tokens": 8}),
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.startswith("id: ") and "\nevent: queued\n" in out.split("\n\n")[0]
    assert "event: token\n" in out
    assert "event: complete\n" in out


async def test_six_requests_two_slots_two_queued_two_refused(
    client: httpx.AsyncClient,
) -> None:
    """The real engine behind admission: two run, two wait in order, two are refused.

    Arrival order is made by waiting for each stream's `queued` event before sending
    the next (no sleeps), and the two running streams are long enough (400 tokens) to
    still run when the last request arrives on any CPU; they are then cancelled."""
    await wait_idle(client)
    async with AsyncExitStack() as stack:
        streams: list[AsyncIterator[SSEEvent]] = []
        for i in range(4):
            body = {"prompt": f"Story number {i}:", "max_tokens": 400 if i < 2 else 8,
                    "temperature": 0, "request_id": f"six-{i}"}
            response = await stack.enter_async_context(
                client.stream("POST", "/v1/inference_sse", json=body))
            assert response.status_code == 200
            events = aparse(response.aiter_lines())
            first = await anext(events)
            assert first.event == "queued"
            assert first.data["position"] == [0, 0, 0, 1][i], (i, first.data)
            streams.append(events)
        with trio.fail_after(60):  # a hang guard: both slots busy, both queued
            while (await status(client))["concurrency"] != {
                "max": 2, "active": 2, "queued": 2, "queue_capacity": 2,
            }:
                await trio.sleep(0.02)
        for _ in range(2):
            refused = await client.post("/v1/inference_sse", json={"prompt": "x"})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
        for i in (0, 1):
            cancelled = await client.post(f"/v1/inference_sse/six-{i}/cancel")
            assert cancelled.status_code == 200
        ends = []
        for events in streams:
            ends.append([e async for e in events if e.comment is None][-1])
    assert [e.event for e in ends] == ["complete"] * 4
    assert [e.data["finish_reason"] for e in ends[:2]] == ["cancelled"] * 2
    for end in ends[2:]:  # the queued ones ran once the slots were free
        reason, tokens = end.data["finish_reason"], end.data["usage"]["completion_tokens"]
        assert ended_normally(reason, tokens, 8)
    # The queued two waited for the cancels; the running two were admitted at once.
    waited = [e.data["timings"]["queued_ms"] for e in ends]
    assert min(waited[2:]) > max(waited[:2])
    await wait_idle(client)


async def test_disconnect_mid_stream_frees_the_slot(client: httpx.AsyncClient) -> None:
    await wait_idle(client)
    before = (await status(client))["engine"]["tokens_generated"]
    async with client.stream(
        "POST", "/v1/inference_sse", json={"prompt": "Once upon a time", "max_tokens": 400}
    ) as response:
        seen = 0
        async for event in aparse(response.aiter_lines()):
            if event.event == "token":
                seen += 1
                if seen == 5:
                    break
    # The client closed the connection: the slot is freed and decoding stops, long
    # before max_tokens (how many tokens the server made before it noticed depends on
    # how far it ran ahead of this client, i.e. on the load; the exact count is
    # test_sse_routes.py's, on the fake engine).
    after = await wait_idle(client, timeout=60)  # a hang guard, not a budget
    generated = after["engine"]["tokens_generated"] - before
    assert 5 <= generated < 400
    await trio.sleep(0.5)  # nothing more is decoded for it afterwards
    assert (await status(client))["engine"]["tokens_generated"] == after["engine"][
        "tokens_generated"
    ]
    _, events = await stream_events(client, {"prompt": "Next", "max_tokens": 4})
    assert events[-1].event == "complete"



"""SSE over a real socket against the real llama.cpp engine and the embedded model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
import trio

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


async def wait_idle(client: httpx.AsyncClient, timeout: float = 5.0) -> dict[str, Any]:
    """Poll /v1/status until nothing is active or queued (or fail)."""
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
    assert [int(e.id or -1) for e in tokens] == list(range(len(tokens)))
    assert [e.data["index"] for e in tokens] == list(range(len(tokens)))
    complete = events[-1].data
    assert "".join(e.data["text"] for e in tokens) == complete["text"]
    assert complete["finish_reason"] == "length"
    usage = complete["usage"]
    assert usage["completion_tokens"] == 16
    assert usage["prompt_tokens"] == len(vocab(model_path).tokenize(prompt.encode(), special=True))
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16
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
    assert out.startswith("event: queued\n")
    assert "event: token\n" in out
    assert "event: complete\n" in out


async def test_six_requests_two_slots_two_queued_two_refused(
    client: httpx.AsyncClient,
) -> None:
    await wait_idle(client)
    results: list[tuple[int, list[SSEEvent], dict[str, str]]] = []

    async def one(i: int) -> None:
        body = {"prompt": f"Story number {i}:", "max_tokens": 24, "temperature": 0}
        response, events = await stream_events(client, body)
        results.append((response.status_code, events, dict(response.headers)))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
            await trio.sleep(0.05)  # arrive in order
    codes = sorted(code for code, _, _ in results)
    assert codes == [200, 200, 200, 200, 429, 429]
    for code, events, headers in results:
        if code == 429:
            assert int(headers["retry-after"]) >= 1
            continue
        assert events[-1].event == "complete"
        assert events[-1].data["finish_reason"] == "length"
    positions = sorted(events[0].data["position"] for code, events, _ in results if code == 200)
    assert positions == [0, 0, 0, 1]
    queued_ms = sorted(
        events[-1].data["timings"]["queued_ms"] for code, events, _ in results if code == 200
    )
    assert queued_ms[2] > 50  # the two queued ones really waited
    await wait_idle(client)


async def test_429_body(client: httpx.AsyncClient, server: ServerProcess) -> None:
    if server.env.get("ENGINE") == "llama":
        # The body comes from admission, not the engine; the pool's 429s are covered by
        # test_six_requests_two_slots_two_queued_two_refused.
        pytest.skip("engine-independent: run on the default engine only")
    await wait_idle(client)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(
                stream_events, client,
                {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0},
            )
        with trio.fail_after(30):  # both slots busy and the queue full, however slow the machine
            while (await status(client))["concurrency"]["queued"] < 2:
                await trio.sleep(0.05)
        response = await client.post("/v1/inference_sse", json={"prompt": "Hi"})
        assert response.status_code == 429
        assert response.headers["retry-after"]
        error = response.json()["error"]
        assert error == {
            "type": "rate_limit_error",
            "code": "queue_full",
            "message": error["message"],
            "param": None,
        }
        nursery.cancel_scope.cancel()  # the four streams disconnect
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
    # The client closed the connection: within a token or two the slot is free.
    after = await wait_idle(client, timeout=2.0)
    generated = after["engine"]["tokens_generated"] - before
    assert generated < 30
    await trio.sleep(0.5)
    assert (await status(client))["engine"]["tokens_generated"] == after["engine"][
        "tokens_generated"
    ]
    _, events = await stream_events(client, {"prompt": "Next", "max_tokens": 4})
    assert events[-1].event == "complete"


async def test_disconnect_while_queued_leaves_the_queue(client: httpx.AsyncClient) -> None:
    await wait_idle(client)
    before = (await status(client))["engine"]["tokens_generated"]
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(
                stream_events, client,
                {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 0},
            )
        with trio.fail_after(10):  # both slots busy before the third request arrives
            while (await status(client))["concurrency"]["active"] != 2:
                await trio.sleep(0.02)
        async with client.stream(
            "POST", "/v1/inference_sse", json={"prompt": "queued one", "max_tokens": 200}
        ) as response:
            events = aparse(response.aiter_lines())  # keep a reference: dropping the
            first = await events.__anext__()  # iterator would close the connection
            assert first.event == "queued" and first.data["position"] == 0
            assert (await status(client))["concurrency"]["queued"] == 1
        with trio.fail_after(2):
            while (await status(client))["concurrency"]["queued"] != 0:
                await trio.sleep(0.02)
        assert (await status(client))["concurrency"]["active"] == 2
    after = await wait_idle(client)
    # Only the two running requests decoded: the queued one never reached the engine.
    assert after["engine"]["tokens_generated"] - before == 2 * 96


async def test_keepalive_comments_while_queued(client: httpx.AsyncClient) -> None:
    await wait_idle(client)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(
                stream_events, client,
                {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0},
            )
        await trio.sleep(0.2)
        comments = 0
        async with client.stream(
            "POST", "/v1/inference_sse", json={"prompt": "wait", "max_tokens": 2}
        ) as response:
            async for event in aparse(response.aiter_lines()):
                if event.comment == "keepalive":
                    comments += 1
        assert comments >= 1
    await wait_idle(client)

"""`POST /v1/inference_sse/{request_id}/cancel` against the real model over a real socket:
a running stream ends with `complete` / `cancelled`, the engine stops decoding, and the
turn is stored as cancelled. The cancel logic itself (queued streams, owners, a cancel
before the first event, late cancels) is tested in process: test_sse_routes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .server_process import ServerProcess, model_env
from .sse_client import SSEEvent, aparse

pytestmark = pytest.mark.model

ALPHA = {"Authorization": "Bearer alpha-key"}


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="1",
        MAX_TOKENS_LIMIT="512",
        SSE_KEEPALIVE_SECONDS="0.2",
        API_KEYS="alpha-key,beta-key",
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=ALPHA) as c:
        yield c


async def concurrency(client: httpx.AsyncClient) -> dict[str, int]:
    response = await client.get("/v1/status")
    assert response.status_code == 200
    data: dict[str, int] = response.json()["concurrency"]
    return data


async def wait_concurrency(client: httpx.AsyncClient, *, active: int, queued: int) -> None:
    with trio.fail_after(60):  # a hang guard, not a budget
        while True:
            now = await concurrency(client)
            if (now["active"], now["queued"]) == (active, queued):
                return
            await trio.sleep(0.02)


async def cancel(client: httpx.AsyncClient, rid: str, **kwargs: Any) -> httpx.Response:
    return await client.post(f"/v1/inference_sse/{rid}/cancel", **kwargs)


def data_only(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if e.comment is None]


async def test_cancel_mid_stream(client: httpx.AsyncClient) -> None:
    await wait_concurrency(client, active=0, queued=0)
    sid = (await client.post("/v1/sessions")).json()["id"]
    body = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400,
            "temperature": 0, "session_id": sid, "request_id": "real-cancel-1"}
    events: list[SSEEvent] = []
    async with client.stream("POST", "/v1/inference_sse", json=body) as response:
        assert response.status_code == 200
        async for event in aparse(response.aiter_lines()):
            events.append(event)
            if event.event == "token" and event.data["index"] == 3:
                answer = await cancel(client, "real-cancel-1")
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"request_id": "real-cancel-1", "cancelled": True}
    events = data_only(events)
    names = [e.event for e in events]
    assert names[0] == "queued" and names[-1] == "complete"
    complete = events[-1].data
    assert complete["finish_reason"] == "cancelled"
    tokens = "".join(e.data["text"] for e in events if e.event == "token")
    assert complete["text"] == tokens and tokens
    assert 4 <= complete["usage"]["completion_tokens"] < 400
    await wait_concurrency(client, active=0, queued=0)
    messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["finish_reason"] == "cancelled"
    assert messages[-1]["content"] == complete["text"]
    late = await cancel(client, "real-cancel-1")
    assert late.status_code == 404
    assert late.json()["error"]["code"] == "request_not_found"

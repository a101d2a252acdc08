"""`POST /v1/inference_sse/{request_id}/cancel` against the real model over a real socket:
a running stream ends with `complete` / `cancelled` and its turn stored as cancelled, a
queued one leaves the queue, and one identity can neither cancel nor see another's."""

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
BETA = {"Authorization": "Bearer beta-key"}


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
    with trio.fail_after(10):
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


async def test_cancel_while_queued(client: httpx.AsyncClient) -> None:
    await wait_concurrency(client, active=0, queued=0)
    async with trio.open_nursery() as nursery:
        holder_events: list[SSEEvent] = []

        async def holder() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 400, "request_id": "holder-1"}
            async with client.stream("POST", "/v1/inference_sse", json=body) as response:
                holder_events.extend([e async for e in aparse(response.aiter_lines())])

        nursery.start_soon(holder)
        await wait_concurrency(client, active=1, queued=0)
        body = {"prompt": "Hello", "max_tokens": 8, "request_id": "queued-1"}
        events: list[SSEEvent] = []
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            async for event in aparse(response.aiter_lines()):
                events.append(event)
                if event.event == "queued":
                    assert event.data["position"] == 0
                    await wait_concurrency(client, active=1, queued=1)
                    full = await client.post("/v1/inference_sse", json={"prompt": "x"})
                    assert full.status_code == 429
                    assert (await cancel(client, "queued-1")).status_code == 200
        events = data_only(events)
        assert [e.event for e in events] == ["queued", "complete"]
        assert events[-1].data["finish_reason"] == "cancelled"
        assert events[-1].data["usage"]["completion_tokens"] == 0
        await wait_concurrency(client, active=1, queued=0)
        # Its place is free: another request may queue behind the holder again.
        async with client.stream("POST", "/v1/inference_sse",
                                 json={"prompt": "Hi", "max_tokens": 2}) as response:
            assert response.status_code == 200
            assert (await cancel(client, "holder-1")).status_code == 200
            tail = data_only([e async for e in aparse(response.aiter_lines())])
            assert tail[-1].event == "complete"
    assert data_only(holder_events)[-1].data["finish_reason"] == "cancelled"
    await wait_concurrency(client, active=0, queued=0)


async def test_unknown_id_and_another_owner_are_404(client: httpx.AsyncClient) -> None:
    unknown = await cancel(client, "no-such-request")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "type": "not_found_error", "code": "request_not_found",
        "message": "no running generation of yours has this request_id",
        "param": "request_id",
    }
    await wait_concurrency(client, active=0, queued=0)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "request_id": "owned-1"}
    async with client.stream("POST", "/v1/inference_sse", json=body) as response:
        events = aparse(response.aiter_lines())
        async for event in events:
            if event.event == "token":
                break
        other = await cancel(client, "owned-1", headers=BETA)
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "request_not_found"
        anonymous = await cancel(client, "owned-1", headers={"Authorization": ""})
        assert anonymous.status_code == 401
        assert (await cancel(client, "owned-1")).status_code == 200
        rest = data_only([e async for e in events])
    assert rest[-1].event == "complete" and rest[-1].data["finish_reason"] == "cancelled"
    await wait_concurrency(client, active=0, queued=0)

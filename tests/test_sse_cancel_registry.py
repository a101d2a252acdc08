"""The SSE cancel registry never leaks: whatever ends a stream (completion, a cancel, a
disconnect, an engine error, a refusal), its entry is gone. Real Hypercorn on a socket,
in process with the fake engine, so the test can look inside the generation service's
registry of live generations."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.core.engine import Chunk, EngineError, EngineRequest, Finish
from fabricai_trio.settings import Settings

from .fakes import FakeEngine
from .sse_client import SSEEvent, aparse


class FailingEngine(FakeEngine):
    """Two tokens, then an engine failure."""

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        for _ in range(2):
            await trio.sleep(self.step_seconds)
            yield Chunk(" word", 1)
        raise EngineError("the fake engine broke")


@asynccontextmanager
async def served(
    engine_class: type[FakeEngine] = FakeEngine, **overrides: Any
) -> AsyncIterator[tuple[FabricApp, httpx.AsyncClient]]:
    settings = Settings(  # type: ignore[call-arg]
        session_store="memory", max_concurrent_requests=1, max_queue_size=1,
        sse_keepalive_seconds=0.05, **overrides,
    )
    app = create_app(settings, engine=engine_class(settings, step_seconds=0.02))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
            with trio.fail_after(5):
                while (await client.get("/health")).status_code != 200:
                    await trio.sleep(0.01)
            yield app, client
        stop.set()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def cancel(client: httpx.AsyncClient, rid: str, **kwargs: Any) -> httpx.Response:
    return await client.post(f"/v1/inference_sse/{rid}/cancel", **kwargs)


def data_events(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if e.comment is None]


async def test_completed_stream_leaves_the_registry_before_its_last_event() -> None:
    async with served() as (app, client):
        body = {"prompt": "one two", "max_tokens": 3, "request_id": "done-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            async for event in aparse(response.aiter_lines()):
                if event.event == "complete":
                    # Read `complete`, the stream is already gone: a cancel is a 404.
                    assert app.state.service.live_count == 0
                    late = await cancel(client, "done-1")
                    assert late.status_code == 404
                    assert late.json()["error"]["param"] == "request_id"
        assert app.state.service.live_count == 0


async def test_cancel_ends_with_cancelled_complete_and_frees_everything() -> None:
    async with served() as (app, client):
        sid = (await client.post("/v1/sessions")).json()["id"]
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "c-1", "session_id": sid}
        events: list[SSEEvent] = []
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            async for event in aparse(response.aiter_lines()):
                events.append(event)
                if event.event == "token" and event.data["index"] == 2:
                    assert app.state.service.live_count == 1
                    answer = await cancel(client, "c-1")
                    assert answer.status_code == 200
                    assert answer.json() == {"request_id": "c-1", "cancelled": True}
        events = data_events(events)
        assert events[-1].event == "complete"
        complete = events[-1].data
        assert complete["finish_reason"] == "cancelled"
        tokens = [e.data["text"] for e in events if e.event == "token"]
        assert complete["text"] == "".join(tokens) and len(tokens) < 100
        assert app.state.service.live_count == 0
        assert app.state.admission.stats().active == 0
        messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[-1]["finish_reason"] == "cancelled"
        assert messages[-1]["content"] == complete["text"]
        # The session is free again: the next turn is not a 409.
        again = await client.post("/v1/inference_sse", json={**body, "max_tokens": 1,
                                                              "request_id": "c-2"})
        assert again.status_code == 200


async def test_disconnect_leaves_the_registry() -> None:
    async with served() as (app, client):
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "gone-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            async for event in aparse(response.aiter_lines()):
                if event.event == "token":
                    assert app.state.service.live_count == 1
                    break
        await wait_for(lambda: app.state.service.live_count == 0)
        await wait_for(lambda: app.state.admission.stats().active == 0)
        assert (await cancel(client, "gone-1")).status_code == 404


async def test_engine_error_leaves_the_registry() -> None:
    async with served(FailingEngine) as (app, client):
        body = {"prompt": "hello", "max_tokens": 50, "request_id": "err-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            events = data_events([e async for e in aparse(response.aiter_lines())])
        assert events[-1].event == "error"
        assert events[-1].data["code"] == "engine_error" and events[-1].data["status"] == 500
        assert app.state.service.live_count == 0
        assert (await cancel(client, "err-1")).status_code == 404


async def test_cancel_while_queued_frees_the_queue_place() -> None:
    async with served() as (app, client), trio.open_nursery() as nursery:
        holder_done = trio.Event()

        async def holder() -> None:
            body = {"prompt": "hold", "max_tokens": 500, "request_id": "hold-1"}
            async with client.stream("POST", "/v1/inference_sse", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
            holder_done.set()

        nursery.start_soon(holder)
        await wait_for(lambda: app.state.admission.stats().active == 1)
        body = {"prompt": "wait", "max_tokens": 5, "request_id": "queued-1"}
        events: list[SSEEvent] = []
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            async for event in aparse(response.aiter_lines()):
                events.append(event)
                if event.event == "queued":
                    assert app.state.admission.stats().queued == 1
                    # The queue (size 1) is full: a third request is refused, unregistered.
                    full = await client.post("/v1/inference_sse", json={"prompt": "x"})
                    assert full.status_code == 429
                    assert app.state.service.live_count == 2
                    assert (await cancel(client, "queued-1")).status_code == 200
        events = data_events(events)
        assert [e.event for e in events] == ["queued", "complete"]
        assert events[-1].data["finish_reason"] == "cancelled"
        assert events[-1].data["usage"]["completion_tokens"] == 0
        assert app.state.admission.stats().queued == 0
        engine = app.state.engine
        assert isinstance(engine, FakeEngine) and "queued-1" not in engine.started
        assert app.state.service.live_count == 1
        # The place is free: a new request may queue again.
        async with client.stream("POST", "/v1/inference_sse",
                                 json={"prompt": "next", "max_tokens": 1}) as response:
            assert response.status_code == 200
            assert (await cancel(client, "hold-1")).status_code == 200
            await response.aread()
        await holder_done.wait()
        assert app.state.service.live_count == 0
        assert app.state.admission.stats().active == 0


async def test_a_cancel_before_the_first_step_still_ends_the_stream() -> None:
    """Registered before the response starts: a cancel that beats the body is kept."""
    async with served() as (app, client):
        generation_seen = trio.Event()
        service = app.state.service
        original = service.prepare

        async def prepare(request: Any, *, owner: str) -> Any:
            generation = await original(request, owner=owner)
            # as if a cancel arrived between the route and the body
            assert await service.cancel(owner, generation.request_id, "cancel")
            generation_seen.set()
            return generation

        service.prepare = prepare  # type: ignore[method-assign]
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "early-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            events = data_events([e async for e in aparse(response.aiter_lines())])
        assert generation_seen.is_set()
        assert [e.event for e in events] == ["queued", "complete"]
        assert events[-1].data["finish_reason"] == "cancelled"
        assert app.state.service.live_count == 0
        assert app.state.admission.stats().active == 0


async def test_owners_are_apart() -> None:
    async with served(api_keys="alpha-key,beta-key") as (app, client):
        alpha = {"Authorization": "Bearer alpha-key"}
        beta = {"Authorization": "Bearer beta-key"}
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "shared-id"}
        async with client.stream("POST", "/v1/inference_sse", json=body,
                                 headers=alpha) as response:
            events = aparse(response.aiter_lines())
            async for event in events:
                if event.event == "token":
                    break
            assert (await cancel(client, "shared-id")).status_code == 401
            other = await cancel(client, "shared-id", headers=beta)
            assert other.status_code == 404
            assert other.json()["error"]["code"] == "request_not_found"
            assert app.state.service.live_count == 1
            assert (await cancel(client, "shared-id", headers=alpha)).status_code == 200
            rest = data_events([e async for e in events])
        assert rest[-1].data["finish_reason"] == "cancelled"
        await wait_for(lambda: app.state.service.live_count == 0)

"""The services nursery owns the engine, the session store and the Redis client: each
is closed after the tasks that use it have ended, and the cross-replica cancel goes
through the generation service (fake engine, real Redis, no sockets of ours)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator

import pytest
import redis
import trio

from fabricai_trio.app import FabricApp, create_app, run_services
from fabricai_trio.core.engine import Chunk, EngineRequest, Finish
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.settings import Settings

from .fakes import FakeEngine
from .redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server.url


def clients(url: str) -> int:
    """Connections to Redis other than this probe's own."""
    probe = redis.Redis.from_url(url)
    try:
        return len(probe.client_list()) - 1
    finally:
        probe.close()


class ClosingEngine(FakeEngine):
    """Records the order in which the engine is used and closed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, step_seconds=0.01)
        self.events: list[str] = []

    async def aclose(self) -> None:
        self.events.append("aclose")
        await super().aclose()

    async def generate_stream(self, request: EngineRequest
                              ) -> AsyncGenerator[Chunk | Finish, None]:
        self.events.append("generate")
        async for item in super().generate_stream(request):
            yield item


def make_app(url: str) -> tuple[FabricApp, ClosingEngine]:
    settings = Settings(  # type: ignore[call-arg]
        redis_url=url, session_store="memory", redis_prefix="lifetime:",
        max_concurrent_requests=2,
    )
    engine = ClosingEngine(settings)
    return create_app(settings, engine=engine), engine


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_redis_client_and_engine_are_closed_after_the_services_end(
    redis_url: str,
) -> None:
    baseline = clients(redis_url)
    app, engine = make_app(redis_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_services, app)
        await wait_until(lambda: app.state.service.ready)
        assert clients(redis_url) > baseline  # the cancel subscription is up
        app.services_scope.cancel()
    assert app.services_done.is_set()
    assert engine.events == ["generate", "aclose"]  # the warm-up, then closed last
    await wait_until(lambda: clients(redis_url) == baseline)


async def test_a_cancel_reaches_the_replica_that_runs_the_generation(
    redis_url: str,
) -> None:
    """Two apps (two replicas) on one Redis: B's service forwards the cancel to A."""
    a, _ = make_app(redis_url)
    b, _ = make_app(redis_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_services, a)
        await nursery.start(run_services, b)
        await wait_until(lambda: a.state.service.ready and b.state.service.ready)
        request = GenerationRequest(prompt="hello", max_tokens=4000, request_id="far-1")
        generation = await a.state.service.prepare(request, owner="alice")
        finals = []

        async def consume() -> None:
            async for event in generation.events():
                finals.append(event)

        nursery.start_soon(consume)
        await wait_until(lambda: generation.completion_tokens > 2)
        # Until the live key is written, B cannot know; afterwards it forwards.
        with trio.fail_after(10):
            while not await b.state.service.cancel("alice", "far-1", "cancel"):
                assert not await b.state.service.cancel("mallory", "far-1", "cancel")
                await trio.sleep(0.01)
        await wait_until(lambda: generation.finish_reason is not None)
        assert generation.finish_reason == "cancelled"
        assert generation.cancel_cause == "cancel"
        # Another owner never finds it, on either replica; after the end nobody does.
        assert not await b.state.service.cancel("alice", "far-1", "cancel")
        assert not await a.state.service.cancel("alice", "far-1", "cancel")
        a.services_scope.cancel()
        b.services_scope.cancel()

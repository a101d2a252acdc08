"""The whole app (`create_app`) in process on the fake engine, for route tests whose
point is queueing, cancellation and disconnects rather than sockets or the model.

Tests use pytest-trio's `autojump_clock`: the fake engine's steps, the SSE keep-alive
timer and every other timer of the app run in virtual time, so a test takes
milliseconds of real time and does not depend on how busy the machine is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.core.engine import Chunk, EngineError, EngineRequest, Finish
from fabricai_trio.sessions import MemorySessionStore
from fabricai_trio.settings import Settings

from .asgi_harness import Client, serve
from .fakes import FakeEngine
from .sse_client import SSEEvent

STEP_S = 0.1
"""Virtual seconds per fake token."""
KEEPALIVE_S = 0.5
"""SSE_KEEPALIVE_SECONDS in these tests (virtual)."""


class FailingEngine(FakeEngine):
    """Two tokens, then an engine failure."""

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        self.started.append(request.request_id)
        for _ in range(2):
            await trio.sleep(self.step_seconds)
            self.tokens_generated += 1
            yield Chunk(" word", 1)
        raise EngineError("the fake engine broke")


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "session_store": "memory",
        "max_concurrent_requests": 1,
        "max_queue_size": 2,
        "sse_keepalive_seconds": KEEPALIVE_S,
        "retry_after_seconds": 3,
        "max_tokens_limit": 512,
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def running(
    engine_class: type[FakeEngine] = FakeEngine, *, headers: dict[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Client, FakeEngine, FabricApp]]:
    """The app with its lifespan running on a fake engine and a memory store; on exit,
    with every stream closed, nothing may be left running, queued or registered."""
    config = settings(**overrides)
    engine = engine_class(config, step_seconds=STEP_S)
    app = create_app(config, engine=engine, store=MemorySessionStore())
    keys = str(overrides.get("api_keys") or "").split(",")
    admin = {"authorization": f"Bearer {keys[0]}"} if keys[0] else {}
    async with serve(app, headers=headers or {}) as client:
        # The app warmed the engine up before it took traffic: count from here on.
        engine.started.clear()
        engine.tokens_generated = engine.max_in_use = 0
        yield client, engine, app
        # Whatever the test did, once its streams are closed nothing is left live.
        await client.wait_status(active=0, queued=0, headers=admin)
        assert app.state.service.live_count == 0


def data_events(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if e.comment is None]


def names(events: list[SSEEvent]) -> list[str | None]:
    return [e.event for e in events if e.comment is None]

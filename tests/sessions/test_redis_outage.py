"""Redis outages: a paused Redis (calls time out), a stopped or killed one (connections
refused). Every call must fail fast with `StoreUnavailable`, `ping()` must say False, and
the same store object must work again once Redis is back, with no restart of ours."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from fabricai_trio.sessions import Message, SessionStore, StoreUnavailable

from ..redis_server import RedisServer, redis_server_binary

TIMEOUT = 0.5  # store_timeout_seconds for these tests
FAST = 2.0  # "fails fast": well under the 5 s budget, even on a busy machine


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server of this test's own: the tests stop and pause it."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as private:
        yield private


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[SessionStore]:
    from fabricai_trio.sessions.redis_store import RedisSessionStore

    redis_store = RedisSessionStore(
        server.url, prefix="outage:", ttl_seconds=600, timeout_seconds=TIMEOUT
    )
    yield redis_store
    await redis_store.aclose()


def turn(tag: str) -> list[Message]:
    return [
        Message(role="user", content=f"q {tag}", request_id=tag),
        Message(role="assistant", content=f"a {tag}", finish_reason="stop", request_id=tag),
    ]


def every_call(sid: str) -> list[Callable[[SessionStore], Awaitable[Any]]]:
    return [
        lambda s: s.get(sid),
        lambda s: s.append_turn(sid, turn("during-outage")),
        lambda s: s.create("owner"),
        lambda s: s.list_sessions("owner"),
        lambda s: s.try_lock(sid, "tok", 10),
        lambda s: s.unlock(sid, "tok"),
        lambda s: s.delete(sid),
    ]


async def assert_unavailable(store: SessionStore, sid: str) -> None:
    for call in every_call(sid):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call(store)
        assert time.monotonic() - started < FAST
    started = time.monotonic()
    assert await store.ping() is False
    assert time.monotonic() - started < FAST


async def seed(store: SessionStore) -> str:
    session = await store.create("owner", system_prompt="sys")
    await store.append_turn(session.id, turn("t1"))
    await store.append_turn(session.id, turn("t2"))
    return session.id


async def test_paused_redis_times_out_then_recovers(
    server: RedisServer, store: SessionStore
) -> None:
    sid = await seed(store)
    before = await store.get(sid)
    server.pause()
    try:
        await assert_unavailable(store, sid)
        # Many callers at once: each fails after about one timeout, none hangs.
        with trio.fail_after(3 * FAST):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(expect_unavailable, store, sid)
    finally:
        server.resume()
    assert await store.ping() is True
    # The data was in memory all along; nothing written during the pause landed (each
    # write timed out on WATCH, before its MULTI/EXEC was sent).
    assert await store.get(sid) == before
    after = await store.append_turn(sid, turn("t3"))
    assert [m.request_id for m in after.messages[1::2]] == ["t1", "t2", "t3"]


async def expect_unavailable(store: SessionStore, sid: str) -> None:
    with pytest.raises(StoreUnavailable):
        await store.get(sid)


async def test_stopped_redis_refuses_then_reconnects(
    server: RedisServer, store: SessionStore
) -> None:
    sid = await seed(store)
    before = await store.get(sid)
    assert await store.try_lock(sid, "holder", 60) is True
    server.stop(save=True)  # SHUTDOWN SAVE: the restarted server reloads the data
    await assert_unavailable(store, sid)
    server.start()
    # The same store object: its pooled connections are dead, it must reconnect.
    assert await store.ping() is True
    assert await store.get(sid) == before
    assert await store.try_lock(sid, "other", 60) is False  # the lock survived too
    await store.unlock(sid, "holder")  # the unlock script is loaded again after a restart
    assert await store.try_lock(sid, "other", 60) is True
    after = await store.append_turn(sid, turn("t3"))
    assert len(after.messages) == 7


async def test_killed_redis_loses_data_but_store_recovers(
    server: RedisServer, store: SessionStore
) -> None:
    sid = await seed(store)
    server.kill()  # a crash, no persistence: the data is gone
    await assert_unavailable(store, sid)
    server.start()
    assert await store.ping() is True
    assert await store.get(sid) is None
    fresh = await store.create("owner", session_id=f"fresh-{uuid.uuid4().hex[:8]}")
    await store.append_turn(fresh.id, turn("t1"))
    assert [info.id for info in await store.list_sessions("owner")] == [fresh.id]


async def test_connection_lost_mid_transaction_writes_nothing(
    server: RedisServer, store: SessionStore
) -> None:
    from .redis_faults import cut_transactions

    sid = await seed(store)
    before = await store.get(sid)
    with cut_transactions(), pytest.raises(StoreUnavailable):
        await store.append_turn(sid, turn("cut"))
    assert await store.get(sid) == before
    after = await store.append_turn(sid, turn("t3"))
    assert [m.request_id for m in after.messages[1::2]] == ["t1", "t2", "t3"]

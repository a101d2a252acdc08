"""`create_store` picks the backend from the settings and does no I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fabricai_trio.sessions import MemorySessionStore, SessionStore, create_store
from fabricai_trio.sessions.redis_store import RedisSessionStore
from fabricai_trio.sessions.sql import SqlSessionStore
from fabricai_trio.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_memory_by_default() -> None:
    store = create_store(settings(session_store=None, redis_url=None))
    assert isinstance(store, MemorySessionStore) and store.backend == "memory"


async def test_redis_when_url_set() -> None:
    # Port 1 refuses connections: nothing is contacted until the first call.
    store = create_store(settings(redis_url="redis://127.0.0.1:1/0", redis_prefix="p:"))
    assert isinstance(store, RedisSessionStore) and store.backend == "redis"
    assert isinstance(store, SessionStore)
    assert await store.ping() is False
    await store.aclose()


async def test_sql(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = create_store(settings(session_store="sql", database_url=url))
    assert isinstance(store, SqlSessionStore) and store.backend == "sql"
    assert not (tmp_path / "s.db").exists()  # opened on first use
    assert await store.ping() is True
    session = await store.create("o")
    assert await store.get(session.id) == session
    await store.aclose()

"""Fixtures for the session store tests: private Redis and PostgreSQL servers, and one
store factory parametrized over every backend (the contract suite runs on each)."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from fabricai_trio.sessions import MemorySessionStore, SessionStore, StoreLimits

from ..postgres_server import PostgresServer, postgres_binaries
from ..redis_server import RedisServer, redis_server_binary

StoreFactory = Callable[..., SessionStore]

BACKENDS = ["memory", "redis", "sqlite", "sqlite-memory", "postgres"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server shared by the contract tests (never port 6379)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster, created once per test run."""
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    with PostgresServer() as server:
        yield server.url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(backend name, server URL): starts the private server the backend needs, or skips."""
    name: str = request.param
    if name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return name, server.url
    if name == "postgres":
        return name, request.getfixturevalue("postgres_url")
    return name, None


@pytest.fixture
async def make_store(
    backend: tuple[str, str | None], tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """`make_store(ttl_seconds=..., timeout_seconds=..., limits=...)` builds a fresh
    store of the backend under test; all of them are closed after the test."""
    name, url = backend
    made: list[SessionStore] = []

    def factory(
        *,
        ttl_seconds: float = 3600.0,
        timeout_seconds: float = 5.0,
        limits: StoreLimits | None = None,
    ) -> SessionStore:
        store: SessionStore
        limits = limits or StoreLimits()
        if name == "memory":
            store = MemorySessionStore(ttl_seconds=ttl_seconds, limits=limits)
        elif name == "redis":
            from fabricai_trio.sessions.redis_store import RedisSessionStore

            assert url is not None
            store = RedisSessionStore(
                url,
                prefix=f"test:{uuid.uuid4().hex[:8]}:",
                ttl_seconds=ttl_seconds,
                timeout_seconds=timeout_seconds,
                limits=limits,
            )
        else:
            from fabricai_trio.sessions.sql import SqlSessionStore

            if name == "sqlite":
                db_url = f"sqlite:///{tmp_path / f'sessions-{len(made)}.db'}"
            elif name == "sqlite-memory":
                db_url = "sqlite://"
            else:
                assert url is not None
                db_url = url
            store = SqlSessionStore(
                db_url, ttl_seconds=ttl_seconds, timeout_seconds=timeout_seconds, limits=limits
            )
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()


@pytest.fixture
def store(make_store: StoreFactory) -> SessionStore:
    return make_store()


@pytest.fixture
def owner() -> str:
    """A fresh owner per test, so tests sharing a Redis or PostgreSQL never see each
    other's sessions."""
    return f"owner-{uuid.uuid4().hex[:12]}"

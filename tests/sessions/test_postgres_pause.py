"""A paused PostgreSQL (SIGSTOP: connections stay open, the kernel acks, nothing
answers) must cost a store call a bounded time, never a thread stuck for ever, and the
health check must say so. Issue #17 ("suspected"): before the watchdog, a call hung
until the server was resumed, and `ping()` never returned.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from fabricai_trio.sessions import StoreUnavailable
from fabricai_trio.sessions.sql import SqlSessionStore

from ..postgres_server import PostgresServer, postgres_binaries
from ..server_process import ServerProcess, model_env

TIMEOUT = 1.0


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A private cluster of its own: pausing it must not stall other tests' stores."""
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed")
    with PostgresServer() as server:
        try:
            yield server
        finally:
            server.resume()  # never leave it stopped (pg_ctl stop would wait)


async def test_calls_on_a_paused_postgres_fail_in_bounded_time(
    postgres: PostgresServer,
) -> None:
    store = SqlSessionStore(postgres.url, timeout_seconds=TIMEOUT, pool_size=2)
    try:
        session = await store.create("owner")
        postgres.pause()
        # A hang guard far above the bound: without the watchdog the call never returns.
        with trio.fail_after(30):
            started = trio.current_time()
            with pytest.raises(StoreUnavailable):
                await store.get(session.id)
            with pytest.raises(StoreUnavailable):
                await store.create("another-owner")
            assert await store.ping() is False
            elapsed = trio.current_time() - started
        assert store._watchdog is not None and store._watchdog.fired >= 1
        postgres.resume()
        # The broken connections were dropped: the store works again at once.
        with trio.fail_after(30):
            assert await store.get(session.id) == session
            assert await store.ping() is True
        print(f"three calls on a paused PostgreSQL: {elapsed:.2f} s")
    finally:
        postgres.resume()
        with trio.move_on_after(30):
            await store.aclose()


@pytest.mark.model
def test_health_reports_a_paused_postgres(
    postgres: PostgresServer, model_path: Path, server_logs: Path
) -> None:
    env = model_env(model_path, SESSION_STORE="sql", DATABASE_URL=postgres.url,
                    STORE_TIMEOUT_SECONDS=str(TIMEOUT))
    with ServerProcess(env, log_dir=server_logs) as proc, \
            httpx.Client(base_url=proc.url, timeout=30) as http:
        assert http.post("/v1/sessions", json={"session_id": "paused"}).status_code == 201
        postgres.pause()
        try:
            response = http.get("/v1/sessions/paused")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "session_store_unavailable"
            deadline = time.monotonic() + 30  # a hang guard: the store is polled every 2 s
            while (health := http.get("/health")).status_code == 200:
                assert time.monotonic() < deadline, health.text
                time.sleep(0.1)
            assert health.status_code == 503
            assert health.json()["store"] == {"backend": "sql", "healthy": False}
        finally:
            postgres.resume()
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get("/v1/sessions/paused").status_code == 200

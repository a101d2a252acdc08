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
from ..sse_client import SSEEvent, parse_lines

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


@pytest.mark.model
def test_a_stream_runs_to_its_end_while_postgres_is_paused(
    postgres: PostgresServer, model_path: Path, server_logs: Path
) -> None:
    """Paused mid-stream: the stream needs no store and runs to its end; its turn cannot
    be kept; nothing stays held (slot, lock) and the session continues once the cluster
    is back, with the turns from before the outage."""
    env = model_env(model_path, SESSION_STORE="sql", DATABASE_URL=postgres.url,
                    STORE_TIMEOUT_SECONDS=str(TIMEOUT))
    with ServerProcess(env, log_dir=server_logs) as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as http:

        def turn(prompt: str) -> list[SSEEvent]:
            body = {"prompt": prompt, "session_id": "mid", "max_tokens": 24, "temperature": 0}
            events: list[SSEEvent] = []
            with http.stream("POST", "/v1/inference_sse", json=body) as response:
                assert response.status_code == 200, response.read()
                lines: list[str] = []
                for line in response.iter_lines():
                    lines.append(line)
                    if line.startswith("event: token") and postgres_should_pause:
                        postgres.pause()
                        postgres_should_pause.clear()
                events = [e for e in parse_lines(iter(lines)) if e.event is not None]
            return events

        assert http.post("/v1/sessions", json={"session_id": "mid"}).status_code == 201
        postgres_should_pause: list[bool] = []
        first = turn("My name is Ada.")
        assert first[-1].event == "complete"
        try:
            postgres_should_pause.append(True)
            during = turn("Tell me a story.")
            assert during[-1].event == "complete", during[-1]
            assert during[-1].data["finish_reason"] in ("length", "stop")
            status = http.get("/v1/status").json()["concurrency"]
            assert status["active"] == status["queued"] == 0
        finally:
            postgres.resume()
        deadline = time.monotonic() + 30  # a hang guard: the store is polled every 2 s
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        third = turn("What is my name?")  # the session's lock was not left behind
        assert third[-1].event == "complete"
        stored = http.get("/v1/sessions/mid/messages").json()["data"]
        assert [m["content"] for m in stored[:2]] == ["My name is Ada.", first[-1].data["text"]]
        assert stored[-1]["content"] == third[-1].data["text"]
        assert len(stored) in (4, 6)  # the turn that ended during the outage: kept or not

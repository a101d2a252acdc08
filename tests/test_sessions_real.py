"""Sessions end to end: real server processes, the real model, real stores.

Memory store: multi-turn history, create-on-first-use, cancel mid-stream, one turn at a
time, trimming to the context window. SQL (SQLite file): multi-turn. Redis (a private
redis-server): restart, two servers on one Redis, and outages (paused or stopped) between
turns and mid-stream. A turn's prompt is checked by rendering the expected conversation
with llama.cpp's own `format_gemma` and comparing token counts with `usage.prompt_tokens`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import llama_cpp
import pytest
import trio
from llama_cpp.llama_chat_format import format_gemma

from fabricai_trio.sessions.sql import SqlSessionStore

from .redis_server import RedisServer
from .server_process import ServerProcess
from .sse_client import aparse
from .test_sse_real import stream_events, vocab, wait_idle

pytestmark = pytest.mark.model

N_CTX = 256  # small, so that a few turns outgrow it
FAST = 3.0  # "at once": a store outage must never make a request wait longer
SERVER_ENV = {
    "CHAT_FORMAT": "gemma",
    "N_CTX": str(N_CTX),
    "MAX_CONCURRENT_REQUESTS": "2",
    "MAX_QUEUE_SIZE": "4",
    "MAX_TOKENS_LIMIT": "256",
    "SESSION_AUTOCREATE": "true",
    "STORE_TIMEOUT_SECONDS": "1",
    "SHUTDOWN_GRACE_SECONDS": "1",  # the restart test should not wait on idle keep-alives
}

Msg = tuple[str, str]  # (role, content)


# --- helpers ---


def new_id() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def start_server(model_path: Path, logs: Path, **env: str) -> ServerProcess:
    return ServerProcess({"LLM_MODEL": str(model_path), **SERVER_ENV, **env},
                         log_dir=logs).start()


@pytest.fixture(scope="module")
def gemma(model_path: Path) -> llama_cpp.Llama:
    return vocab(model_path)


def prompt_tokens(model: llama_cpp.Llama, messages: Sequence[Msg]) -> int:
    """Tokens of a conversation rendered by llama.cpp's `format_gemma`. Gemma has no
    system role: as in Gemma's own template, the system text opens the first user turn."""
    system = "\n\n".join(c for r, c in messages if r == "system")
    rest = [{"role": r, "content": c} for r, c in messages if r != "system"]
    if system:
        first = next(i for i, m in enumerate(rest) if m["role"] == "user")
        rest[first] = {"role": "user", "content": f"{system}\n\n{rest[first]['content']}"}
    text = format_gemma(messages=rest).prompt  # type: ignore[arg-type]
    return len(model.tokenize(text.encode(), add_bos=True, special=True))


def history(messages: Sequence[dict[str, Any]]) -> list[Msg]:
    """Stored messages as a prompt sees them (an empty, cancelled reply is left out)."""
    return [(m["role"], m["content"]) for m in messages
            if m["content"] or m["role"] != "assistant"]


async def turn(
    client: httpx.AsyncClient, session_id: str, text: str, *, max_tokens: int = 4,
    expect: int = 200,
) -> dict[str, Any]:
    """One user turn on a session: the `complete` payload (or the error body)."""
    body = {"prompt": text, "session_id": session_id, "max_tokens": max_tokens,
            "temperature": 0, "seed": 1}
    response, events = await stream_events(client, body)
    assert response.status_code == expect, response.text
    if expect != 200:
        error: dict[str, Any] = response.json()["error"]
        return error
    assert events[-1].event == "complete", events[-1]
    data: dict[str, Any] = events[-1].data
    return data


async def messages(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/sessions/{session_id}/messages")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not await predicate():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- memory store ---


@pytest.fixture(scope="module")
def mem_server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    server = start_server(model_path, server_logs)
    yield server
    server.stop()


@pytest.fixture
async def mem(mem_server: ServerProcess) -> Any:
    async with httpx.AsyncClient(base_url=mem_server.url, timeout=60) as client:
        await wait_idle(client, timeout=30)
        yield client


async def test_multi_turn_history_reaches_the_prompt(
    mem: httpx.AsyncClient, gemma: llama_cpp.Llama
) -> None:
    sid = new_id()  # SESSION_AUTOCREATE: the first turn creates it, for the caller
    first = await turn(mem, sid, "My name is Ada.")
    session = (await mem.get(f"/v1/sessions/{sid}")).json()
    assert session["owner"] == "anonymous" and session["message_count"] == 2
    assert first["usage"]["prompt_tokens"] == prompt_tokens(gemma, [("user", "My name is Ada.")])
    second = await turn(mem, sid, "What is my name?")
    stored = await messages(mem, sid)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "My name is Ada."), ("assistant", first["text"]),
        ("user", "What is my name?"), ("assistant", second["text"]),
    ]
    assert [m["finish_reason"] for m in stored[1::2]] == [first["finish_reason"],
                                                          second["finish_reason"]]
    assert stored[1]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert stored[3]["completion_tokens"] == second["usage"]["completion_tokens"]
    assert stored[1]["request_id"] == stored[0]["request_id"]
    # Turn 2's prompt is turn 1 plus the new question, through the chat template.
    expected = prompt_tokens(gemma, [*history(stored[:2]), ("user", "What is my name?")])
    assert second["usage"]["prompt_tokens"] == expected
    assert expected > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert sid in [s["id"] for s in (await mem.get("/v1/sessions")).json()["data"]]


async def test_cancel_mid_stream_stores_the_partial_reply(
    mem: httpx.AsyncClient, gemma: llama_cpp.Llama
) -> None:
    sid = new_id()
    body = {"prompt": "Write a very long story about a dragon.", "session_id": sid,
            "max_tokens": 200, "temperature": 0}
    seen = ""
    async with mem.stream("POST", "/v1/inference_sse", json=body) as response:
        assert response.status_code == 200
        tokens = 0
        async for event in aparse(response.aiter_lines()):
            if event.event == "token":
                seen += event.data["text"]
                tokens += 1
                if tokens == 3:
                    break  # the client goes away mid-stream
    assert seen
    await wait_idle(mem)

    async def stored() -> bool:
        return len(await messages(mem, sid)) == 2

    await wait_until(stored, 5, "the cancelled turn to be stored")
    user, reply = await messages(mem, sid)
    assert (user["role"], user["content"]) == ("user", body["prompt"])
    assert reply["role"] == "assistant"
    assert reply["finish_reason"] == "cancelled"
    # What the client saw, and at most the few tokens decoded before the server noticed.
    assert reply["content"].startswith(seen)
    assert 3 <= reply["completion_tokens"] < 30
    # The lock is free and the partial reply is history for the next turn.
    nxt = await turn(mem, sid, "Go on.")
    expected = prompt_tokens(gemma, [*history([user, reply]), ("user", "Go on.")])
    assert nxt["usage"]["prompt_tokens"] == expected


async def test_concurrent_turns_one_streams_one_is_busy(mem: httpx.AsyncClient) -> None:
    sid = new_id()
    await mem.post("/v1/sessions", json={"session_id": sid})
    results: list[tuple[int, Any]] = []

    async def one(text: str) -> None:
        body = {"prompt": text, "session_id": sid, "max_tokens": 8, "temperature": 0}
        response, events = await stream_events(mem, body)
        results.append((response.status_code, events if events else response.json()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "Hello there.")
        nursery.start_soon(one, "Good morning.")
    assert sorted(code for code, _ in results) == [200, 409]
    body = next(payload for code, payload in results if code == 409)
    assert body["error"]["code"] == "session_busy"
    assert body["error"]["param"] == "session_id"
    streamed = next(payload for code, payload in results if code == 200)
    assert streamed[-1].event == "complete"
    # Exactly one turn landed, and the session is free again.
    assert [m["role"] for m in await messages(mem, sid)] == ["user", "assistant"]
    await turn(mem, sid, "Again.")


def split_turns(msgs: Sequence[Msg]) -> list[list[Msg]]:
    """Non-system messages grouped into turns: a user message and what follows it."""
    turns: list[list[Msg]] = []
    for m in msgs:
        if m[0] == "system":
            continue
        if m[0] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


async def test_trimming_drops_oldest_turns_and_keeps_the_system_prompt(
    mem: httpx.AsyncClient, gemma: llama_cpp.Llama
) -> None:
    created = await mem.post("/v1/sessions", json={"system_prompt": "You are a pirate."})
    sid = created.json()["id"]
    max_tokens = 4
    budget = N_CTX - max_tokens
    dropped_at: list[int] = []
    for i in range(4):
        text = f"Turn {i}. " + "The quick brown fox jumps over the lazy dog. " * 6
        before = history(await messages(mem, sid))
        system, turns = [m for m in before if m[0] == "system"], split_turns(before)
        # The fewest oldest whole turns to drop so that the prompt fits.
        candidates = [
            prompt_tokens(gemma, [*system, *[m for t in turns[k:] for m in t], ("user", text)])
            for k in range(len(turns) + 1)
        ]
        fits = [k for k, n in enumerate(candidates) if n <= budget]
        assert fits, "the test's own turn must fit"
        keep_from = fits[0]
        done = await turn(mem, sid, text, max_tokens=max_tokens)
        assert done["usage"]["prompt_tokens"] == candidates[keep_from], (i, candidates)
        # ...and the system prompt is in it (without it the count would differ).
        kept = [m for t in turns[keep_from:] for m in t]
        assert candidates[keep_from] != prompt_tokens(gemma, [*kept, ("user", text)])
        if keep_from:
            dropped_at.append(i)
    assert dropped_at, "the conversation never outgrew the context window"
    # Trimming shapes the prompt only: every turn is still stored.
    assert len(await messages(mem, sid)) == 1 + 2 * 4


async def test_a_prompt_that_can_never_fit_is_400_and_frees_the_session(
    mem: httpx.AsyncClient,
) -> None:
    sid = new_id()
    await turn(mem, sid, "Hi.")
    error = await turn(mem, sid, "word " * 600, expect=400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    assert len(await messages(mem, sid)) == 2  # nothing stored for the refused turn
    await turn(mem, sid, "Still there?")  # and the lock was released


# --- SQL store (SQLite file) ---


async def test_sql_store_multi_turn(
    model_path: Path, server_logs: Path, tmp_path: Path, gemma: llama_cpp.Llama
) -> None:
    db = tmp_path / "s.db"
    server = start_server(model_path, server_logs, SESSION_STORE="sql",
                          DATABASE_URL=f"sqlite:///{db}")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            health = (await client.get("/v1/status")).json()["store"]
            assert health == {"backend": "sql", "healthy": True}
            sid = (await client.post("/v1/sessions", json={"system_prompt": "Be terse."}))
            sid = sid.json()["id"]
            first = await turn(client, sid, "Name a colour.")
            assert first["usage"]["prompt_tokens"] == prompt_tokens(
                gemma, [("system", "Be terse."), ("user", "Name a colour.")]
            )
            second = await turn(client, sid, "Another one.")
            stored = await messages(client, sid)
            assert second["usage"]["prompt_tokens"] == prompt_tokens(
                gemma, [*history(stored[:3]), ("user", "Another one.")]
            )
    finally:
        server.stop()
    # The turns are in the database file itself, in order.
    store = SqlSessionStore(f"sqlite:///{db}")
    try:
        session = await store.get(sid)
    finally:
        await store.aclose()
    assert session is not None
    assert [(m.role, m.content) for m in session.messages] == [
        ("system", "Be terse."), ("user", "Name a colour."), ("assistant", first["text"]),
        ("user", "Another one."), ("assistant", second["text"]),
    ]


# --- Redis ---



@pytest.fixture(scope="module")
def redis_pair(
    model_path: Path, server_logs: Path, redis: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two server processes on one Redis."""
    env = {"REDIS_URL": redis.url, "REDIS_PREFIX": "sessions-real:"}
    a = start_server(model_path, server_logs, **env)
    try:
        b = start_server(model_path, server_logs, **env)
    except BaseException:
        a.stop()
        raise
    yield a, b
    b.stop()
    a.stop()


@pytest.fixture
async def clients(
    redis: RedisServer, redis_pair: tuple[ServerProcess, ServerProcess]
) -> Any:
    a, b = redis_pair
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as ca,
        httpx.AsyncClient(base_url=b.url, timeout=60) as cb,
    ):
        yield ca, cb
    # Whatever a test did to Redis, the next one finds it up.
    redis.resume()
    redis.start()


async def test_two_servers_continue_one_session(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], gemma: llama_cpp.Llama
) -> None:
    a, b = clients
    sid = new_id()
    first = await turn(a, sid, "My name is Ada.")
    second = await turn(b, sid, "What is my name?")
    stored = await messages(b, sid)
    assert stored == await messages(a, sid)
    assert [m["content"] for m in stored] == [
        "My name is Ada.", first["text"], "What is my name?", second["text"],
    ]
    assert second["usage"]["prompt_tokens"] == prompt_tokens(
        gemma, [*history(stored[:2]), ("user", "What is my name?")]
    )
    assert sid in [s["id"] for s in (await b.get("/v1/sessions")).json()["data"]]


async def test_the_lock_holds_across_servers(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """Two turns at once on two servers (the first use creates the session on both):
    one streams, the other is 409, never a 500."""
    a, b = clients

    async def one(client: httpx.AsyncClient, sid: str, codes: list[int]) -> None:
        body = {"prompt": "Hello.", "session_id": sid, "max_tokens": 8}
        response, _ = await stream_events(client, body)
        codes.append(response.status_code)
        if response.status_code != 200:
            assert response.json()["error"]["code"] == "session_busy"

    for _ in range(3):
        sid = new_id()
        codes: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, a, sid, codes)
            nursery.start_soon(one, b, sid, codes)
        assert sorted(codes) == [200, 409]
        assert len(await messages(a, sid)) == 2


async def test_next_turn_right_after_complete(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """A client that sends its next turn as soon as it reads `complete` (without
    waiting for the stream to close) finds the previous turn stored and the lock free."""
    a, _ = clients
    sid = new_id()
    texts: list[str] = []
    for i in range(12):  # before the fix, about one turn in ten was a 409 here
        body = {"prompt": f"Count to {i}.", "session_id": sid, "max_tokens": 1}
        async with a.stream("POST", "/v1/inference_sse", json=body) as response:
            assert response.status_code == 200, (i, await response.aread())
            async for event in aparse(response.aiter_lines()):
                if event.event == "complete":
                    texts.append(event.data["text"])
                    break
    assert [m["content"] for m in await messages(a, sid)][1::2] == texts


async def test_sessions_survive_a_server_restart(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    redis_pair: tuple[ServerProcess, ServerProcess],
    gemma: llama_cpp.Llama,
) -> None:
    a, _ = clients
    sid = new_id()
    first = await turn(a, sid, "Remember the number 7.")
    server = redis_pair[0]
    server.stop()
    server.start()
    second = await turn(a, sid, "Which number?")
    stored = await messages(a, sid)
    assert [m["content"] for m in stored[:2]] == ["Remember the number 7.", first["text"]]
    assert second["usage"]["prompt_tokens"] == prompt_tokens(
        gemma, [*history(stored[:2]), ("user", "Which number?")]
    )


Outage = Literal["pause", "stop"]


def outage(redis: RedisServer, kind: Outage) -> None:
    if kind == "pause":
        redis.pause()  # SIGSTOP: connections hang, every call times out
    else:
        redis.stop(save=True)  # down, refusing connections; data saved for the restart


def recover(redis: RedisServer, kind: Outage) -> None:
    if kind == "pause":
        redis.resume()
    else:
        redis.start()


async def store_state(client: httpx.AsyncClient) -> tuple[bool, bool, str]:
    """(/v1/status store.healthy, /readyz store.healthy, /readyz status). With the
    store down the replica is not ready (503) but still serves what needs no session."""
    status = (await client.get("/v1/status")).json()["store"]
    ready = await client.get("/readyz")
    body = ready.json()
    assert ready.status_code == (200 if body["status"] == "ready" else 503)
    return status["healthy"], body["store"]["healthy"], body["status"]


async def assert_store_down_behaviour(client: httpx.AsyncClient, sid: str) -> None:
    """While Redis is out: session requests fail fast with 503, others still stream."""
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/inference_sse",
         {"json": {"prompt": "Hi.", "session_id": sid, "max_tokens": 4}}),
        ("GET", f"/v1/sessions/{sid}", {}),
        ("POST", "/v1/sessions", {}),
    ]
    for method, path, kwargs in calls:
        started = time.monotonic()
        response = await client.request(method, path, **kwargs)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (path, response.text)
        assert response.json()["error"]["code"] == "session_store_unavailable"
        assert elapsed < FAST, (path, elapsed)
    response, events = await stream_events(client, {"prompt": "Hi.", "max_tokens": 4})
    assert response.status_code == 200
    assert events[-1].event == "complete"

    async def reported_down() -> bool:
        return await store_state(client) == (False, False, "store_unavailable")

    await wait_until(reported_down, 8, "/v1/status and /health to report the store down")


async def wait_recovered(client: httpx.AsyncClient) -> None:
    async def reported_up() -> bool:
        return await store_state(client) == (True, True, "ready")

    await wait_until(reported_up, 8, "the store to be reported healthy again")


@pytest.mark.parametrize("kind", ["pause", "stop"])
async def test_outage_between_turns(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], redis: RedisServer,
    gemma: llama_cpp.Llama, kind: Outage,
) -> None:
    a, _ = clients
    sid = new_id()
    first = await turn(a, sid, "My name is Ada.")
    outage(redis, kind)
    try:
        await assert_store_down_behaviour(a, sid)
    finally:
        recover(redis, kind)
    await wait_recovered(a)
    second = await turn(a, sid, "What is my name?")
    stored = await messages(a, sid)
    assert [m["content"] for m in stored] == [
        "My name is Ada.", first["text"], "What is my name?", second["text"],
    ]
    assert second["usage"]["prompt_tokens"] == prompt_tokens(
        gemma, [*history(stored[:2]), ("user", "What is my name?")]
    )


@pytest.mark.parametrize("kind", ["pause", "stop"])
async def test_outage_mid_stream(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], redis: RedisServer,
    kind: Outage,
) -> None:
    a, _ = clients
    sid = new_id()
    first = await turn(a, sid, "My name is Ada.")
    body = {"prompt": "Tell me a story.", "session_id": sid, "max_tokens": 24,
            "temperature": 0}
    events = []
    try:
        async with a.stream("POST", "/v1/inference_sse", json=body) as response:
            assert response.status_code == 200
            async for event in aparse(response.aiter_lines()):
                if event.comment is not None:
                    continue
                events.append(event)
                if event.event == "token" and event.data["index"] == 0:
                    outage(redis, kind)
        # The stream needs no store: it runs to its end although its turn cannot be kept.
        assert events[-1].event == "complete"
        assert events[-1].data["finish_reason"] in ("length", "stop")  # not error/cancelled
        await assert_store_down_behaviour(a, sid)
    finally:
        recover(redis, kind)
    await wait_recovered(a)
    # Recovered by itself: the same session continues (its lock was not left behind)
    # and the turn completed before the outage is there.
    third = await turn(a, sid, "What is my name?")
    stored = await messages(a, sid)
    assert [m["content"] for m in stored[:2]] == ["My name is Ada.", first["text"]]
    assert [m["content"] for m in stored[-2:]] == ["What is my name?", third["text"]]
    assert len(stored) in (4, 6)  # the turn that ended during the outage: kept or not

"""Bounded work before admission (issue 17, item 1) and the typed context-length refusal
(issue 15, item 6), on the real model: the tokenizer alone, then real Hypercorn on a
loopback socket in this trio run (so a test can hold the tokenizer's limiter and read
its counters), over SSE, the OpenAI routes and Socket.IO.

Work is measured by counting llama.cpp tokenize calls (`tokenize_pieces` in
`/v1/status`), never by the clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import socketio
import trio

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.core.engine import TooManyTokens
from fabricai_trio.core.messages import ChatMessage
from fabricai_trio.engine.batched import BatchedEngine
from fabricai_trio.engine.model_text import PIECE_CHARS, ModelText, split_pieces
from fabricai_trio.sessions import MemorySessionStore, Message
from fabricai_trio.settings import Settings

from .inprocess import listening, wait_for
from .sse_client import parse_lines

pytestmark = pytest.mark.model

N_CTX = 1024
MAX_TOKENS = 24
BUDGET = N_CTX - MAX_TOKENS
#: One short line after another: what llama.cpp's tokenizer is quadratic on.
LINES = "a\n"


# --- the tokenizer alone -------------------------------------------------------------


@pytest.fixture
async def text() -> AsyncIterator[ModelText]:
    model_text = ModelText(Settings(chat_format="gemma"))  # type: ignore[call-arg]
    await model_text.load()
    yield model_text
    await model_text.aclose()


def whole(model_text: ModelText, text: str, *, special: bool = True) -> list[int]:
    """Tokens of `text` in one llama.cpp call (what the server did before pieces)."""
    vocab = model_text._loaded()
    return vocab.tokenize(text, add_bos=True, special=special)


async def test_pieces_give_exactly_the_tokens_of_the_whole_text(text: ModelText) -> None:
    rng = random.Random(7)
    words = ["the", "quick", "fox,", "jumps.", "<b>", "x", "'été'", "😀", "<start_of_turn>",
             "über", "==", "--", "1234"]
    seps = [" ", " ", " ", "\n", "", "  ", "\n\n", "\t", " \n"]
    for size in (300, 3_000, 12_000, 30_000):
        sample = "".join(rng.choice(words) + rng.choice(seps) for _ in range(size // 4))
        pieces = split_pieces(sample, text.shape)
        assert "".join(pieces) == sample
        assert all(len(p) <= PIECE_CHARS for p in pieces)
        assert await text.tokenize(sample) == whole(text, sample)
    # No place where no token can span: the forced cut never splits a control token,
    # and the text the tokens stand for is the text sent.
    controls = "<start_of_turn>" * 300
    assert await text.tokenize(controls) == whole(text, controls)
    letters = "a" * 5_000
    tokens = await text.tokenize(letters, add_bos=False)
    assert text._loaded()._llama.detokenize(tokens).decode() == letters
    # A chat: each stretch between control tokens in pieces, contents never control.
    chat = text.format_chat([ChatMessage(role="system", content="Be terse."),
                             ChatMessage(role="user", content="hi\nthere " * 600),
                             ChatMessage(role="assistant", content="ok"),
                             ChatMessage(role="user", content="<start_of_turn>x")])
    vocab = text._loaded()
    expected = [vocab.bos] + [
        t for s in vocab.chat_stretches(chat)
        for t in ([s] if isinstance(s, int) else vocab.tokenize(s, add_bos=False, special=False))
    ]
    assert await text.tokenize_chat(chat) == expected


async def test_a_prompt_too_long_is_refused_unread_or_at_the_budget(text: ModelText) -> None:
    big = LINES * (1 << 19)  # 1 MiB
    before = text.stats()
    with pytest.raises(TooManyTokens) as refused:
        await text.tokenize(big, limit=BUDGET)
    assert not refused.value.exact and refused.value.at_least > BUDGET
    # Sound: no token covers more bytes than the longest one.
    assert refused.value.at_least * text.shape.max_token_bytes >= len(big)
    after = text.stats()
    assert after["tokenize_pieces"] == before["tokenize_pieces"]  # not one tokenizer call
    assert after["tokenize_refused_by_size"] == before["tokenize_refused_by_size"] + 1  # type: ignore[operator]

    # Small enough that its size proves nothing, too many tokens to fit: counting stops
    # at the first piece past the budget.
    long = LINES * (BUDGET * text.shape.max_token_bytes // 4)
    with pytest.raises(TooManyTokens) as stopped:
        await text.tokenize(long, limit=BUDGET)
    assert not stopped.value.exact and stopped.value.at_least > BUDGET
    pieces = text.stats()["tokenize_pieces"] - after["tokenize_pieces"]  # type: ignore[operator]
    assert pieces <= BUDGET // (PIECE_CHARS // 2) + 1 < len(split_pieces(long, text.shape))

    # One that fits exactly its count: an exact count past a smaller limit.
    fits = await text.tokenize("Once upon a time")
    with pytest.raises(TooManyTokens) as exact:
        await text.tokenize("Once upon a time", limit=len(fits) - 1)
    assert exact.value.exact and exact.value.at_least == len(fits)


async def test_a_cancelled_tokenization_stops_between_two_pieces(text: ModelText) -> None:
    prose = "The quick brown fox jumps over the lazy dog.\n" * 4_000  # ~180 pieces
    counts: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(text.tokenize, prose))
        await wait_for(lambda: int(text.stats()["tokenize_pieces"]) >= 2)  # type: ignore[call-overload]
        counts.append(int(text.stats()["tokenize_pieces"]))  # type: ignore[call-overload]
        nursery.cancel_scope.cancel()
    # At most the piece that was in its thread finished after the cancel.
    assert int(text.stats()["tokenize_pieces"]) <= counts[0] + 1  # type: ignore[call-overload]
    assert text.limiter.borrowed_tokens == 0


# --- a real server in this trio run ----------------------------------------------------


@asynccontextmanager
async def real_server(**overrides: Any) -> AsyncIterator[tuple[FabricApp, httpx.AsyncClient,
                                                               BatchedEngine,
                                                               MemorySessionStore]]:
    """The app on the real model, on a free loopback port; ready to take traffic."""
    settings = Settings(**{  # type: ignore[arg-type]
        "chat_format": "gemma", "n_ctx": N_CTX, "session_store": "memory",
        "max_concurrent_requests": 2, "max_queue_size": 2, "session_autocreate": True,
        "max_body_bytes": 2 << 20, "socketio_max_payload": 2 << 20, **overrides,
    })
    engine = BatchedEngine(settings)
    store = MemorySessionStore(ttl_seconds=3600)
    app = create_app(settings, engine=engine, store=store)
    async with (
        listening(app) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=300) as client,  # hang guard
    ):
        with trio.fail_after(120):
            await app.ready.wait()
        yield app, client, engine, store


async def engine_status(client: httpx.AsyncClient) -> dict[str, Any]:
    status: dict[str, Any] = (await client.get("/v1/status")).json()
    return status


async def event_names(response: httpx.Response) -> AsyncIterator[str]:
    """The names of the SSE events of a streamed response, as they arrive."""
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif not line and name is not None:
            yield name
            name = None


def assert_too_long(error: dict[str, Any], *, exact: bool | None = None) -> None:
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "max_tokens"
    assert error["n_ctx"] == N_CTX and error["max_tokens"] == MAX_TOKENS
    assert error["prompt_tokens"] > BUDGET
    if exact is not None:
        assert error["prompt_tokens_exact"] is exact
    assert str(error["prompt_tokens"]) in error["message"]


async def assert_idle(client: httpx.AsyncClient) -> None:
    concurrency = (await engine_status(client))["concurrency"]
    assert (concurrency["active"], concurrency["queued"]) == (0, 0)


async def test_context_length_exceeded_on_every_transport() -> None:
    mib = LINES * ((1 << 20) // 3)  # ~1 MiB of JSON once its newlines are escaped
    async with real_server() as (_, client, _, _):
        status = await engine_status(client)
        before, name = status["engine"], status["model"]["name"]
        # SSE: a 1 MiB body is refused from its size, before any tokenizing.
        body = json.dumps({"prompt": mib, "max_tokens": MAX_TOKENS})
        assert len(body) >= 1 << 20
        response = await client.post("/v1/inference_sse", content=body,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert_too_long(response.json()["error"], exact=False)
        after = (await engine_status(client))["engine"]
        assert after["tokenize_pieces"] == before["tokenize_pieces"]
        assert after["tokenize_refused_by_size"] == before["tokenize_refused_by_size"] + 1

        # OpenAI chat and completions: the same object, the OpenAI column's status.
        chat = await client.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": mib[:200_000]}],
            "max_tokens": MAX_TOKENS})
        assert chat.status_code == 400
        assert_too_long(chat.json()["error"], exact=False)
        words = "word " * 1_500  # small: counted exactly
        completion = await client.post("/v1/completions", json={
            "model": name, "prompt": words, "max_tokens": MAX_TOKENS})
        assert completion.status_code == 400
        assert_too_long(completion.json()["error"])

        # Socket.IO: the ack and the `inference_error` event carry the same fields.
        url = str(client.base_url)

        def over_socketio() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            sio = socketio.Client(reconnection=False)
            errors: list[dict[str, Any]] = []
            sio.on("inference_error", errors.append)
            sio.connect(url, transports=["websocket"], wait_timeout=10)
            try:
                ack: dict[str, Any] = sio.call("inference_prompt", {
                    "prompt": LINES * 20_000, "max_tokens": MAX_TOKENS}, timeout=30)
                sio.sleep(0.2)
                return ack, errors
            finally:
                sio.disconnect()

        ack, events = await trio.to_thread.run_sync(over_socketio)
        assert_too_long(ack["error"], exact=False)
        assert events and events[0]["status"] == 400
        assert_too_long(events[0], exact=False)
        await assert_idle(client)


async def test_a_stream_keeps_decoding_while_long_prompts_are_refused() -> None:
    long = json.dumps({"prompt": LINES * 20_000, "max_tokens": MAX_TOKENS})
    async with real_server() as (_, client, _, _):
        refused = 0
        # For each token of the stream: how many refusals had been answered then.
        seen: list[int] = []
        done = trio.Event()

        async def refuse_until_done() -> None:
            nonlocal refused
            while not done.is_set():
                response = await client.post("/v1/inference_sse", content=long,
                                             headers={"content-type": "application/json"})
                assert response.status_code == 400
                refused += 1

        async with trio.open_nursery() as nursery:
            body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}
            async with client.stream("POST", "/v1/inference_sse", json=body) as response:
                async for name in event_names(response):
                    if name == "token":
                        seen.append(refused)
                        if len(seen) == 4:
                            for _ in range(3):
                                nursery.start_soon(refuse_until_done)
                    elif name == "complete":
                        break
            done.set()

        assert refused >= 3
        # Tokens kept arriving while refusals were answered: several distinct counts.
        assert len(set(seen[4:])) >= 2, seen
        await assert_idle(client)


async def test_a_client_that_leaves_during_tokenizing_frees_everything() -> None:
    async with real_server() as (_, client, engine, _):
        limiter = engine._text.limiter  # the tokenizer's own: held here, so it waits
        holder = object()
        await limiter.acquire_on_behalf_of(holder)
        try:
            pieces = (await engine_status(client))["engine"]["tokenize_pieces"]
            body = {"prompt": "The quick brown fox.\n" * 200, "session_id": "leaver",
                    "max_tokens": MAX_TOKENS}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, "/v1/inference_sse", json=body))
                await wait_for(lambda: limiter.statistics().tasks_waiting == 1)
                nursery.cancel_scope.cancel()  # the client leaves
            # The server's request is cancelled while it waits for a tokenizer thread.
            await wait_for(lambda: limiter.statistics().tasks_waiting == 0)
        finally:
            limiter.release_on_behalf_of(holder)
        status = await engine_status(client)
        assert status["engine"]["tokenize_pieces"] == pieces  # nothing tokenized after
        await assert_idle(client)
        # The session's lock was released: the next turn runs (no 409).
        again = await client.post("/v1/inference_sse", json={
            "prompt": "Hello", "session_id": "leaver", "max_tokens": 2})
        assert again.status_code == 200 and "event: complete" in again.text


async def test_trimming_a_400_turn_session_is_linear() -> None:
    async with real_server() as (_, client, _, store):
        name = (await engine_status(client))["model"]["name"]
        session = await store.create("anonymous", session_id="long")
        await store.append_turn(session.id, [Message(role="system", content="Be terse.")])
        for i in range(400):
            await store.append_turn(session.id, [
                Message(role="user", content=f"Turn {i}. " + "The quick brown fox. " * 8),
                Message(role="assistant", content=f"Reply {i}: the lazy dog sleeps."),
            ])
        before = (await engine_status(client))["engine"]["tokenize_pieces"]
        response = await client.post("/v1/inference_sse", json={
            "prompt": "And now?", "session_id": "long", "max_tokens": MAX_TOKENS,
            "temperature": 0})
        events = list(parse_lines(iter(response.text.splitlines())))
        complete = next(e.data for e in events if e.event == "complete")
        usage = complete["usage"]
        assert usage["prompt_tokens"] <= BUDGET
        dropped = usage["dropped_messages"]
        assert 700 < dropped < 800 and dropped % 2 == 0  # whole turns, the system kept
        pieces = (await engine_status(client))["engine"]["tokenize_pieces"] - before
        # Dropping one turn at a time re-tokenized the whole rest each time (~150,000
        # calls for this session); now each stretch is tokenized at most once.
        assert pieces < 801 - dropped + 200, pieces
        # One more turn on the same session finds it free and trims again.
        second = await client.post("/v1/inference_sse", json={
            "prompt": "Again?", "session_id": "long", "max_tokens": 2})
        assert '"dropped_messages"' in second.text
        # The OpenAI chat route reports it in its usage too.
        chat = await client.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "Once more?"}],
            "session_id": "long", "max_tokens": 2})
        assert chat.json()["usage"]["dropped_messages"] > 700
        # Without a session, usage has no dropped_messages.
        plain = await client.post("/v1/inference_sse", json={"prompt": "Hi", "max_tokens": 2})
        assert "dropped_messages" not in plain.text

"""`n` choices and `seed`, on the real model over real servers, with the `openai` SDK.

Three servers with 3 slots each: the batched engine (default), the batched engine with
BATCH_INVARIANT=true (tokens never depend on the rest of the batch, so a seeded request
must give the same text beside other streams), and the context pool (ENGINE=llama).
Prompts stay under 32 tokens so that no prefix-cache reuse changes what is evaluated.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .live import status, wait_for, wait_idle
from .server_process import ServerProcess, model_env

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short poem about the sea."}
]
SLOTS = 3


def serve(model_path: Path, server_logs: Path, **settings: str) -> Iterator[ServerProcess]:
    env = model_env(model_path, MAX_CONCURRENT_REQUESTS=str(SLOTS), MAX_QUEUE_SIZE="2",
                    MAX_TOKENS_LIMIT="512", SSE_KEEPALIVE_SECONDS="0.2",
                    # One decode thread: the SDK clients (threads of this process) share
                    # the cores, and ggml's spinning thread barriers crawl when a decode
                    # thread is descheduled (this file: 135-166 s with one per CPU, 40-69 s).
                    N_THREADS="1", **settings)
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def batched(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    yield from serve(model_path, server_logs)


@pytest.fixture(scope="module")
def invariant(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    yield from serve(model_path, server_logs, BATCH_INVARIANT="true")


@pytest.fixture(scope="module")
def pool(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    yield from serve(model_path, server_logs, ENGINE="llama")


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                         timeout=120)


def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120)


def engine_figures(client: httpx.Client) -> dict[str, Any]:
    figures: dict[str, Any] = status(client)["engine"]
    return figures


def test_chat_n3_has_three_choices_and_prefills_the_prompt_once(
    batched: ServerProcess,
) -> None:
    client = sdk(batched)
    with http(batched) as h:
        single = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert single.usage is not None
        prompt = single.usage.prompt_tokens
        assert prompt < 32  # no prefix-cache reuse below 32 tokens
        before = engine_figures(h)
        reply = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, n=3, temperature=1.0, seed=5)
        after = engine_figures(h)
        wait_idle(h)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt  # counted once
    assert 3 <= reply.usage.completion_tokens <= 36
    if all(c.finish_reason == "length" for c in reply.choices):
        assert reply.usage.completion_tokens == 36
    assert reply.usage.total_tokens == prompt + reply.usage.completion_tokens
    # The prompt was evaluated once; the two other choices copied all of it but its
    # last two tokens, and evaluated those two themselves.
    assert after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == prompt + 4
    assert after["prompt_tokens_shared"] - before["prompt_tokens_shared"] == 2 * (prompt - 2)
    assert after["kv_copies"] - before["kv_copies"] >= 2


def test_chat_stream_n3_interleaves_indices_and_finishes_each(batched: ServerProcess) -> None:
    client = sdk(batched)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, n=3, temperature=1.0, seed=9,
        stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    roles: dict[int, int] = {}
    finishes: dict[int, list[str]] = {}
    usage = None
    ids = set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = roles.get(choice.index, 0) + 1
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert len(ids) == 1
    assert roles == {0: 1, 1: 1, 2: 1}
    assert set(texts) == {0, 1, 2} and all(texts.values())
    assert all(len(reasons) == 1 for reasons in finishes.values()) and set(finishes) == {0, 1, 2}
    assert usage is not None and 3 <= usage.completion_tokens <= 30
    # Non-streaming, the same seeded request gives the same three texts.
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, n=3, temperature=1.0, seed=9)
    assert [c.message.content for c in reply.choices] == [texts[i] for i in range(3)]


def test_completions_stream_n2(batched: ServerProcess) -> None:
    client = sdk(batched)
    texts: dict[int, str] = {}
    finished: set[int] = set()
    for chunk in client.completions.create(model=MODEL, prompt="Once upon a time",
                                           max_tokens=6, n=2, stream=True, seed=1):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert set(texts) == finished == {0, 1}
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                      n=2, seed=1)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [texts[0], texts[1]]


@pytest.mark.parametrize("engine", ["batched", "pool"])
def test_seeded_choices_are_reproducible_and_differ(
    engine: str, request: pytest.FixtureRequest
) -> None:
    server: ServerProcess = request.getfixturevalue(engine)
    client = sdk(server)

    def texts() -> list[str | None]:
        reply = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, n=3, temperature=1.0, seed=1234)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.message.content for c in reply.choices]

    first = texts()
    assert texts() == first
    assert len(set(first)) > 1  # seeds 1234, 1235, 1236: the choices differ


def seeded(client: openai.OpenAI, seed: int = 77) -> str:
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0.9, seed=seed)
    assert reply.choices[0].message.content is not None
    return reply.choices[0].message.content


@pytest.mark.parametrize("engine", ["batched", "invariant", "pool"])
def test_a_seeded_request_gives_the_same_text_twice(
    engine: str, request: pytest.FixtureRequest
) -> None:
    server: ServerProcess = request.getfixturevalue(engine)
    client = sdk(server)
    first = seeded(client)
    assert seeded(client) == first
    assert seeded(client, seed=78) != first or seeded(client, seed=79) != first


@pytest.mark.parametrize("engine", ["invariant", "pool"])
def test_a_seeded_request_gives_the_same_text_beside_other_streams(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """Each sequence has its own sampler and random generator: other streams decoding
    in the same steps (batched) or on other contexts (pool) change nothing."""
    server: ServerProcess = request.getfixturevalue(engine)
    client = sdk(server)
    alone = seeded(client)
    with http(server) as h:
        wait_idle(h)
        stop = threading.Event()

        def other(prompt: str) -> None:
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=200,
                                               temperature=1.0, stream=True)
            for _ in stream:
                if stop.is_set():
                    break
            stream.close()

        others = [threading.Thread(target=other, args=(p,))
                  for p in ("The weather today is", "def fibonacci(n):")]
        for t in others:
            t.start()
        try:
            wait_for(h, active=2, queued=0, timeout=60)
            beside = seeded(client)
        finally:
            stop.set()
            for t in others:
                t.join()
        wait_idle(h)
    assert beside == alone


def test_refusals_name_n(batched: ServerProcess) -> None:
    client = sdk(batched)
    with pytest.raises(openai.BadRequestError) as info:  # more than the 3 slots
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=4)
    assert info.value.code == "too_many_choices"
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:  # more than MAX_CHOICES (8)
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=9)
    assert info.value.code == "too_many_choices"
    with pytest.raises(openai.BadRequestError) as info:  # a session stores one reply
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2,
                                       extra_body={"session_id": "s-choices"})
    assert info.value.code == "invalid_value"
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"
    with http(batched) as h:
        response = h.post("/v1/inference_sse", json={"prompt": "x", "n": 2})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "n"
        assert status(h)["concurrency"] == {"max": SLOTS, "active": 0, "queued": 0,
                                            "queue_capacity": 2}


def test_disconnect_ends_every_choice_and_frees_every_slot(batched: ServerProcess) -> None:
    client = sdk(batched)
    with http(batched) as h:
        wait_idle(h)
        before = engine_figures(h)["tokens_generated"]
        stream = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=400, n=3, temperature=1.0, stream=True)
        seen: set[int] = set()
        for chunk in stream:
            seen |= {c.index for c in chunk.choices if c.delta.content}
            if len(seen) == 3:
                break
        assert status(h)["concurrency"]["active"] == SLOTS
        stream.close()
        wait_idle(h, timeout=10)
        assert engine_figures(h)["tokens_generated"] - before < 3 * 400
    after = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=3)
    assert len(after.choices) == 3


def test_cancel_ends_every_choice_and_frees_every_slot(batched: ServerProcess) -> None:
    with http(batched) as h:
        wait_idle(h)
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "n": 3, "stream": True}
        finished: dict[int, str] = {}
        with h.stream("POST", "/v1/chat/completions", json=body,
                      headers={"X-Request-Id": "choices-cancel"}) as response:
            assert response.status_code == 200
            cancelled = False
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                for choice in chunk["choices"]:
                    if choice["finish_reason"]:
                        finished[choice["index"]] = choice["finish_reason"]
                if not cancelled and chunk["choices"] and chunk["choices"][0]["delta"].get(
                        "content"):
                    assert status(h)["concurrency"]["active"] == SLOTS
                    cancel = h.post("/v1/inference_sse/choices-cancel/cancel")
                    assert cancel.status_code in (200, 202, 204), cancel.text
                    cancelled = True
        assert finished == {0: "stop", 1: "stop", 2: "stop"}
        wait_idle(h, timeout=10)

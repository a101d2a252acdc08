"""The OpenAI-style routes' streaming, errors, queueing and disconnects, in process on
the fake engine under `autojump_clock` (see routes_harness.py). The official SDK
against the real model is test_openai_real.py."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from .asgi_harness import Response, Stream
from .routes_harness import KEEPALIVE_S, STEP_S, FailingEngine, running

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Write a poem."}]


def data_lines(text: str) -> list[Any]:
    """The `data:` payloads of an OpenAI-style stream (`[DONE]` as the string)."""
    import json

    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_openai_error(response: Response, status: int, code: str, param: str | None) -> None:
    assert response.status == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]


async def test_chat_stream_chunks_with_usage(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, _, _):
        body = {"model": "fake", "messages": MESSAGES, "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}
        response = await client.post(CHAT, json=body, headers={"x-request-id": "trace-1"})
        assert response.status == 200
        assert response.header("content-type") == "text/event-stream; charset=utf-8"
        assert response.header("x-request-id") == "trace-1"
        chunks = data_lines(response.text)
        assert chunks[-1] == "[DONE]"
        chunks = chunks[:-1]
        assert {c["id"] for c in chunks} == {"chatcmpl-trace-1"}
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
        assert deltas == [" alpha", " beta", " gamma"]
        assert chunks[-2]["choices"][0] == {
            "index": 0, "delta": {}, "finish_reason": "length", "logprobs": None,
        }
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * 4
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": chunks[-1]["usage"]["prompt_tokens"],
            "completion_tokens": 3,
            "total_tokens": chunks[-1]["usage"]["prompt_tokens"] + 3,
        }
        assert all(c.get("usage") is None for c in chunks[:-1])


async def test_completion_stream_and_whole_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (client, _, _):
        body = {"model": "fake", "prompt": "Once upon a time", "max_tokens": 2}
        whole = await client.post(COMPLETIONS, json=body)
        assert whole.status == 200
        result = whole.json()
        assert result["object"] == "text_completion"
        assert result["id"] == f"cmpl-{whole.header('x-request-id')}"
        assert result["choices"][0]["text"] == " alpha beta"
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"]["completion_tokens"] == 2
        streamed = data_lines((await client.post(COMPLETIONS, json={**body, "stream": True})).text)
        assert streamed[-1] == "[DONE]"
        assert [c["choices"][0]["text"] for c in streamed[:-1]] == [" alpha", " beta", ""]
        assert [c["choices"][0]["finish_reason"] for c in streamed[:-1]] == [
            None, None, "length",
        ]
        assert all("usage" not in c for c in streamed[:-1])


async def test_chat_completion_whole_response(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, _, _):
        response = await client.post(CHAT, json={"model": "fake", "messages": MESSAGES,
                                                 "max_tokens": 2})
        assert response.status == 200
        result = response.json()
        assert result["object"] == "chat.completion"
        assert result["choices"] == [{
            "index": 0, "message": {"role": "assistant", "content": " alpha beta"},
            "finish_reason": "length", "logprobs": None,
        }]
        assert result["model"] == (await client.get("/v1/models")).json()["data"][0]["id"]


async def test_engine_error_mid_stream_is_an_error_chunk_without_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(FailingEngine) as (client, _, _):
        body = {"model": "fake", "messages": MESSAGES, "max_tokens": 50, "stream": True}
        response = await client.post(CHAT, json=body)
        assert response.status == 200  # the stream had started
        chunks = data_lines(response.text)
        assert "[DONE]" not in chunks
        assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [
            " word", " word",
        ]
        assert chunks[-1] == {"error": {
            "type": chunks[-1]["error"]["type"], "code": "engine_error",
            "message": "the fake engine broke", "param": None,
        }}
        # Not streamed: the same failure is an HTTP error in OpenAI's shape.
        whole = await client.post(CHAT, json={**body, "stream": False})
        assert_openai_error(whole, 500, "engine_error", None)
        await client.wait_status(active=0, queued=0)


async def test_full_queue_is_429_rate_limit_error(autojump_clock: trio.testing.MockClock) -> None:
    async with running(max_queue_size=1) as (client, engine, _):
        long = {"model": "fake", "prompt": "p", "max_tokens": 50, "stream": True}
        async with client.stream("POST", COMPLETIONS, json=long) as first, \
                client.stream("POST", COMPLETIONS, json=long) as second:
            assert first.status == second.status == 200
            await client.wait_status(active=1, queued=1)
            refused = await client.post(CHAT, json={"model": "fake", "messages": MESSAGES})
            assert_openai_error(refused, 429, "queue_full", None)
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert refused.header("retry-after") == "3"
        # Leaving the `stream()` blocks disconnected both: nothing is left running.
        await client.wait_status(active=0, queued=0)
        assert len(engine.started) == 1


async def test_keepalives_while_queued_then_chunks(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, _, _):
        hold = {"model": "fake", "prompt": "p", "max_tokens": 12, "stream": True}
        async with client.stream("POST", COMPLETIONS, json=hold):
            await client.wait_status(active=1, queued=0)
            started = trio.current_time()
            waiting = await client.post(COMPLETIONS, json={**hold, "max_tokens": 1})
            assert trio.current_time() - started >= 2 * KEEPALIVE_S
        assert waiting.text.count(": keepalive\n\n") == 2
        assert data_lines(waiting.text)[-1] == "[DONE]"


async def stream_until_content(stream: Stream, count: int) -> None:
    seen = 0
    async for event in stream.events(comments=False):
        if event.data["choices"] and event.data["choices"][0]["delta"].get("content"):
            seen += 1
            if seen == count:
                return
    raise AssertionError("the stream ended early")


async def test_disconnect_mid_stream_frees_the_slot(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, engine, _):
        body = {"model": "fake", "messages": MESSAGES, "max_tokens": 500, "stream": True}
        async with client.stream("POST", CHAT, json=body) as stream:
            await stream_until_content(stream, 3)
            assert (await client.status())["concurrency"]["active"] == 1
        assert (await client.status())["concurrency"]["active"] == 0
        await trio.sleep(100 * STEP_S)
        assert engine.tokens_generated == 3


async def test_disconnect_during_a_whole_response_frees_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not streamed: the client leaving before the answer cancels the generation too."""
    async with running() as (client, engine, _):
        call = client.call("POST", CHAT, json={"model": "fake", "messages": MESSAGES,
                                               "max_tokens": 500})
        await client.nursery.start(call.run)
        await client.wait_status(active=1, queued=0)
        await trio.sleep(4.5 * STEP_S)  # four tokens decoded
        await call.disconnect()
        await call.wait_done()
        assert call.status is None
        assert (await client.status())["concurrency"]["active"] == 0
        assert engine.tokens_generated == 4
        await trio.sleep(100 * STEP_S)
        assert engine.tokens_generated == 4


async def test_invalid_requests_are_400_naming_the_field(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (client, engine, _):
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"n": 0}, "invalid_field", "n"),
            # the fake engine, like any plug-in whose info() does not say logprobs
            ({"logprobs": True}, "invalid_field", "logprobs"),
            ({"logprobs": True, "n": 2}, "unsupported_value", "logprobs"),
            ({"logprobs": True, "tools": [{"type": "function", "function": {"name": "f"}}]},
             "unsupported_value", "logprobs"),
            ({"max_tokens": 100_000}, "invalid_field", "max_tokens"),
            ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
            ({"bogus": 1}, "invalid_field", "bogus"),
        ]
        for extra, code, param in cases:
            response = await client.post(CHAT, json={"model": "fake", "messages": MESSAGES,
                                                      **extra})
            assert_openai_error(response, 400, code, param)
        too_many = await client.post(CHAT, json={"model": "fake", "messages": MESSAGES,
                                                 "n": 2})  # one slot: n=2 can never run
        assert too_many.status == 400, too_many.text
        error = too_many.json()["error"]
        assert (error["code"], error["param"], error["n"], error["limit"]) == (
            "too_many_choices", "n", 2, 1)
        assert_openai_error(
            await client.post(CHAT, body=b"{not json",
                              headers={"content-type": "application/json"}),
            400, "invalid_json", None)
        assert engine.started == []


"""The OpenAI-compatible routes, driven by the official `openai` SDK against a real server
on the real model (auth on, one slot, a queue of one).

Greedy output is compared across requests only after a warm-up request with the same
prompt: the llama context reuses the cached prefix of the previous prompt, and how much
it reuses changes the floating-point path (and, on this small model, near-tie tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .live import ended_normally, status, wait_for, wait_idle
from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

pytestmark = pytest.mark.model

KEY = "sk-test-openai"
MODEL = "gemma-3-270m-q4_k_m"  # LLM_MODEL's one model, named as the embedded Gemma
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short poem about the sea."}
]


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="1",
        MAX_TOKENS_LIMIT="512",
        SSE_KEEPALIVE_SECONDS="0.2",
        API_KEYS=KEY,
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        yield c


def sse_complete(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The `complete` event of the same request on our own SSE route."""
    response = http.post("/v1/inference_sse", json=body)
    assert response.status_code == 200, response.text
    events = list(parse_lines(iter(response.text.splitlines())))
    complete: dict[str, Any] = events[-1].data
    return complete


def test_chat_completion_matches_the_sse_route(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    reference = sse_complete(http, body)
    result = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == reference["finish_reason"]
    assert choice.message.content == reference["text"]
    assert result.usage is not None
    assert result.usage.model_dump(exclude_none=True) == reference["usage"]
    assert ended_normally(choice.finish_reason, result.usage.completion_tokens, 8)
    assert result.model == client.models.list().data[0].id


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0
    )
    whole = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0
    )
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    assert whole.usage is not None
    assert ended_normally(finish[-1], whole.usage.completion_tokens, 10)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_and_not(client: openai.OpenAI, model_path: Path) -> None:
    prompt = "Once upon a time"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion"
    vocab = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), special=True))
    assert ended_normally(whole.choices[0].finish_reason, whole.usage.completion_tokens, 8)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
    ))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    full = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0
    ).choices[0].text
    stop = full.split()[3]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True
            ))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop
            ).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert reason == "stop"
        assert stop not in text and full.startswith(text)


def test_seed_and_sampling_params_are_applied(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=6,
            temperature=1.0, top_p=0.9, seed=seed,
        ).choices[0].message.content

    sample(42)
    assert sample(42) == sample(42)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 2}, "n", "too_many_choices"),  # one slot: two choices can never run
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_field"),
        ({"logprobs": True, "n": 2}, "logprobs", "unsupported_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_field"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias", "invalid_field"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "invalid_field"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_field"),
        ({"max_tokens": 100_000}, "max_tokens", "invalid_field"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens", "invalid_field"),
        ({"temperature": 5}, "temperature", "invalid_field"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"bogus": 1}, "bogus", "invalid_field"),
    ],
)
def test_unsupported_or_invalid_fields_are_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, extra_body=extra
        )
    assert info.value.status_code == 400
    assert info.value.param == param and info.value.code == code


def test_neutral_values_of_unsupported_fields_are_accepted(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=2, n=1,
        presence_penalty=0, frequency_penalty=0, logprobs=False, user="u-1",
        response_format={"type": "text"},
    )
    assert result.usage is not None
    assert ended_normally(result.choices[0].finish_reason, result.usage.completion_tokens, 2)


def test_wrong_key_is_authentication_error(server: ServerProcess) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=CHAT)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "Bearer" in info.value.response.headers["www-authenticate"]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_full_queue_is_rate_limit_error(
    client: openai.OpenAI, http: httpx.Client, server: ServerProcess
) -> None:
    wait_idle(http)
    long = {"prompt": "Once upon a time", "max_tokens": 512, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as holders, \
            holders.stream("POST", "/v1/completions", json=long) as running:
        assert running.status_code == 200
        wait_for(http, active=1, queued=0)
        with holders.stream("POST", "/v1/completions", json=long) as queued:
            assert queued.status_code == 200
            wait_for(http, active=1, queued=1)
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=2
                )
            assert info.value.status_code == 429 and info.value.code == "queue_full"
            assert info.value.response.headers["retry-after"] == "1"
    wait_idle(http)


def test_cancel_mid_stream_frees_the_slot(client: openai.OpenAI, http: httpx.Client) -> None:
    wait_idle(http)
    before = status(http)["engine"]["tokens_generated"]
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=512, temperature=0, stream=True
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    assert status(http)["concurrency"]["active"] == 1
    stream.close()
    wait_idle(http, timeout=10)
    assert status(http)["engine"]["tokens_generated"] - before < 512
    after = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2
    )
    assert after.usage is not None
    assert ended_normally(after.choices[0].finish_reason, after.usage.completion_tokens, 2)


def test_session_id_continues_a_stored_session(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    created = http.post("/v1/sessions", json={"system_prompt": "You are terse."})
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    for question in ("Name a colour.", "And another one?"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}],
            max_tokens=4, temperature=0, extra_body={"session_id": session_id},
        )
    messages = http.get(f"/v1/sessions/{session_id}/messages").json()["data"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "And another one?"
    # The second turn's prompt held the first turn: more prompt tokens than the first.
    assert messages[4]["prompt_tokens"] > messages[2]["prompt_tokens"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, extra_body={"session_id": "no-such-session"}
        )
    assert info.value.param == "session_id"


def test_request_id_header(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", headers={"X-Request-Id": "trace-123"},
        json={"messages": CHAT, "max_tokens": 2},
    )
    assert response.headers["x-request-id"] == "trace-123"
    assert response.json()["id"] == "chatcmpl-trace-123"
    generated = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert generated.json()["id"] == f"cmpl-{generated.headers['x-request-id']}"
    # The SSE route: without a body `request_id`, the events carry the header's id.
    sse = http.post("/v1/inference_sse", headers={"X-Request-Id": "trace-456"},
                    json={"prompt": "Hi", "max_tokens": 2})
    assert sse.headers["x-request-id"] == "trace-456"
    ids = {e.data["request_id"] for e in parse_lines(iter(sse.text.splitlines())) if e.data}
    assert ids == {"trace-456"}
    invalid = http.get("/v1/models", headers={"X-Request-Id": "bad id with spaces"})
    assert invalid.headers["x-request-id"] != "bad id with spaces"
    assert len(invalid.headers["x-request-id"]) == 32


def test_errors_keep_the_openai_shape(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"type", "code", "message", "param"}
    response = http.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    ]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.0.type"
    body = json.dumps({"messages": [{"role": "robot", "content": "x"}]})
    response = http.post("/v1/chat/completions", content=body,
                         headers={"content-type": "application/json"})
    assert response.json()["error"]["param"] == "messages.0.role"

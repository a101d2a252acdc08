"""`POST /v1/tokenize` and `/v1/detokenize` on the real model over a real socket: the
count is the one a generation of the same body reports (`usage.prompt_tokens`: one code
path, chat template and session trimming included), ids go back to the text, bad input
is a 4xx naming the field, and auth applies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

pytestmark = pytest.mark.model

KEY = "tokens-key-0123456789abcdef012345"


@pytest.fixture(scope="module")
def http(model_path: Path, server_logs: Path) -> Iterator[httpx.Client]:
    env = model_env(model_path, API_KEYS=KEY, N_CTX="256", MAX_TOKENS_LIMIT="200",
                    DEFAULT_MAX_TOKENS="8")
    with ServerProcess(env, log_dir=server_logs) as server, httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as client:
        yield client


def generated_usage(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/inference_sse", json={"max_tokens": 2, **body})
    complete = list(parse_lines(iter(response.text.splitlines())))[-1]
    assert complete.event == "complete", response.text
    usage: dict[str, Any] = complete.data["usage"]
    return usage


def tokenize(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/tokenize", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


@pytest.mark.parametrize("body", [
    {"prompt": "The quick brown fox jumps over the lazy dog."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is <start_of_turn> in Gemma?"}]},
])
def test_the_count_is_what_a_generation_decodes(http: httpx.Client, body: dict[str, Any]
                                                ) -> None:
    counted = tokenize(http, body)
    assert counted["count"] == len(counted["tokens"]) == generated_usage(http, body)[
        "prompt_tokens"]
    assert counted["max_model_len"] == 256 and counted["model"]


def test_a_session_counts_its_history_and_trimming(http: httpx.Client) -> None:
    assert http.post("/v1/sessions", json={"session_id": "count-me"}).status_code == 201
    turn = {"session_id": "count-me", "messages": [
        {"role": "user", "content": "Tell me about the sea. " * 12}]}
    before = tokenize(http, turn)
    generated_usage(http, turn)  # one stored turn
    after = tokenize(http, {**turn, "max_tokens": 8})
    assert after["count"] > before["count"]  # the history is in the prompt
    # With room for fewer prompt tokens the oldest turn is dropped, as a generation
    # with the same max_tokens drops it.
    trimmed = tokenize(http, {**turn, "max_tokens": 150})
    assert trimmed["dropped_messages"] >= 1 and trimmed["count"] <= 256 - 150
    assert trimmed["count"] == generated_usage(http, {**turn, "max_tokens": 150})[
        "prompt_tokens"]


def test_detokenize_gives_the_text_back(http: httpx.Client) -> None:
    text = "Structured concurrency, in Trio."
    tokens = tokenize(http, {"prompt": text})["tokens"]
    response = http.post("/v1/detokenize", json={"tokens": tokens[1:]})  # without BOS
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == text


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), [
    ("/v1/detokenize", {"tokens": [99_999_999]}, 422, "invalid_field", "tokens"),
    ("/v1/detokenize", {"tokens": [-1]}, 422, "invalid_field", "tokens"),
    ("/v1/detokenize", {"tokens": "abc"}, 422, "invalid_field", "tokens"),
    ("/v1/detokenize", {"tokens": [1], "model": "nope"}, 404, "model_not_found", "model"),
    ("/v1/tokenize", {"prompt": "x", "model": "nope"}, 404, "model_not_found", "model"),
    ("/v1/tokenize", {"prompt": "word " * 2000}, 400, "context_length_exceeded",
     "max_tokens"),
    ("/v1/tokenize", {"nothing": 1}, 422, "invalid_field", "nothing"),
])
def test_bad_input_names_the_field(http: httpx.Client, path: str, body: dict[str, Any],
                                   status: int, code: str, param: str) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


def test_auth_applies(http: httpx.Client) -> None:
    response = httpx.post(str(http.base_url).rstrip("/") + "/v1/tokenize", json={"prompt": "x"})
    assert response.status_code == 401

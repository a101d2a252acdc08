"""Structured output on the real model, on both engines, over a real socket: JSON Schema
through the openai SDK's `chat.completions.parse` (pydantic models, streaming and not),
`json_object`, a GBNF `grammar` on SSE and Socket.IO, and the refusals.

The embedded Gemma is a base model: it follows no instruction, so every assertion here
holds because of the grammar alone. Strings in the schemas have a `maxLength`, so a
reply that follows the grammar is short and ends with `stop`, whatever the CPU's kernels
choose at near ties.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import socketio
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field

from .server_process import ServerProcess
from .sse_client import parse_lines

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Name a city and its population as JSON."}
]


class City(BaseModel):
    name: str = Field(max_length=24)
    population: int
    coastal: bool


@pytest.fixture(scope="module")
def client(each_engine_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{each_engine_server.url}/v1", api_key="unused",
                       max_retries=0, timeout=120) as c:
        yield c


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    result = client.chat.completions.parse(model=MODEL, messages=ASK,
                                           response_format=City, max_tokens=200)
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_parse_while_streaming(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=MODEL, messages=ASK,
                                        response_format=City, max_tokens=200) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1  # it streamed
    assert final.choices[0].finish_reason == "stop"
    assert isinstance(final.choices[0].message.parsed, City)


def test_json_object_is_json_and_max_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=ASK,
                                            response_format={"type": "json_object"},
                                            max_tokens=3)
    assert result.choices[0].finish_reason == "length"  # 3 tokens cannot close an object
    content = result.choices[0].message.content or ""
    assert content.lstrip().startswith("{")


def test_grammar_on_sse(each_engine_server: ServerProcess) -> None:
    response = httpx.post(f"{each_engine_server.url}/v1/inference_sse", timeout=60, json={
        "prompt": "Is the sea salty?", "max_tokens": 8, "temperature": 0.9, "seed": 3,
        "grammar": 'root ::= ("yes" | "no") "."'})
    events = list(parse_lines(iter(response.text.splitlines())))
    complete = events[-1]
    assert complete.event == "complete", response.text
    assert complete.data["text"] in ("yes.", "no.")
    assert complete.data["finish_reason"] == "stop"


def test_grammar_on_socketio(each_engine_server: ServerProcess) -> None:
    sio = socketio.Client(reconnection=False)
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_complete(data: dict[str, Any]) -> None:
        result.update(data)
        done.set()

    sio.on("inference_complete", on_complete)
    sio.connect(each_engine_server.url, transports=["websocket"], wait_timeout=10)
    try:
        ack = sio.call("inference_prompt", {
            "prompt": "Count:", "max_tokens": 12,
            "grammar": 'root ::= [1-9] ("," [1-9]){2}'}, timeout=30)
        assert "error" not in ack, ack
        assert done.wait(60)
    finally:
        sio.disconnect()
    numbers = result["text"].split(",")
    assert len(numbers) == 3 and all(n.isdigit() and len(n) == 1 for n in numbers), result


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"grammar": "root ::= (("}, "grammar"),
        ({"grammar": 'start ::= "a"'}, "grammar"),  # no root rule
    ],
)
def test_a_schema_or_grammar_that_cannot_compile_is_400(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK,
                                       extra_body=extra)
    assert (info.value.param or "").startswith(param), info.value.body


def test_sse_refusal_names_the_field(each_engine_server: ServerProcess) -> None:
    response = httpx.post(f"{each_engine_server.url}/v1/inference_sse", timeout=60, json={
        "prompt": "x", "grammar": "root ::= (("})
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["param"] == "grammar"
    json.dumps(response.json())

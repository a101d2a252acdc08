"""Tool calling on the real instruct model (SmolLM2, whose ChatML template has no tool
format: the fallback of core/tools.py), on both engines, over a real socket with the
openai SDK: `required` and a named function (constrained by a grammar, so the arguments
always parse and validate), streaming and not, the full loop call -> tool result ->
answer, `none`, `auto`, and the refusals naming the field.

No assertion depends on which words the model picks: with `required` or a named
function the grammar alone makes the reply a call; with `auto` the test accepts either
kind of reply and checks that it is well formed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from .server_process import ServerProcess

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct-q4_1"
WEATHER: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}}
ADD: ChatCompletionToolParam = {"type": "function", "function": {
    "name": "add",
    "description": "Add two integers.",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather like in Paris today?"},
]


@pytest.fixture(scope="module", params=["batched", "llama"])
def server(request: pytest.FixtureRequest, server_logs: Path) -> Iterator[ServerProcess]:
    # One decode thread: on a shared 2-core machine, OpenMP threads that wait on each
    # other under load make a step many times slower.
    env = {"LLM_MODEL": "smollm2", "CHAT_FORMAT": "", "N_CTX": "2048", "ENGINE": request.param,
           "N_THREADS": "1", "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "2",
           "MAX_TOKENS_LIMIT": "512"}
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def check_call(name: str, arguments: str) -> dict[str, Any]:
    """The call names an offered function and its arguments validate against its schema."""
    assert name in SCHEMAS, name
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    assert isinstance(parsed, dict)
    return parsed


def only_call(result: ChatCompletion) -> tuple[str, str, dict[str, Any]]:
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert len(calls) == 1, calls
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    return call.id, call.function.name, check_call(call.function.name, call.function.arguments)


def test_required_returns_a_call_that_validates(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, temperature=0.7, seed=1,
        stop=["\n", '"'])  # ignored for forced calls: they would cut every call
    only_call(result)
    assert result.choices[0].message.content is None


def test_required_parallel_calls_all_validate(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
        tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0.7, seed=2)
    choice = result.choices[0]
    calls = choice.message.tool_calls or []
    assert calls, choice
    assert len({c.id for c in calls}) == len(calls)
    # Every call but one cut by max_tokens is complete and valid.
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length")
    for call in complete:
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        check_call(call.function.name, call.function.arguments)


def test_named_function_streams_openai_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    # Parallel calls are allowed, so the model may call `add` more than once: each call
    # has its own index, opens with its id and name and then streams only arguments.
    by_index: dict[int, list[Any]] = {}
    for delta in deltas:
        for call in delta.tool_calls or []:
            by_index.setdefault(call.index, []).append(call)
    assert sorted(by_index) == list(range(len(by_index))) and by_index
    arguments = []
    for calls in by_index.values():
        first, rest = calls[0], calls[1:]
        assert first.id and first.id.startswith("call_") and first.type == "function"
        assert first.function is not None
        assert first.function.name == "add" and first.function.arguments == ""
        assert rest and all(c.id is None and c.function is not None
                            and c.function.name is None for c in rest)
        arguments.append("".join(c.function.arguments or "" for c in rest if c.function))
    assert len({calls[0].id for calls in by_index.values()}) == len(by_index)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish in ("tool_calls", "length")
    # Every call but one cut by max_tokens is complete and valid.
    for text in arguments if finish == "tool_calls" else arguments[:-1]:
        check_call("add", text)
    assert not any(d.content for d in deltas)


def test_the_sdk_stream_helper_assembles_the_call(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and done[0].name == "get_weather"
    _, name, arguments = only_call(final)
    assert name == "get_weather" and json.loads(done[0].arguments) == arguments


def test_n_choices_each_make_their_own_call(client: openai.OpenAI) -> None:
    """n=2 with a named function: each choice has its own parser, so each gets a whole
    call that validates, streamed (deltas by choice index) and not."""
    body: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": 100, "n": 2, "temperature": 0.8, "seed": 3}
    result = client.chat.completions.create(**body)
    assert [c.index for c in result.choices] == [0, 1]
    ids = set()
    for index in range(2):
        call_id, name, _ = only_call(result.model_copy(
            update={"choices": [result.choices[index]]}))
        assert name == "add"
        ids.add(call_id)
    assert len(ids) == 2
    arguments: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.function is not None
                arguments[choice.index] += call.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for index in range(2):
        check_call("add", arguments[index])


def test_full_loop_call_result_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = list(ASK)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=200,
        parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call_id, _, arguments = only_call(first)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(
        {"city": arguments["city"], "temperature": 21, "unit": arguments["unit"],
         "sky": "sunny"})})
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                max_tokens=60, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            answer = client.chat.completions.create(
                model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                max_tokens=60)
            content = answer.choices[0].message.content or ""
            assert answer.choices[0].message.tool_calls is None
            finish = answer.choices[0].finish_reason
        assert content.strip(), content
        assert finish in ("stop", "length")


def test_the_tool_result_is_in_the_prompt(client: openai.OpenAI) -> None:
    """The history's call and result reach the model: a longer result is more tokens."""
    def prompt_tokens(result: str) -> int:
        reply = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ])
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    assert prompt_tokens("sunny, 21 degrees, light wind from the west") > prompt_tokens("sunny")


def test_none_ignores_the_tools(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20)
    none = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20,
                                          tools=TOOLS, tool_choice="none")
    auto = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1,
                                          tools=TOOLS)
    assert plain.usage is not None and none.usage is not None and auto.usage is not None
    # `none`: the tools are not shown to the model (the same prompt as without them)...
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    # ...while `auto` shows them.
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")


def test_refs_with_the_same_last_segment_stay_apart(client: openai.OpenAI) -> None:
    """The converter names a referenced rule after the ref's last segment; two refs that
    end alike (here in one schema, as in two tools' `$defs`) must not share a rule."""
    paint: ChatCompletionToolParam = {"type": "function", "function": {
        "name": "paint", "parameters": {
            "type": "object",
            "$defs": {"a": {"Item": {"enum": [1, 2, 3]}},
                      "b": {"Item": {"type": "string", "enum": ["red", "blue"]}}},
            "properties": {"coats": {"$ref": "#/$defs/a/Item"},
                           "colour": {"$ref": "#/$defs/b/Item"}},
            "required": ["coats", "colour"], "additionalProperties": False}}}
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paint the door."}],
        tools=[paint], tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    call = (result.choices[0].message.tool_calls or [])[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    arguments = json.loads(call.function.arguments)
    assert arguments["coats"] in (1, 2, 3) and arguments["colour"] in ("red", "blue")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reply_is_content_or_valid_calls(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": TOOLS,
                              "tool_choice": "auto", "max_tokens": 60}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        content = "".join(d.content or "" for d in deltas)
        calls: dict[int, list[str]] = {}
        for delta in deltas:
            for call in delta.tool_calls or ():
                assert call.function is not None
                if call.id is not None:
                    calls[call.index] = [call.function.name or "", ""]
                calls[call.index][1] += call.function.arguments or ""
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        found = [(name, arguments) for name, arguments in calls.values()]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        found = [(c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or ()]
    if found:
        assert finish in ("tool_calls", "length")
        for name, arguments in found:
            check_call(name, arguments)
    else:
        assert finish in ("stop", "length") and content


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {
            "type": "nonsense"}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]},
     "tools.0.function.name"),
    ({"tools": TOOLS, "session_id": "s-1"}, "session_id"),
    ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages.0.tool_call_id"),
])
def test_bad_tool_requests_are_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                       extra_body=extra)
    assert info.value.param == param, info.value.body

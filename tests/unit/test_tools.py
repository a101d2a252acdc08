"""Tool calling without a model: the fallback rendering, the reply parser (every way of
cutting a reply into stream pieces gives the same content and calls), OpenAI's delta
shapes, and the request checks that name the field."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from fabricai_trio.api.openai.protocol import parse_chat_request
from fabricai_trio.api.openai.serving import ChatFormat
from fabricai_trio.core.errors import DomainError, InvalidField
from fabricai_trio.core.messages import ChatMessage, ToolCall
from fabricai_trio.core.requests import parse_generation_request
from fabricai_trio.core.tools import (
    CALL_OPEN,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Delta,
    FunctionDefinition,
    ToolCallParser,
    ToolConfig,
    ToolDefinition,
    render_fallback,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
NAMES = {"get_weather", "add"}


def call_text(name: str, arguments: str) -> str:
    return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def parse(text: str, size: int, **options: Any) -> tuple[ToolCallParser, list[Delta]]:
    counter = itertools.count()
    parser = ToolCallParser(names=NAMES, new_id=lambda: f"call_{next(counter)}", **options)
    out: list[Delta] = []
    for start in range(0, len(text), size):
        out += parser.feed(text[start:start + size])
    out += parser.finish()
    return parser, out


def replay(out: list[Delta]) -> tuple[str, list[tuple[str, str]]]:
    """What a client assembles from the deltas."""
    content, calls = "", list[list[str]]()
    for item in out:
        if isinstance(item, ContentDelta):
            content += item.text
        elif isinstance(item, CallStart):
            assert item.index == len(calls)
            calls.append([item.name, ""])
        else:
            calls[item.index][1] += item.text
    return content, [(n, a) for n, a in calls]


ARGS = '{"city": "Paris \\"rive\\" {gauche}", "n": [1, {"x": "]"}]}'
REPLIES = [
    # (reply, content, calls)
    (call_text("get_weather", ARGS), "", [("get_weather", ARGS)]),
    ("Let me look. " + call_text("get_weather", ARGS), "Let me look.",
     [("get_weather", ARGS)]),
    (call_text("add", '{"a": 1, "b": 2}') + "\n" + call_text("get_weather", '{"city": "X"}'),
     "", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "X"}')]),
    ("Just text, no <tool_ call here.\n", "Just text, no <tool_ call here.\n", []),
    ("  a <b>tag</b> <tool_call", "  a <b>tag</b> <tool_call", []),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("stream_arguments", [False, True])
@pytest.mark.parametrize(("reply", "content", "calls"), REPLIES)
def test_any_split_gives_the_same_reply(
    reply: str, content: str, calls: list[tuple[str, str]], size: int, stream_arguments: bool
) -> None:
    parser, out = parse(reply, size, stream_arguments=stream_arguments)
    assert replay(out) == (content, [(n, _norm(a, stream_arguments)) for n, a in calls])
    assert parser.content == content
    assert [(c.name, c.arguments) for c in parser.calls] == replay(out)[1]
    for _, arguments in replay(out)[1]:
        json.loads(arguments)


def _norm(arguments: str, raw: bool) -> str:
    """Streamed arguments are the model's own text; held ones are re-serialized."""
    return arguments if raw else json.dumps(json.loads(arguments), ensure_ascii=False)


def test_streamed_arguments_come_in_pieces_after_the_name() -> None:
    _, out = parse(call_text("get_weather", ARGS), 4, stream_arguments=True)
    assert isinstance(out[0], CallStart) and out[0].name == "get_weather"
    assert out[0].id == "call_0"
    assert len([d for d in out if isinstance(d, ArgumentsDelta)]) > 5


def test_held_calls_come_whole_when_they_close() -> None:
    _, out = parse(call_text("get_weather", ARGS), 4)
    assert [type(d) for d in out] == [CallStart, ArgumentsDelta]


@pytest.mark.parametrize("body", [
    '{"name": "nope", "arguments": {}}',  # not an offered function
    '{"name": "add", "arguments": "1, 2"}',  # arguments not an object
    '{"name": "add"}',
    '{"name": "add", "arguments": {"a": 1}',  # does not parse
])
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_a_first_call_that_is_not_one_is_content(body: str, size: int) -> None:
    reply = f"Hi {CALL_OPEN}\n{body}\n</tool_call> and more"
    parser, out = parse(reply, size)
    assert replay(out) == (reply, []) and parser.content == reply


def test_an_unclosed_call_is_content_and_later_bad_calls_are_dropped() -> None:
    reply = f"{CALL_OPEN}\n" + '{"name": "add", "arguments": {"a": 1'
    assert replay(parse(reply, 3)[1]) == (reply, [])
    good = call_text("add", '{"a": 1}')
    reply = f"{good}\n{CALL_OPEN}\n{{bad}}\n</tool_call>\n{good}"
    assert replay(parse(reply, 3)[1]) == ("", [("add", '{"a": 1}')])
    assert replay(parse(good + " trailing words", 3)[1]) == ("", [("add", '{"a": 1}')])


def test_not_parallel_keeps_the_first_call() -> None:
    reply = call_text("add", '{"a": 1}') + "\n" + call_text("add", '{"a": 2}')
    for stream_arguments in (False, True):
        out = parse(reply, 5, parallel=False, stream_arguments=stream_arguments)[1]
        assert replay(out)[1] == [("add", '{"a": 1}')]


def test_a_cut_call_keeps_what_was_streamed() -> None:
    reply = call_text("get_weather", ARGS)[:60]
    parser, out = parse(reply, 3, stream_arguments=True)
    assert replay(out)[1][0][0] == "get_weather"
    assert reply.endswith(parser.calls[0].arguments)


# --- OpenAI's shapes ---


def test_stream_chunks_have_openai_delta_shape() -> None:
    tools = ToolConfig(tools=(ToolDefinition.model_validate(ADD),), tool_choice="required")
    fmt = ChatFormat("chatcmpl-x", "m", 0, tools=tools)
    reply = call_text("add", '{"a": 1, "b": 2}')
    chunks = [c.model_dump(mode="json") for piece in reply for c in fmt.token_chunks(piece)]
    chunks += [c.model_dump(mode="json") for c in fmt.final_chunks("stop")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["type"] == "function"
    assert first["function"] == {"name": "add", "arguments": ""}
    more = [d["tool_calls"][0] for d in deltas[1:-1]]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
               for d in more)
    assert json.loads("".join(d["function"]["arguments"] for d in more)) == {"a": 1, "b": 2}
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_text_reply_streams_as_content() -> None:
    tools = ToolConfig(tools=(ToolDefinition.model_validate(ADD),))
    fmt = ChatFormat("chatcmpl-x", "m", 0, tools=tools)
    chunks = [c.model_dump(mode="json") for piece in ["Hello", " world", "."]
              for c in fmt.token_chunks(piece)]
    chunks += [c.model_dump(mode="json") for c in fmt.final_chunks("stop")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == [
        "Hello", " world", ".", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- rendering for templates without a tool format ---


def test_fallback_rendering() -> None:
    tool = ToolDefinition.model_validate(WEATHER)
    history = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris and Rome?"),
        ChatMessage(role="assistant", content="", tool_calls=(
            ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
            ToolCall(id="call_2", name="get_weather", arguments='{"city": "Rome"}'))),
        ChatMessage(role="tool", content="18 C", tool_call_id="call_1"),
        ChatMessage(role="tool", content="25 C", tool_call_id="call_2"),
    ]
    out = render_fallback(history, [tool])
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content.startswith("Be brief.\n\n# Tools")
    assert json.dumps(tool.model_dump(exclude_none=True)) in out[0].content
    assert out[2].content == "\n".join(
        call_text("get_weather", json.dumps({"city": c})) for c in ("Paris", "Rome"))
    assert out[3].content == ("<tool_response>\n18 C\n</tool_response>\n"
                              "<tool_response>\n25 C\n</tool_response>")
    assert all(not m.tool_calls and m.tool_call_id is None for m in out)
    # Without tools (tool_choice none): the turns are rendered, no tool list.
    plain = render_fallback(history)
    assert plain[0].content == "Be brief." and len(plain) == 4


def test_fallback_adds_a_system_message() -> None:
    out = render_fallback([ChatMessage(role="user", content="hi")],
                          [ToolDefinition.model_validate(ADD)])
    assert out[0].role == "system" and out[0].content.startswith("# Tools")


# --- request checks (400 naming the field) ---


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters"),
    ({"tools": [WEATHER], "session_id": "s1"}, "session_id"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ({"parallel_tool_calls": [True]}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
     "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages.0.tool_calls.0.function"),
    ({"messages": [{"role": "function", "name": "f", "content": "1"}]}, "messages.0.role"),
])
def test_bad_tool_requests_name_the_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(DomainError) as info:
        parse_chat_request(chat_body(**extra)).to_generation_request(
            request_id="r", max_tokens_limit=100)
    assert info.value.param == param, info.value


def test_the_history_shapes_are_accepted() -> None:
    body = chat_body(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "9"}]},
    ])
    request = parse_chat_request(body).to_generation_request(request_id="r",
                                                             max_tokens_limit=100)
    assert request.messages is not None and request.tools is not None
    assert request.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert request.messages[2].role == "tool" and request.messages[2].content == "9"
    assert not request.tools.active and not request.tools.parallel_tool_calls


def test_native_transports_refuse_tools() -> None:
    with pytest.raises(DomainError) as info:
        parse_generation_request({"prompt": "x", "tools": [WEATHER]}, max_tokens_limit=10)
    assert info.value.param == "tools"
    with pytest.raises(DomainError) as info:
        parse_generation_request({"messages": [{"role": "tool", "content": "1",
                                                "tool_call_id": "c"}]}, max_tokens_limit=10)
    assert info.value.param == "messages"


def test_config_modes() -> None:
    weather = ToolDefinition.model_validate(WEATHER)
    add = ToolDefinition.model_validate(ADD)
    named = ToolConfig.model_validate({"tools": [WEATHER, ADD], "tool_choice": {
        "type": "function", "function": {"name": "add"}}})
    assert named.forced and [f.name for f in named.callable] == ["add"]
    assert ToolConfig(tools=(weather, add), tool_choice="required").forced
    auto = ToolConfig(tools=(weather,))
    assert auto.active and not auto.forced
    assert not ToolConfig(tools=(weather,), tool_choice="none").active
    with pytest.raises(InvalidField):
        ToolConfig(tools=(weather, weather)).check()
    assert FunctionDefinition(name="f").arguments_schema() == {
        "type": "object", "properties": {}}

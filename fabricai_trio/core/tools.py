"""Tool calling: the functions a request offers, the calls a reply makes, and the one
text format calls are written in.

The format is Hermes / Qwen's (what Qwen 2.5 and 3, Hermes 2 and 3 and SmolLM3 were
trained on, and what llama-server parses for them)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model whose chat template has no tool format (SmolLM2, Gemma) gets it through
`render_fallback`: the function signatures go into the system message, a past call
is written in the assistant's text as above and a tool's result is a user message
`<tool_response>…</tool_response>`. Everything this adds is message *content*, so it
is tokenized as text, never as control tokens (engine/chat.py), exactly like what a
user types.

`ToolCallParser` turns a reply, as it streams, into content and calls; the
non-streaming answer is the same parser fed the whole text, so both agree.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidField
from .messages import ChatMessage, ToolCall

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
MAX_TOOLS = 128

ToolChoiceMode = Literal["none", "auto", "required"]


class FunctionDefinition(BaseModel):
    """OpenAI's `tools[].function`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = Field(None, max_length=16_384)
    #: A JSON Schema for the arguments object; omitted: a function without parameters.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _describes_an_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError("must be a JSON Schema of `type: object` (the arguments object)")
        return value

    def arguments_schema(self) -> dict[str, Any]:
        """The schema the arguments object follows (an object of any keys if none)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}}
        return {"type": "object", **self.parameters}


class ToolDefinition(BaseModel):
    """One of a request's `tools`: only functions exist."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TOOL_NAME_PATTERN)


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": …}}`: call this one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["function"]
    function: FunctionName


class ToolConfig(BaseModel):
    """A request's `tools`, `tool_choice` and `parallel_tool_calls`, checked together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: tuple[ToolDefinition, ...] = Field(default=(), max_length=MAX_TOOLS)
    tool_choice: ToolChoiceMode | NamedToolChoice = "auto"
    parallel_tool_calls: bool = True

    def check(self) -> None:
        """What no single field says: `InvalidField` naming `tools` or `tool_choice`."""
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidField("tools", "two functions have the same name")
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise InvalidField("tool_choice", "`required` needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidField("tool_choice",
                               f"no function named {choice.function.name!r} in `tools`")

    @property
    def active(self) -> bool:
        """Whether the model is shown the tools and its reply is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply must be calls (`required` or a named function): constrained
        by a grammar."""
        return self.active and self.tool_choice != "auto"

    @property
    def callable(self) -> tuple[FunctionDefinition, ...]:
        """The functions the reply may call (the named one only, if one is named)."""
        choice = self.tool_choice
        functions = tuple(t.function for t in self.tools)
        if isinstance(choice, NamedToolChoice):
            return tuple(f for f in functions if f.name == choice.function.name)
        return functions


# --- rendering for templates without a tool format ------------------------------------

FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tools_prompt(tools: Sequence[ToolDefinition]) -> str:
    """The system-prompt block that describes `tools` (Qwen 2.5's wording)."""
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                      for t in tools)
    return FALLBACK_TOOLS_PROMPT.format(tools=lines)


def format_call(call: ToolCall) -> str:
    """A past call as the model writes one."""
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments  # the client's own text, kept as a string
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def has_tool_turns(messages: Sequence[ChatMessage]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def render_fallback(
    messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition] = ()
) -> list[ChatMessage]:
    """`messages` with only system/user/assistant text, for a template without a tool
    format: `tools` described in the (first) system message, calls written into the
    assistant's text, consecutive tool results gathered in one user message."""
    out: list[ChatMessage] = []
    if tools:
        block = tools_prompt(tools)
        if messages and messages[0].role == "system":
            out.append(ChatMessage(role="system", content=f"{messages[0].content}\n\n{block}"))
            messages = messages[1:]
        else:
            out.append(ChatMessage(role="system", content=block))
    for m in messages:
        if m.role == "tool":
            result = f"{RESPONSE_OPEN}\n{m.content}\n{RESPONSE_CLOSE}"
            if out and out[-1].role == "user" and out[-1].content.startswith(RESPONSE_OPEN):
                out[-1] = ChatMessage(role="user", content=f"{out[-1].content}\n{result}")
            else:
                out.append(ChatMessage(role="user", content=result))
        elif m.tool_calls:
            calls = "\n".join(format_call(c) for c in m.tool_calls)
            text = f"{m.content}\n{calls}" if m.content else calls
            out.append(ChatMessage(role="assistant", content=text))
        else:
            out.append(m)
    return out


# --- parsing replies ------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` and 24 random characters, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call begins: its position among the reply's calls, id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    text: str


Delta = ContentDelta | CallStart | ArgumentsDelta

_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*', re.DOTALL)
_WS = " \t\r\n"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Splits a reply into content and calls as it streams.

    * Content is passed on as it comes, except what could still be the start of a
      call: a trailing prefix of `<tool_call>`, and trailing whitespace.
    * `<tool_call>` starts a call. With `stream_arguments` (a grammar constrains the
      reply, so the call is well formed) the call's name is sent as soon as it is known
      and its arguments as they are generated. Without (`auto`: the model may write
      anything) the call is held until `</tool_call>`, then checked: a JSON object
      with a `name` among `names` and an object of `arguments`. A first call that is
      not well formed makes the whole reply content (llama-server does the same).
    * After the first call, text that is not another call ends the reply: it is
      dropped, and so is a later call that is not well formed. With `parallel` false,
      everything after the first call is dropped.
    """

    names: Collection[str]
    stream_arguments: bool = False
    parallel: bool = True
    new_id: Callable[[], str] = new_call_id
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _state: Literal["content", "call", "between", "done", "text"] = "content"
    _held: str = ""  # text seen and not yet passed on
    _raw: str = ""  # the reply since the first `<tool_call>` (given back if no call)
    _space: str = ""  # the whitespace held before the first `<tool_call>`
    _streaming: bool = False  # the current call's start was sent; arguments stream
    _depth: int = 0  # arguments being streamed: JSON nesting
    _in_string: bool = False
    _escape: bool = False
    _args_done: bool = False

    def feed(self, text: str) -> list[Delta]:
        """More of the reply; what can be passed on now."""
        out: list[Delta] = []
        if self._state != "content":
            self._raw += text
        self._held += text
        while True:
            before = (self._state, self._held, self._streaming)
            self._step(out)
            if (self._state, self._held, self._streaming) == before:
                return out

    def finish(self) -> list[Delta]:
        """The reply ended: what was held back, as content or as the call so far."""
        out: list[Delta] = []
        if self._state in ("content", "text"):
            self._content(out, self._held)
        elif self._state == "call" and not self.calls:
            self._give_back(out)
        elif self._state == "call" and self._streaming and not self._args_done:
            self._arguments(out, self._held.rstrip(_WS))  # cut short: the call so far
        self._held = ""
        self._state = "done"
        return out

    # --- states ---

    def _step(self, out: list[Delta]) -> None:
        if self._state == "text":
            self._content(out, self._held)
            self._held = ""
        elif self._state == "content":
            self._step_content(out)
        elif self._state == "between":
            self._step_between()
        elif self._state == "call":
            if self._streaming:
                self._step_arguments(out)
            elif self.stream_arguments:
                self._step_header(out)
            else:
                self._step_buffered(out)
        else:
            self._held = ""

    def _step_content(self, out: list[Delta]) -> None:
        found = self._held.find(CALL_OPEN)
        if found >= 0:
            before = self._held[:found]
            safe = before.rstrip(_WS)
            self._content(out, safe)
            self._space = before[len(safe):]
            self._raw = self._held[found:]
            self._held = self._held[found + len(CALL_OPEN):]
            self._open_call()
            return
        keep = _partial_suffix(self._held, CALL_OPEN)
        safe = self._held[:len(self._held) - keep].rstrip(_WS)
        self._content(out, safe)
        self._held = self._held[len(safe):]

    def _step_between(self) -> None:
        text = self._held.lstrip(_WS)
        if text.startswith(CALL_OPEN):
            self._held = text[len(CALL_OPEN):]
            self._open_call()
        elif not CALL_OPEN.startswith(text):
            self._state = "done"

    def _open_call(self) -> None:
        self._state = "call"
        self._streaming = False
        self._depth, self._in_string, self._escape, self._args_done = 0, False, False, False

    def _end_call(self) -> None:
        self._streaming = False
        self._state = "between" if self.parallel else "done"

    def _step_header(self, out: list[Delta]) -> None:
        match = _HEADER.match(self._held)
        if match is None:
            if _ARGUMENTS_KEY.search(self._held) or len(self._held) > MAX_HEADER_CHARS:
                self.stream_arguments = False  # not the grammar's shape: hold the call
            return
        try:
            name = json.loads(match.group(1))
        except ValueError:
            name = None
        if name not in self.names:
            self.stream_arguments = False
            return
        self._held = self._held[match.end():]
        call = ParsedCall(self.new_id(), name)
        self.calls.append(call)
        self._streaming = True
        out.append(CallStart(len(self.calls) - 1, call.id, call.name))

    def _step_arguments(self, out: list[Delta]) -> None:
        if self._args_done:
            end = self._held.find(CALL_CLOSE)
            if end >= 0:
                self._held = self._held[end + len(CALL_CLOSE):]
                self._end_call()
            return
        if not self.calls[-1].arguments:
            self._held = self._held.lstrip(_WS)
        for i, char in enumerate(self._held):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._arguments(out, self._held[:i + 1])
                    self._held = self._held[i + 1:]
                    self._args_done = True
                    return
        # Trailing whitespace may end the value: held until more comes. (The scan
        # state stays right: whitespace outside strings changes nothing.)
        safe = self._held if self._in_string else self._held.rstrip(_WS)
        self._arguments(out, safe)
        self._held = self._held[len(safe):]

    def _step_buffered(self, out: list[Delta]) -> None:
        end = self._held.find(CALL_CLOSE)
        if end < 0:
            return
        body, self._held = self._held[:end], self._held[end + len(CALL_CLOSE):]
        call = self._check(body)
        if call is None:
            if not self.calls:  # the first call is not one: the reply is text
                self._give_back(out)
                self._state = "text"
            else:
                self._state = "done"
            return
        self.calls.append(call)
        index = len(self.calls) - 1
        out.append(CallStart(index, call.id, call.name))
        out.append(ArgumentsDelta(index, call.arguments))
        self._end_call()

    def _check(self, body: str) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or set(data) != {"name", "arguments"}:
            return None
        name, arguments = data["name"], data["arguments"]
        if name not in self.names or not isinstance(arguments, dict):
            return None
        return ParsedCall(self.new_id(), name, json.dumps(arguments, ensure_ascii=False))

    # --- output ---

    def _give_back(self, out: list[Delta]) -> None:
        """The reply since the first `<tool_call>` (and the whitespace before it) as
        content: it was not a call after all."""
        self._content(out, self._space + self._raw)
        self._raw = self._space = self._held = ""

    def _content(self, out: list[Delta], text: str) -> None:
        if text:
            self.content += text
            out.append(ContentDelta(text))

    def _arguments(self, out: list[Delta], text: str) -> None:
        if text:
            self.calls[-1].arguments += text
            out.append(ArgumentsDelta(len(self.calls) - 1, text))


MAX_HEADER_CHARS = 512
_ARGUMENTS_KEY = re.compile(r'"arguments"\s*:')


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0

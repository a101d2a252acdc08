"""OpenAI-compatible request and response bodies (chat completions, completions, models).

Requests are validated here, before any conversion: fields we do not implement are
refused by name (400 `unsupported_parameter` / `unsupported_value`) instead of being
silently ignored, and unknown fields are refused as OpenAI does. `to_generation_request()`
is the one conversion into our `GenerationRequest`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from ...core.engine import MAX_TOP_LOGPROBS
from ...core.errors import InvalidBody, InvalidField, InvalidValue, Unsupported, invalid_field
from ...core.events import TokenLogprobs, Usage
from ...core.ids import SESSION_ID_PATTERN
from ...core.messages import ChatMessage, ChatRole, ToolCall
from ...core.requests import GenerationRequest
from ...core.tools import (
    MAX_TOOLS,
    NamedToolChoice,
    ToolChoiceMode,
    ToolConfig,
    ToolDefinition,
    has_tool_turns,
)

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


def unsupported(param: str, message: str, *, code: str = "unsupported_parameter") -> Unsupported:
    return Unsupported(message, code=code, param=param)


# --- requests ---


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ContentPart(BaseModel):
    """A message content part; only `{"type": "text", "text": …}` is supported."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class FunctionCallParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    #: JSON text, as the model wrote it (OpenAI's shape: a string, not an object).
    arguments: str


class ToolCallParam(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCallParam


class ChatCompletionMessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)
    function_call: Any = None
    refusal: str | None = None


def _never(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _false(value: Any) -> bool:
    return value is None or value is False


#: OpenAI fields we recognise but do not implement: accepted only with a value that
#: asks for nothing (the test says which), else 400 naming the field.
UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "functions": _empty,
    "function_call": lambda v: v in (None, "none", "auto"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": _never,
    "prediction": _never,
    "reasoning_effort": _never,
    "web_search_options": _never,
    "store": _false,
    "metadata": lambda v: True,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "verbosity": _never,
}

UNSUPPORTED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "echo": _false,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}


class _SamplingFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="A served model's name (`GET /v1/models`); unknown: 404 "
        "`model_not_found`. Omitted: the session's model, else DEFAULT_MODEL.",
    )
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(
        None, ge=1, le=256, description="Choices to generate from the prompt, each on a "
        "slot of its own (at most MAX_CHOICES and the model's slots; not with `session_id`). "
        "Choice i samples with `seed + i`.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id -> bias (-100 to 100) added to its logit."
    )
    user: str | None = Field(None, description="Accepted and ignored.")
    # llama.cpp server extensions
    top_k: int | None = Field(None, ge=0, le=1000, description="Extension (llama.cpp).")
    repeat_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="Extension (llama.cpp)."
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Extension (llama.cpp).")
    response_format: dict[str, Any] | None = Field(
        None, description="`{type: text | json_object | json_schema}`, as OpenAI: the reply "
        "is constrained to JSON (following `json_schema.schema`) by a grammar.",
    )
    grammar: str | None = Field(
        None, description="Extension (llama.cpp): a GBNF grammar the reply must follow.")
    shared_prefix: bool | None = Field(
        None, description="Extension: share this prompt's prefix cache with every API key "
        "(for prompts that are public anyway); private to the caller by default.",
    )

    def _check_common(self, *, logprobs: bool = False) -> None:
        if logprobs and (self.n or 1) > 1:
            raise unsupported("logprobs", "logprobs with n > 1 is not supported yet",
                              code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise InvalidValue("stream_options is only allowed with stream=true",
                               param="stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self) -> dict[str, Any]:
        fields = ("temperature", "top_p", "seed", "stop", "top_k", "repeat_penalty", "min_p",
                  "presence_penalty", "frequency_penalty", "logit_bias", "shared_prefix",
                  "response_format", "grammar", "n")
        values = {name: getattr(self, name) for name in fields}
        return {name: value for name, value in values.items() if value is not None}


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`; `session_id` (extension) continues a stored session."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    session_id: str | None = Field(
        None,
        pattern=SESSION_ID_PATTERN,
        description="Extension: continue this stored session (send only the new turn).",
    )
    tools: list[ToolDefinition] | None = Field(
        None, max_length=MAX_TOOLS, description="Functions the model may call "
        "(docs/openai.md, tool calling).")
    tool_choice: ToolChoiceMode | NamedToolChoice | None = Field(
        None, description="`none`, `auto` (the default with tools), `required`, or "
        "`{type: function, function: {name}}`; `required` and a named function are "
        "constrained by a grammar.")
    parallel_tool_calls: bool | None = Field(
        None, description="Whether a reply may make more than one call (default true).")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        """One message naming `tool_choice` for any wrong shape (not one per union arm)."""
        if value is None or value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict):
            try:
                return NamedToolChoice.model_validate(value)
            except ValidationError as exc:
                raise ValueError(invalid_field(exc).message) from None
        raise ValueError("must be `none`, `auto`, `required` or "
                         "`{type: function, function: {name}}`")

    def tool_config(self) -> ToolConfig | None:
        """`tools`, `tool_choice` and `parallel_tool_calls` checked together; None
        without tools or a choice that asks for them."""
        if not self.tools and self.tool_choice in (None, "none", "auto"):
            return None
        config = ToolConfig(
            tools=tuple(self.tools or ()),
            tool_choice=self.tool_choice or "auto",
            parallel_tool_calls=(True if self.parallel_tool_calls is None
                                 else self.parallel_tool_calls),
        )
        config.check()
        return config
    logprobs: bool | None = Field(
        None, description="Each token's log-probability in `choices[].logprobs.content`.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="With `logprobs`: this many most likely tokens at each step.")

    def to_generation_request(
        self, *, request_id: str, max_tokens_limit: int
    ) -> GenerationRequest:
        self._check_common(logprobs=bool(self.logprobs))
        if self.top_logprobs and not self.logprobs:
            raise InvalidValue("top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [_to_chat_message(i, m) for i, m in enumerate(self.messages)]
        tools = self.tool_config()
        if self.logprobs and tools is not None and tools.active:
            raise unsupported("logprobs", "logprobs with tools is not supported yet",
                              code="unsupported_value")
        if self.session_id is not None and (
            (tools is not None and tools.active) or has_tool_turns(messages)
        ):
            raise unsupported("session_id", "tool calling does not work with a session yet: "
                              "send the whole conversation without session_id",
                              code="unsupported_value")
        if tools is not None and tools.active and (
            self.grammar is not None or (self.response_format or {}).get("type")
            not in (None, "text")
        ):
            raise InvalidValue("tools cannot be combined with `grammar` or a JSON "
                               "`response_format` (use tool_choice `none`)", param="tools")
        max_tokens = self.max_completion_tokens or self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        return _build(
            {
                **self._sampling(),
                "messages": [m.model_dump() for m in messages],
                "max_tokens": max_tokens,
                "session_id": self.session_id,
                "model": self.model,
                "request_id": request_id,
                "tools": tools,
                "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs if self.logprobs else None,
            },
            max_tokens_limit,
            rename={"max_tokens": param},
        )


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`: a raw prompt (a string, or a list of one string)."""

    prompt: str | list[str]
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="Each token's log-probability, with this many most likely tokens at "
        "each step (OpenAI allows up to 5, this server up to 20, as vLLM).")

    def to_generation_request(
        self, *, request_id: str, max_tokens_limit: int
    ) -> GenerationRequest:
        self._check_common(logprobs=self.logprobs is not None)
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise unsupported("prompt", "only one prompt per request is supported",
                                  code="unsupported_value")
            prompt = prompt[0]
        return _build(
            {
                **self._sampling(),
                "prompt": prompt,
                "max_tokens": self.max_tokens,
                "model": self.model,
                "request_id": request_id,
                "logprobs": self.logprobs is not None,
                "top_logprobs": self.logprobs,
            },
            max_tokens_limit,
        )


R = TypeVar("R", bound=_SamplingFields)


def _to_chat_message(index: int, message: ChatCompletionMessageParam) -> ChatMessage:
    where = f"messages.{index}"
    if message.role == "function" or message.function_call is not None:
        name = "role" if message.role == "function" else "function_call"
        raise unsupported(f"{where}.{name}", "the legacy `functions` API is not supported: "
                          "use tools", code="unsupported_value")
    if message.tool_calls and message.role != "assistant":
        raise InvalidValue("only assistant messages make tool calls",
                           param=f"{where}.tool_calls")
    if (message.role == "tool") != (message.tool_call_id is not None):
        param = f"{where}.tool_call_id"
        raise (InvalidValue("a tool message needs the `tool_call_id` it answers", param=param)
               if message.role == "tool" else
               InvalidValue("only tool messages have a `tool_call_id`", param=param))
    content = message.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"{where}.content.{j}.type", f"content parts of type "
                                  f"`{part.type}` are not supported (text only)",
                                  code="unsupported_value")
            texts.append(part.text)
        content = "\n".join(texts)
    calls = tuple(
        ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
        for c in message.tool_calls or ()
    )
    role: ChatRole = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=content or "", tool_calls=calls,
                       tool_call_id=message.tool_call_id)


def _build(
    data: dict[str, Any], max_tokens_limit: int, rename: dict[str, str] | None = None
) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(
            {k: v for k, v in data.items() if v is not None},
            context={"max_tokens_limit": max_tokens_limit},
        )
    except ValidationError as exc:
        error: InvalidField = invalid_field(exc)
        if rename and error.param in rename:
            error = error.renamed(rename[error.param])
        raise error from None


def parse_request(
    model: type[R], data: Any, unsupported_fields: dict[str, Callable[[Any], bool]]
) -> R:
    """Validate a decoded JSON body; a domain error naming the field on any failure
    (a 400 on these routes: see the error table's OpenAI column)."""
    if not isinstance(data, dict):
        raise InvalidBody("the body must be a JSON object")
    body = dict(data)
    for name, accepts in unsupported_fields.items():
        if name in body:
            if not accepts(body[name]):
                raise unsupported(name, f"{name} is not supported by this server")
            del body[name]
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_field(exc) from None


def parse_chat_request(data: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, data, UNSUPPORTED_CHAT)


def parse_completion_request(data: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, data, UNSUPPORTED_COMPLETION)


# --- responses ---


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    """The reply: `content` is null when the reply is only tool calls (as OpenAI's);
    `tool_calls` is left out when there are none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChoiceLogprobs(BaseModel):
    """A chat choice's (or chunk's) log-probabilities, one entry per token."""

    content: list[TokenLogprobs] | None
    refusal: list[TokenLogprobs] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: per token its text, log-probability, the most
    likely tokens at its step (text -> log-probability, with the chosen one) and where
    it starts in the choice's text (characters)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: OpenAIFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class _OmitNone(BaseModel):
    """Only the keys that are set are sent (as OpenAI's deltas)."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class DeltaFunctionCall(_OmitNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitNone):
    """A streamed call: its first delta has `id`, `type`, `function.name` and
    `function.arguments: ""`; the next ones add to `function.arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_OmitNone):
    """A chunk's delta: only the keys that are set are sent (as OpenAI does)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: OpenAIFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a chat stream; with `include_usage`, the last one before
    `[DONE]` has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(CompletionResponse):
    """One `data:` line of a completion stream (same shape as the response)."""


class StreamError(BaseModel):
    """Sent as a `data:` line when a stream fails after it started."""

    error: dict[str, Any]


class ChatTemplateInfo(BaseModel):
    """The chat template `messages` go through: its `name` (`gguf` for the file's own
    Jinja template, else a llama-cpp-python format) and where it comes from."""

    name: str | None
    source: Literal["gguf", "chat_format", "fallback"] | None


class ModelCapabilities(BaseModel):
    """What a request may ask of this model (extension)."""

    completions: bool = True
    chat: bool = True
    streaming: bool = True
    sessions: bool = True
    #: `response_format` json_object / json_schema and `grammar` (constrained decoding).
    structured_output: bool = False
    #: `logprobs` / `top_logprobs`.
    logprobs: bool = False
    #: `tools` with every `tool_choice` (`required` and a named function need
    #: constrained decoding; `auto` works on any engine).
    tools: bool = False
    embeddings: bool = False


class ModelCard(BaseModel):
    """One served model. Besides OpenAI's fields (extensions): whether it is the
    default, its context size, its chat template, its slots and what it supports."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fabricai-trio"
    default: bool = False
    loaded: bool = False
    context_length: int = 0
    slots: int = 0
    chat_template: ChatTemplateInfo | None = None
    capabilities: ModelCapabilities = Field(default_factory=ModelCapabilities)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

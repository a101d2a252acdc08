"""`GenerationRequest`: one generation, validated the same way for every transport.

Every transport builds it with `parse_generation_request()` and gets the same errors
for the same mistakes (`InvalidBody`, `InvalidField` naming the field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from .engine import MAX_TOP_LOGPROBS
from .errors import InvalidBody, Unsupported, invalid_field
from .ids import SESSION_ID_PATTERN, is_request_id, new_request_id
from .messages import ChatMessage
from .tools import ToolConfig, has_tool_turns

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


class SamplingParams(BaseModel):
    """What the engine needs to sample; defaults follow llama.cpp's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    repeat_penalty: float = Field(1.1, gt=0.0, le=10.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: Token id (as a string, OpenAI's shape) -> a bias added to its logit before
    #: sampling; -100 bans a token, 100 all but forces it.
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_sane(cls, value: dict[str, float]) -> dict[str, float]:
        for token, bias in value.items():
            if not token.isdigit() or len(token) > 9:
                raise ValueError(f"keys must be token ids, got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {token} must be between -100 and 100")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_sane(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or len(item) > MAX_STOP_LENGTH:
                raise ValueError(f"each stop string must be 1 to {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_tokens_limit")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"must be at most {limit} (MAX_TOKENS_LIMIT)")
        return value


MAX_GRAMMAR_CHARS = 65_536


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: a named JSON Schema for the reply."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=1024)
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type json_schema, and only then")
        return self


class GenerationRequest(SamplingParams):
    """One generation, from any transport: a raw `prompt` or chat `messages`."""

    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, max_length=10_000)
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    #: A served model's name; None: the session's model, else DEFAULT_MODEL.
    model: str | None = Field(None, min_length=1, max_length=256)
    request_id: str = Field(default_factory=new_request_id)
    #: Keep generating through a disconnect for `resume_grace_seconds`, and keep every
    #: event, so that a reconnect with `Last-Event-ID` continues the stream.
    resumable: bool = False
    resume_grace_seconds: float | None = Field(None, ge=0)
    #: Reuse, and leave for every principal, the prefix cache of the shared scope (for
    #: prompts that are public anyway); by default a principal's prefixes are its own.
    shared_prefix: bool = False
    #: Constrained decoding: the reply is JSON (`json_object`), JSON valid against a
    #: schema (`json_schema`), or follows a GBNF `grammar` (llama.cpp's grammar format).
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    #: Tool calling (OpenAI's chat route only: not part of the native request's schema,
    #: and refused by `parse_generation_request`): the functions offered and how they
    #: may be called; the reply is parsed for calls (core/tools.py).
    tools: SkipJsonSchema[ToolConfig | None] = None
    #: Choices to generate from the one prompt (OpenAI's `n`; the OpenAI routes only):
    #: each takes a slot, choice i samples with `seed + i`.
    n: int = Field(1, ge=1, le=256)
    #: Each token's log-probability (on `token` events and in `complete`), with the
    #: `top_logprobs` most likely tokens at its step.
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("request_id")
    @classmethod
    def _request_id_shape(cls, value: str) -> str:
        if not is_request_id(value):
            raise ValueError("must be 1-128 characters of letters, digits and _.:-")
        return value

    @field_validator("resume_grace_seconds")
    @classmethod
    def _grace_within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = (info.context or {}).get("resume_grace_max")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"must be at most {limit:g} (RESUME_GRACE_MAX_SECONDS)")
        return value

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must not be empty")
        if self.grammar is not None and self.constrained_format is not None:
            raise ValueError("give `grammar` or a JSON `response_format`, not both")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    @property
    def engine_logprobs(self) -> int | None:
        """`EngineRequest.logprobs`: how many alternatives, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def constrained_format(self) -> ResponseFormat | None:
        """The `response_format` if it constrains the reply (not plain text)."""
        fmt = self.response_format
        return fmt if fmt is not None and fmt.type != "text" else None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None or self.session_id is not None

    def new_messages(self) -> list[ChatMessage]:
        """The turn's own input as chat messages (a bare prompt is one user message)."""
        if self.messages is not None:
            return list(self.messages)
        return [ChatMessage(role="user", content=self.prompt or "")]


def parse_generation_request(
    data: Any, *, max_tokens_limit: int, resume_grace_max: float | None = None
) -> GenerationRequest:
    """Validate a decoded JSON body (or query mapping): `InvalidBody` / `InvalidField`.

    For the native transports (SSE, Socket.IO), whose events carry one text: `n` other
    than 1 is `Unsupported` (the OpenAI routes serve it)."""
    if not isinstance(data, dict):
        raise InvalidBody("the body must be a JSON object")
    if "tools" in data:
        raise Unsupported("tool calling is served by POST /v1/chat/completions", param="tools")
    try:
        request = GenerationRequest.model_validate(
            data,
            context={"max_tokens_limit": max_tokens_limit, "resume_grace_max": resume_grace_max},
        )
    except ValidationError as exc:
        raise invalid_field(exc) from None
    if request.messages is not None and has_tool_turns(request.messages):
        raise Unsupported("tool calls and tool messages are served by POST "
                          "/v1/chat/completions", param="messages", code="unsupported_value")
    if request.n != 1:
        raise Unsupported("n > 1 is served by /v1/chat/completions and /v1/completions only",
                          code="unsupported_value", param="n")
    return request

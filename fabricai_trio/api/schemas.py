"""Request and event schemas shared by SSE, Socket.IO and the OpenAI-style routes.

Validation happens once, here: every transport builds a `GenerationRequest` with
`parse_generation_request()` and gets the same errors for the same mistakes.
"""

from __future__ import annotations

import re
import uuid
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

from .errors import ApiError, validation_error

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
#: The API's session ids (a subset of what the stores accept).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = Field(max_length=1_000_000)


class SamplingParams(BaseModel):
    """What the engine needs to sample; defaults follow llama.cpp's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    repeat_penalty: float = Field(1.1, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

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


class GenerationRequest(SamplingParams):
    """One generation, from any transport: a raw `prompt` or chat `messages`."""

    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, max_length=10_000)
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)

    @field_validator("request_id")
    @classmethod
    def _request_id_shape(cls, value: str) -> str:
        if not REQUEST_ID_PATTERN.match(value):
            raise ValueError("must be 1-128 characters of letters, digits and _.:-")
        return value

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must not be empty")
        return self

    @property
    def is_chat(self) -> bool:
        return self.messages is not None or self.session_id is not None

    def new_messages(self) -> list[ChatMessage]:
        """The turn's own input as chat messages (a bare prompt is one user message)."""
        if self.messages is not None:
            return list(self.messages)
        return [ChatMessage(role="user", content=self.prompt or "")]


def parse_generation_request(data: Any, *, max_tokens_limit: int) -> GenerationRequest:
    """Validate a decoded JSON body (or query mapping); 400/422 `ApiError` on failure."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    try:
        return GenerationRequest.model_validate(
            data, context={"max_tokens_limit": max_tokens_limit}
        )
    except ValidationError as exc:
        raise validation_error(exc) from None


# --- stream events: one payload shape for SSE and Socket.IO ---


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queued_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens_per_second: float | None


class QueuedEvent(BaseModel):
    request_id: str
    position: int


class TokenEvent(BaseModel):
    request_id: str
    index: int
    text: str


class CompleteEvent(BaseModel):
    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class ErrorEvent(BaseModel):
    request_id: str
    code: int
    error: str
    message: str


StreamEvent = QueuedEvent | TokenEvent | CompleteEvent | ErrorEvent


class CancelResult(BaseModel):
    """`POST /v1/inference_sse/{request_id}/cancel`: the stream will end with `complete`,
    `finish_reason: cancelled` (or as it was already ending)."""

    request_id: str
    cancelled: bool


EVENT_NAMES: dict[type[BaseModel], str] = {
    QueuedEvent: "queued",
    TokenEvent: "token",
    CompleteEvent: "complete",
    ErrorEvent: "error",
}


# --- sessions API: request and response bodies of /v1/sessions ---

#: The session ids a client may choose: those `GenerationRequest.session_id` accepts, so
#: every session created over HTTP can be named by a generation request.


class SessionCreateRequest(BaseModel):
    """`POST /v1/sessions` body; every field is optional (so is the body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str | None = Field(None, max_length=1_000_000)
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN)


class SessionObject(BaseModel):
    """A session without its messages (read from a store's `Session`/`SessionInfo`)."""

    model_config = ConfigDict(from_attributes=True)

    object: Literal["session"] = "session"
    id: str
    owner: str
    created_at: float
    updated_at: float
    message_count: int


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]


class SessionMessage(BaseModel):
    """One stored message; assistant messages say how their generation ended."""

    model_config = ConfigDict(from_attributes=True)

    role: Role
    content: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: float
    request_id: str | None = None


class SessionMessages(BaseModel):
    object: Literal["list"] = "list"
    session_id: str
    data: list[SessionMessage]


def parse_session_create(data: Any) -> SessionCreateRequest:
    """Validate a `POST /v1/sessions` body; 400/422 `ApiError` like generation requests."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    try:
        return SessionCreateRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None

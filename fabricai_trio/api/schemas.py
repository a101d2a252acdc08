"""HTTP-only bodies: the cancel route's answer and the `/v1/sessions` bodies.

What every transport shares (requests, messages, stream events) is in `core/`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import InvalidBody, invalid_field
from ..core.events import FinishReason
from ..core.ids import SESSION_ID_PATTERN
from ..core.messages import Role


class StoreHealth(BaseModel):
    backend: str
    healthy: bool


class StartupProgress(BaseModel):
    phase: Literal["loading", "warming"]
    seconds: float


class Readiness(BaseModel):
    """`GET /readyz` (and `/health`): `ready` (200), or why not (503)."""

    status: Literal["ready", "loading", "warming", "failed", "store_unavailable", "draining"]
    reason: str | None = None
    progress: StartupProgress | None = None
    store: StoreHealth


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class CancelResult(BaseModel):
    """`POST /v1/inference_sse/{request_id}/cancel`: the stream will end with `complete`,
    `finish_reason: cancelled` (or as it was already ending)."""

    request_id: str
    cancelled: bool


# --- sessions API: request and response bodies of /v1/sessions ---

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
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: float
    request_id: str | None = None


class SessionMessages(BaseModel):
    object: Literal["list"] = "list"
    session_id: str
    data: list[SessionMessage]


class TokenizeResponse(BaseModel):
    """`POST /v1/tokenize`: the tokens a generation of the same body would decode."""

    model: str
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="The model's context size (`N_CTX`).")
    dropped_messages: int = Field(
        0, description="Stored session messages the prompt leaves out to fit the context.")


class DetokenizeRequest(BaseModel):
    """`POST /v1/detokenize`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    model: str
    prompt: str


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], data: Any) -> Body:
    """Validate a decoded JSON body (`POST /v1/sessions`, `/v1/detokenize`):
    `InvalidBody` / `InvalidField`, like generation requests."""
    if not isinstance(data, dict):
        raise InvalidBody("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_field(exc) from None

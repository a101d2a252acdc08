"""Session data: immutable pydantic models and their JSON form.

Every store returns these frozen models, so a caller can never mutate a conversation
behind the store's back; the JSON helpers are the one wire format (Redis values, tests).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from ..core.events import FinishReason
from ..core.messages import Role


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> str:
        """Compact JSON text; `from_json` reads it back to an equal model."""
        return self.model_dump_json()


class Message(_Frozen):
    """One chat message. Assistant messages carry how the generation ended, its usage
    and the model that wrote it."""

    role: Role
    content: str
    finish_reason: FinishReason | None = None
    model: str | None = None
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    created_at: float = Field(default_factory=time.time, description="Epoch seconds.")
    request_id: str | None = None

    @classmethod
    def from_json(cls, data: str | bytes) -> Message:
        return cls.model_validate_json(data)


class SessionInfo(_Frozen):
    """A session without its messages: what `list_sessions` returns."""

    id: str
    owner: str
    created_at: float
    updated_at: float
    message_count: int = Field(ge=0)

    @classmethod
    def from_json(cls, data: str | bytes) -> SessionInfo:
        return cls.model_validate_json(data)


class Session(_Frozen):
    """A conversation: its owner, its times (epoch seconds) and its messages in order.

    `incarnation` is random per `create`: the id names a session only until it is
    deleted, the incarnation names this one life of it (rooms, locks and turn writes are
    bound to it). "" for sessions stored before incarnations existed.
    """

    id: str
    owner: str
    created_at: float
    updated_at: float
    messages: tuple[Message, ...] = ()
    incarnation: str = ""

    @classmethod
    def from_json(cls, data: str | bytes) -> Session:
        return cls.model_validate_json(data)

    @property
    def model(self) -> str | None:
        """The model the session started with (that of its first reply): later turns
        run on it too. None before the first reply."""
        return next((m.model for m in self.messages if m.model is not None), None)

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            owner=self.owner,
            created_at=self.created_at,
            updated_at=self.updated_at,
            message_count=len(self.messages),
        )

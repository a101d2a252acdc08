"""Chat messages, as every transport, the engines and the session stores see them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The roles a session stores.
Role = Literal["system", "user", "assistant"]
#: The roles of a request's conversation: a `tool` message is a tool's result (tool
#: calling, OpenAI's chat route only).
ChatRole = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    """A call an assistant message made: `arguments` is JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=1_000_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: ChatRole
    content: str = Field(max_length=1_000_000)
    #: An assistant message's calls (its `content` may then be empty).
    tool_calls: tuple[ToolCall, ...] = Field(default=(), max_length=128)
    #: A `tool` message: the call it answers.
    tool_call_id: str | None = Field(None, max_length=256)

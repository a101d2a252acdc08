"""Stream events: the one payload shape of SSE events and Socket.IO events.

A generation yields `QueuedEvent`, then `TokenEvent`s, then exactly one of
`CompleteEvent` or `ErrorEvent`. Transports frame them (api/sse.py, the Socket.IO
events); the event name of each type is in `EVENT_NAMES`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

#: How a generation ended. `cancelled`: a client, a disconnect or a shutdown stopped it.
FinishReason = Literal["stop", "length", "cancelled", "error"]
#: Why a generation was cancelled: its client asked, its client went away, the server
#: is shutting down, or its client stopped reading (`slow_client`: what was sent to it
#: stayed unwritten for SLOW_CLIENT_TIMEOUT_SECONDS).
CancelCause = Literal["disconnect", "cancel", "shutdown", "slow_client"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Session requests only: stored messages left out of the prompt, oldest whole turns
    #: first, so that it fits the context window (0: the whole history was used).
    #: Absent for requests without a session.
    dropped_messages: int | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extension(self, handler: SerializerFunctionWrapHandler
                                 ) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        if data.get("dropped_messages") is None:
            data.pop("dropped_messages", None)
        return data


class Timings(BaseModel):
    """Milliseconds; every interval starts when the request was accepted.

    `queued_ms`: accepted → admitted to a slot. `ttft_ms`: accepted → first token (what
    a client waits for, queue included). `total_ms`: accepted → end.
    """

    queued_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens_per_second: float | None


class Logprob(BaseModel):
    """A token and its log-probability at one step (OpenAI's chat shape, plus `id`)."""

    id: int
    #: The token's text; a token that is part of a UTF-8 character shows U+FFFD here
    #: (its `bytes` are exact).
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobs(Logprob):
    """A generated token's log-probability and the most likely tokens at its step,
    most likely first (`top_logprobs` of them; docs/openai.md says which values)."""

    top_logprobs: list[Logprob]


class QueuedEvent(BaseModel):
    request_id: str
    position: int


def _omit_none(data: dict[str, object], *names: str) -> dict[str, object]:
    for name in names:
        if data.get(name) is None:
            data.pop(name, None)
    return data


class TokenEvent(BaseModel):
    request_id: str
    index: int
    text: str
    #: Which of a request's `n` choices the text belongs to; absent when n is 1.
    choice: int | None = None
    #: With `logprobs`: those of the tokens that made `text` (absent otherwise).
    logprobs: list[TokenLogprobs] | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extensions(self, handler: SerializerFunctionWrapHandler
                                  ) -> dict[str, object]:
        return _omit_none(handler(self), "choice", "logprobs")


class ChoiceResult(BaseModel):
    """One of a request's `n` choices, as it ended."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int


class CompleteEvent(BaseModel):
    """The end of a generation. With `n` > 1, `choices` holds every choice (`text` is
    choice 0's) and `usage.completion_tokens` counts the tokens of all of them."""

    request_id: str
    text: str
    finish_reason: FinishReason
    #: Set when `finish_reason` is `cancelled`.
    cancel_cause: CancelCause | None = None
    usage: Usage
    timings: Timings
    choices: list[ChoiceResult] | None = None
    #: With `logprobs`: those of every token of `text` (absent otherwise).
    logprobs: list[TokenLogprobs] | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extensions(self, handler: SerializerFunctionWrapHandler
                                  ) -> dict[str, object]:
        return _omit_none(handler(self), "choices", "logprobs")


class ErrorEvent(BaseModel):
    """A stream that ended in an error; built by `core.errors.error_event` only.

    `code` is the same string as in the HTTP error body; `status` its HTTP status.
    """

    #: An error's own fields follow the common ones (`context_length_exceeded`:
    #: `prompt_tokens`, `prompt_tokens_exact`, `n_ctx`, `max_tokens`).
    model_config = ConfigDict(extra="allow")

    request_id: str
    status: int
    type: str
    code: str
    message: str
    param: str | None = None


StreamEvent = QueuedEvent | TokenEvent | CompleteEvent | ErrorEvent

EVENT_NAMES: dict[type[BaseModel], str] = {
    QueuedEvent: "queued",
    TokenEvent: "token",
    CompleteEvent: "complete",
    ErrorEvent: "error",
}

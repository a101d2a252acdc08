"""The hooks the generation path calls so that metrics stay out of it.

`GenerationService` takes one `GenerationObserver`; `metrics.Metrics` is the real one,
`NullObserver` the default (tests, embedding). Hooks are synchronous, cheap and must not
raise: they run inside shielded cleanup code and between two tokens.
"""

from __future__ import annotations

from typing import Literal, Protocol

from .core.events import CancelCause, FinishReason

StoreErrorKind = Literal["unavailable", "timeout", "write_failed"]
#: Refusals of one identity that leave others served (a full queue is `on_rejected`).
RefusalReason = Literal["per_key_limit", "rate_limited"]


class FinishedGeneration(Protocol):
    """What an observer may read of a generation that ended (`generation.Generation`)."""

    @property
    def model_name(self) -> str: ...
    @property
    def finish_reason(self) -> FinishReason | None: ...
    @property
    def cancel_cause(self) -> CancelCause | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def ttft_seconds(self) -> float | None: ...
    @property
    def queue_wait_seconds(self) -> float | None: ...
    @property
    def priority_class(self) -> str: ...


class GenerationObserver(Protocol):
    def on_rejected(self, model: str) -> None:
        """A request was refused because the model's queue was full (a 429)."""

    def on_refused(self, model: str, reason: RefusalReason, *, priority_class: str) -> None:
        """A request was refused for its identity alone (a 429): it holds its share of
        the queue (`per_key_limit`) or spent its rate limit (`rate_limited`)."""

    def on_token_timing(self, seconds: float, tokens: int, *, model: str) -> None:
        """`tokens` more tokens were decoded `seconds` after the previous ones
        (the first chunk of a generation is not reported: that is its TTFT)."""

    def on_finished(self, generation: FinishedGeneration, *, admitted: bool) -> None:
        """A generation ended (completed, failed, or cancelled, then with
        `finish_reason` `cancelled` or None); `admitted`: it held a slot."""

    def on_store_error(self, kind: StoreErrorKind) -> None:
        """A session store call failed or timed out."""


class NullObserver:
    """Observes nothing."""

    def on_rejected(self, model: str) -> None:
        pass

    def on_refused(self, model: str, reason: RefusalReason, *, priority_class: str) -> None:
        pass

    def on_token_timing(self, seconds: float, tokens: int, *, model: str) -> None:
        pass

    def on_finished(self, generation: FinishedGeneration, *, admitted: bool) -> None:
        pass

    def on_store_error(self, kind: StoreErrorKind) -> None:
        pass


NULL_OBSERVER: GenerationObserver = NullObserver()

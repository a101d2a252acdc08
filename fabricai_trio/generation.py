"""The generation service: the one path, and the one owner, of every live generation.

SSE, Socket.IO and the OpenAI-style routes all go through it:

* `GenerationService.prepare()` does everything that can refuse a request before a
  response starts (model loading, session checks and lock, context length, the queue)
  and registers the generation under (owner, request_id). It raises domain errors
  (`core.errors`); transports render them through the one error table.
* `Generation.events()` waits for a slot, streams the engine's tokens and ends with
  `complete` or `error`; when it ends for any reason (done, cancelled, failed) the
  session turn is written once and the slot, the session lock and the queue place are
  released, and the generation leaves the registry.
* `GenerationService.cancel(owner, request_id, cause)` is the only way to stop a
  generation on purpose: SSE's cancel route, Socket.IO's `inference_cancel` and
  shutdown use it. A generation cancelled so ends with a `complete` event whose
  `finish_reason` is `cancelled`. With a `RemoteCancel` (Redis), a cancel for a
  generation that runs on another replica is forwarded there. A transport that is cut
  (a client disconnects) cancels the task consuming `events()`; that is recorded as the
  cause `disconnect`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

from .admission import Admission, Ticket
from .core.engine import (
    Chunk,
    Engine,
    EngineError,
    EngineRequest,
    Finish,
    TokenLogprob,
    TopLogprob,
    decode_choices,
)
from .core.errors import (
    DomainError,
    Draining,
    DuplicateRequestId,
    EngineFailed,
    InvalidField,
    InvalidValue,
    ModelLoading,
    PerKeyLimit,
    QueueFull,
    RateLimited,
    SessionBusy,
    SessionModelMismatch,
    SessionStoreFull,
    SessionStoreUnavailable,
    SessionTooLarge,
    TooManyChoices,
    TooManySessions,
    UnknownSession,
    error_event,
)
from .core.events import (
    CancelCause,
    ChoiceResult,
    CompleteEvent,
    ErrorEvent,
    FinishReason,
    Logprob,
    QueuedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from .core.messages import ChatMessage
from .core.requests import GenerationRequest, parse_generation_request
from .core.stream_ids import is_final
from .engine.grammar import has_grammar, request_grammar
from .models import ModelSet, ServedModel
from .observer import NULL_OBSERVER, GenerationObserver
from .prompting import PromptTokens, logit_bias, prompt_tokens, user_stops
from .rate_limit import RateLimits, Reservation
from .sessions import (
    LimitReached,
    Message,
    Session,
    SessionExists,
    SessionFull,
    SessionNotFound,
    SessionStore,
    SessionStoreError,
    StoreFull,
    StoreUnavailable,
    content_bytes,
)
from .settings import Settings
from .stream_log import MemoryStreamLog, StreamLog

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", QueuedEvent, TokenEvent, CompleteEvent, ErrorEvent)

Key = tuple[str, str]  # (owner, request_id)
#: Grace of a resumable generation whose request did not name one.
DEFAULT_RESUME_GRACE_SECONDS = 30.0


class RemoteCancel(Protocol):
    """Where live generations are announced so that any replica can cancel them."""

    def announce(self, owner: str, request_id: str) -> None:
        """This replica now runs (owner, request_id). Synchronous, never raises."""

    def withdraw(self, owner: str, request_id: str) -> None:
        """It no longer does. Synchronous, never raises."""

    async def forward(self, owner: str, request_id: str, cause: CancelCause) -> bool:
        """Ask the replica running it to cancel it; False if no replica does.

        Cancellation may leave the cancel sent or not."""


class Keepalive:
    """Yielded while a request waits in the queue, so transports can keep links alive."""


KEEPALIVE = Keepalive()


@dataclass(slots=True)
class ChoiceState:
    """One of the generation's `n` choices as it stands."""

    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class Generation:
    """A prepared request: it holds a queue place (and a session lock) until it ends.

    A request for `n` choices is one generation: one ticket of `n` slots, one entry in
    the registry, so a cancel or a disconnect ends every choice and frees every slot.
    `text` and `finish_reason` are choice 0's; `completion_tokens` counts all choices.
    """

    service: GenerationService
    request: GenerationRequest
    engine_request: EngineRequest
    ticket: Ticket
    owner: str
    new_messages: list[ChatMessage]
    #: The model it runs on (its engine decodes it, its admission holds the ticket).
    model: ServedModel
    session: Session | None = None
    lock_token: str | None = None
    #: What the rate limits reserved for it (None without limits).
    reservation: Reservation | None = None
    #: Stored messages left out of the prompt to fit the context (None: no session).
    dropped_messages: int | None = None
    #: Why it was stopped: set by `cancel()`; a transport cut from outside is what
    #: `cut_cause()` says (a disconnect, unless the transport knows better).
    cancel_cause: CancelCause | None = None
    cut_cause: Callable[[], CancelCause] = field(default=lambda: "disconnect")
    #: Called by `cancel()`: a transport whose consumer may be blocked on its client
    #: (api/streaming.py) unblocks it, so the cancel takes effect at once.
    on_cancel: Callable[[], None] | None = None
    text: str = ""
    #: With `logprobs`: those of the tokens of `text` so far; `logprobs_sent` of them
    #: went out on token events (a chunk without text holds its own back).
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    logprobs_sent: int = 0
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    #: What ended it with an `error` event (then `finish_reason` is `error`).
    error: DomainError | None = None
    created_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # monotonic, like created_at
    first_token_at: float | None = None  # monotonic, like created_at
    #: Position of the last event yielded (see core/stream_ids.py).
    position: int = -1
    #: Resumable: clients that follow it now (the creator, and reconnects); see
    #: `GenerationService.start_detached`.
    watchers: int = 0
    watchers_changed: trio.Event = field(default_factory=trio.Event)
    choices: list[ChoiceState] = field(default_factory=list)
    _step_scope: trio.CancelScope | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [ChoiceState() for _ in range(self.request.n)]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> Key:
        return (self.owner, self.request_id)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.prompt_tokens)

    @property
    def ttft_seconds(self) -> float | None:
        """Accepted → first token: what the client waited (queue included)."""
        return None if self.first_token_at is None else self.first_token_at - self.created_at

    @property
    def queue_wait_seconds(self) -> float | None:
        """Accepted → admitted (None: it never got a slot)."""
        return None if self.admitted_at is None else self.admitted_at - self.created_at

    @property
    def priority_class(self) -> str:
        return self.ticket.priority_class

    @property
    def resumable(self) -> bool:
        return self.request.resumable

    def watch(self, delta: int) -> None:
        """One more (+1) or one fewer (-1) client follows this generation."""
        self.watchers += delta
        self.watchers_changed.set()
        self.watchers_changed = trio.Event()

    def _logged(self, event: E) -> E:
        """Give `event` the next position and keep it for reconnects: every event of a
        resumable generation, the final one of the others."""
        self.position += 1
        if self.resumable or is_final(event):
            self.service.stream_log.append(self.key, self.position, event)
        return event

    def cancel(self, cause: CancelCause) -> None:
        """Stop at the next checkpoint (while queued, or between two tokens); `events()`
        then ends with `complete`, `finish_reason: cancelled`. Idempotent."""
        if self.cancel_cause is None:
            self.cancel_cause = cause
        if self._step_scope is not None:
            self._step_scope.cancel()
        if self.on_cancel is not None:
            self.on_cancel()

    @contextmanager
    def _step(self) -> Iterator[trio.CancelScope]:
        """A cancel scope around one wait inside `events()`, never around a `yield`
        (a scope must not span what the consumer does between two events)."""
        scope = trio.CancelScope()
        if self.cancel_cause is not None:
            scope.cancel()
        self._step_scope = scope
        try:
            with scope:
                yield scope
        finally:
            self._step_scope = None

    async def events(self) -> AsyncGenerator[StreamEvent | Keepalive, None]:
        """Queue, decode, complete. Close it with `aclosing()` (Quart does).

        `cancel()` ends it with a `complete` event (`finish_reason: cancelled`). If the
        consumer is cancelled instead (a disconnect), `Cancelled` propagates; either
        way the partial turn is stored, shielded, and everything is released.
        """
        rid = self.request_id
        service = self.service
        started = False
        try:
            yield self._logged(QueuedEvent(request_id=rid, position=self.ticket.position))
            while not self.ticket.admitted and self.cancel_cause is None:
                with trio.move_on_after(service.settings.sse_keepalive_seconds), self._step():
                    await self.ticket.wait()
                if not self.ticket.admitted and self.cancel_cause is None:
                    yield KEEPALIVE
            if self.cancel_cause is None:
                self.admitted_at = last_chunk_at = time.monotonic()
                started = True
                index = 0
                n = self.request.n
                engine = self.model.engine
                async with aclosing(decode_choices(engine, self.engine_request, n)) as stream:
                    while True:
                        got: tuple[int, Chunk | Finish] | None = None  # None if cut
                        try:
                            with self._step():
                                got = await anext(stream, None)
                        except Exception as exc:  # an engine bug is an error, not a cancel
                            if isinstance(exc, EngineError):
                                log.error("request %s: engine error: %s", rid, exc)
                                self.error = EngineFailed(str(exc))
                            else:
                                log.exception("request %s: unexpected engine failure", rid)
                                self.error = EngineFailed("the engine failed unexpectedly")
                            self.finish_reason = "error"
                            await self._end()
                            yield self._logged(error_event(self.error, rid))
                            return
                        if got is None or self.cancel_cause is not None:
                            break
                        number, item = got
                        choice = self.choices[number]
                        if isinstance(item, Chunk):
                            now = time.monotonic()
                            if self.completion_tokens:
                                service.observer.on_token_timing(
                                    now - last_chunk_at, item.tokens, model=self.model.name)
                            last_chunk_at = now
                            self.completion_tokens += item.tokens
                            choice.completion_tokens += item.tokens
                            # (logprobs: n is 1, the request's parse refuses more)
                            self.logprobs += map(_logprobs_event, item.logprobs)
                            if item.text:
                                if self.first_token_at is None:
                                    self.first_token_at = now
                                choice.text += item.text
                                if number == 0:
                                    self.text += item.text
                                yield self._logged(TokenEvent(
                                    request_id=rid, index=index, text=item.text,
                                    choice=number if n > 1 else None,
                                    logprobs=self._unsent_logprobs(),
                                ))
                                index += 1
                        else:
                            choice.finish_reason = item.reason
                            choice.completion_tokens = item.completion_tokens
                            self.completion_tokens = sum(
                                c.completion_tokens for c in self.choices)
                            if n == 1:
                                self.finish_reason = item.reason
                if n > 1 and self.cancel_cause is None and all(
                        c.finish_reason for c in self.choices):
                    self.finish_reason = self.choices[0].finish_reason
            if self.finish_reason is None:
                self.finish_reason = "cancelled" if self.cancel_cause is not None else "stop"
            complete = self.complete_event()
            await self._end(store_turn=started)
            yield self._logged(complete)
        except BaseException:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
                if self.cancel_cause is None:
                    self.cancel_cause = self.cut_cause()
                # A reconnect still learns how it ended, with the partial text.
                self._logged(self.complete_event())
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.close(store_turn=started)

    def _unsent_logprobs(self) -> list[TokenLogprobs] | None:
        """The logprobs for the next token event (None: not asked for)."""
        if not self.request.logprobs:
            return None
        unsent = self.logprobs[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprobs)
        return unsent

    def complete_event(self) -> CompleteEvent:
        """The `complete` event for the generation as it stands (finished or cancelled)."""
        done = time.monotonic()
        choices = None
        if len(self.choices) > 1:
            unfinished: FinishReason = (
                "cancelled" if self.finish_reason == "cancelled" else self.finish_reason or "stop")
            choices = [
                ChoiceResult(index=i, text=c.text, finish_reason=c.finish_reason or unfinished,
                             completion_tokens=c.completion_tokens)
                for i, c in enumerate(self.choices)
            ]
        return CompleteEvent(
            request_id=self.request_id,
            text=self.text,
            finish_reason=self.finish_reason or "stop",
            choices=choices,
            cancel_cause=self.cancel_cause if self.finish_reason == "cancelled" else None,
            usage=Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
                dropped_messages=self.dropped_messages,
            ),
            timings=_timings(self.created_at, self.admitted_at or done, self.first_token_at,
                             done, self.completion_tokens),
            logprobs=list(self.logprobs) if self.request.logprobs else None,
        )

    async def _end(self, *, store_turn: bool = True) -> None:
        """Store the turn and release slot and lock *before* the last event: a client
        that sends its next turn as soon as it reads `complete` (or `error`) must find
        this turn stored and the session free, not a 409."""
        with trio.CancelScope(shield=True):
            await self.close(store_turn=store_turn)

    async def close(self, *, store_turn: bool = False) -> None:
        """Release the queue place or slot, store the turn, unlock. Idempotent.

        Safe to call from a cancelled context only inside a shielded scope (as
        `events()` does); store calls are bounded by STORE_TIMEOUT_SECONDS.
        """
        if self._closed:
            return
        self._closed = True
        self.service.unregister(self)
        self.service.observer.on_finished(self, admitted=self.ticket.admitted)
        self.ticket.release()
        timeout = self.service.settings.store_timeout_seconds
        if self.reservation is not None:
            with trio.move_on_after(timeout):  # the tokens it did not generate
                unused = self.engine_request.max_tokens * self.request.n - self.completion_tokens
                await self.service.rate_limits.give_back(self.reservation, tokens=unused)
        if self.session is None:
            return
        store = self.service.store
        if store_turn:
            with trio.move_on_after(timeout) as scope:
                try:
                    # Only into the session this generation opened: not into one another
                    # identity created under the same id after a delete.
                    await store.append_turn(self.session.id, self._turn_messages(),
                                            incarnation=self.session.incarnation)
                except SessionNotFound:  # deleted while it ran: nowhere to store it
                    log.info("request %s: session deleted meanwhile, turn dropped",
                             self.request_id)
                except SessionStoreError as exc:
                    self.service.observer.on_store_error("write_failed")
                    log.error("request %s: turn not stored: %s", self.request_id, exc)
            if scope.cancelled_caught:
                self.service.observer.on_store_error("timeout")
                log.error("request %s: turn not stored: store timed out", self.request_id)
        if self.lock_token is not None:
            await self.service.unlock(self.session, self.lock_token)

    def _turn_messages(self) -> list[Message]:
        now = time.time()
        turn = [
            Message(role=m.role, content=m.content, created_at=now, request_id=self.request_id)
            for m in self.new_messages
        ]
        turn.append(
            Message(
                role="assistant",
                content=self.text,
                finish_reason=self.finish_reason or "error",
                model=self.model.name,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                created_at=now,
                request_id=self.request_id,
            )
        )
        return turn


def _logprob_event(item: TopLogprob | TokenLogprob) -> Logprob:
    return Logprob(id=item.token, token=item.piece.decode("utf-8", errors="replace"),
                   logprob=item.logprob, bytes=list(item.piece))


def _logprobs_event(item: TokenLogprob) -> TokenLogprobs:
    """An engine's log-probabilities of a token as they go out on events."""
    return TokenLogprobs(**_logprob_event(item).model_dump(),
                         top_logprobs=[_logprob_event(top) for top in item.top])


def _timings(
    created: float, admitted: float, first: float | None, done: float, tokens: int
) -> Timings:
    decode_s = done - (first or admitted)
    return Timings(
        queued_ms=round((admitted - created) * 1000, 3),
        ttft_ms=None if first is None else round((first - created) * 1000, 3),
        total_ms=round((done - created) * 1000, 3),
        tokens_per_second=(
            round((tokens - 1) / decode_s, 2) if tokens > 1 and decode_s > 0 else None
        ),
    )


class GenerationService:
    """Validates, admits and runs generations for every transport."""

    def __init__(
        self,
        *,
        settings: Settings,
        models: ModelSet | None = None,
        engine: Engine | None = None,
        admission: Admission | None = None,
        store: SessionStore,
        observer: GenerationObserver = NULL_OBSERVER,
        remote: RemoteCancel | None = None,
        stream_log: StreamLog | None = None,
        rate_limits: RateLimits | None = None,
    ) -> None:
        self.settings = settings
        if models is None:  # one model: `engine` and `admission`, named by the engine
            if engine is None or admission is None:
                raise TypeError("give `models`, or `engine` and `admission`")
            models = ModelSet([ServedModel(engine.info().model, settings, engine, admission)])
        self.models = models
        self.rate_limits = rate_limits or RateLimits()
        self.store = store
        self.observer = observer
        self.remote = remote
        self.stream_log: StreamLog = stream_log or MemoryStreamLog(
            ttl_seconds=settings.resume_ttl_seconds, max_events=settings.resume_max_events
        )
        self._detached: trio.Nursery | None = None
        #: Set by the app once the model is loaded and warmed; until then `ModelLoading`.
        self.ready = False
        self.draining = False
        self._live: dict[Key, Generation] = {}  # prepared and not yet closed
        self._idle = trio.Event()  # set whenever nothing is live
        self._idle.set()
        # (session id, incarnation) -> token of a lock `unlock` could not release.
        self._unreleased: dict[tuple[str, str], str] = {}

    async def prepare(self, request: GenerationRequest, *, owner: str,
                      priority_class: str | None = None) -> Generation:
        """Check and admit a request, and register it under (owner, request_id).

        `priority_class` is the identity's (auth.Identity); None or a name that is not
        one of PRIORITY_CLASSES: the default class.
        Raises a domain error: `ModelNotFound`, `Draining`, `ModelLoading`,
        `DuplicateRequestId`, session errors (`SessionModelMismatch` too),
        `ContextLengthExceeded`, `RateLimited`, `QueueFull` and `PerKeyLimit` (of the
        request's model). On success the caller owns the returned `Generation` and must
        either iterate `events()` or call `close()`. If cancelled, nothing is held (a
        session lock taken is released, shielded).
        """
        chosen: list[ServedModel] = []
        try:
            return await self._prepare(request, owner, chosen, priority_class)
        except (QueueFull, PerKeyLimit, RateLimited) as refusal:
            self._count(refusal, chosen[-1] if chosen else self.models.default, priority_class)
            raise

    def _count(self, refusal: QueueFull | PerKeyLimit | RateLimited, model: ServedModel,
               priority_class: str | None) -> None:
        """Tell the observer about a refusal of `model` (`prepare` and `refusal`)."""
        if isinstance(refusal, QueueFull):
            self.observer.on_rejected(model.name)
            return
        admission = model.admission
        self.observer.on_refused(
            model.name,
            "per_key_limit" if isinstance(refusal, PerKeyLimit) else "rate_limited",
            priority_class=admission.classes[admission.rank_of(priority_class)],
        )

    def _check_choices(self, request: GenerationRequest, model: ServedModel) -> None:
        """`n` > 1 within MAX_CHOICES and the model's slots, and not on a session (a
        session stores one reply per turn): else a 400 naming `n`."""
        if request.n == 1:
            return
        if request.session_id is not None:
            raise InvalidValue("n > 1 cannot be used with session_id: a session stores one "
                               "reply per turn", param="n")
        if request.n > self.settings.max_choices:
            raise TooManyChoices(request.n, self.settings.max_choices, "MAX_CHOICES")
        model.admission.check_slots(request.n)

    def _pick_model(self, request: GenerationRequest, session: Session | None) -> ServedModel:
        """The request's `model`, else its session's, else the default. A session keeps
        the model it started with: naming another is `SessionModelMismatch`."""
        named = self.models.get(request.model) if request.model is not None else None
        kept = session.model if session is not None else None
        if kept is not None and named is not None and named.name != kept:
            raise SessionModelMismatch(kept, named.name)
        if named is None and kept is not None:
            return self.models.get(kept)  # a model no longer served: `ModelNotFound`
        return named or self.models.default

    async def count_prompt(
        self, request: GenerationRequest, *, owner: str
    ) -> tuple[ServedModel, PromptTokens]:
        """The prompt a generation of `request` would decode: the chat template, the
        session's history and its trimming to `n_ctx - max_tokens`, by the same code as
        `prepare` (`POST /v1/tokenize`), without a queue place or the session lock.
        Raises what `prepare` would for the same request (unknown model or session,
        `ContextLengthExceeded`, ...). Cancelled: stops between two tokenizer pieces."""
        if not self.ready:
            raise ModelLoading()
        session = None
        if request.session_id is not None:
            session = await self.open_session(request.session_id, owner)
        model = self._pick_model(request, session)
        max_tokens = request.max_tokens or self.settings.default_max_tokens
        prompt = await prompt_tokens(model.engine, model.settings.n_ctx, request, session,
                                     request.new_messages(), max_tokens)
        return model, prompt

    def _first_checks(self, request: GenerationRequest, owner: str) -> ServedModel:
        """What `prepare` checks first, in this order, before anything that awaits: the
        named model (`ModelNotFound`), `Draining`, `ModelLoading`, `DuplicateRequestId`,
        `n` (`_check_choices`). Returns the request's model as named (a session may
        still choose another)."""
        model = self._pick_model(request, None)
        if self.draining:
            raise Draining()
        if not self.ready:
            raise ModelLoading()
        if (owner, request.request_id) in self._live:
            raise DuplicateRequestId()
        self._check_choices(request, model)
        return model

    def may_refuse(self) -> bool:
        """Whether any model's admission refuses anyone now (`Admission.may_refuse`):
        False means `refusal()` would answer None for every request. Never checkpoints."""
        return any(model.admission.may_refuse() for model in self.models)

    def refusal(self, request: GenerationRequest, *, owner: str,
                priority_class: str | None = None) -> DomainError | None:
        """The answer `prepare` would give `request` now if that answer is a full queue
        (`QueueFull`) or the owner's full share of it (`PerKeyLimit`), counted exactly
        as `prepare` counts it; None if `prepare` must run to know
        (it gets past the queue check, or fails a check before it, or names a session:
        `prepare` reads the store before it checks the queue). The same checks as
        `prepare`, in the same order, by the same code, without the session, the
        tokenizer or any await: the HTTP fast path (api/refusals.py) answers with it
        before the web framework runs. Never checkpoints."""
        if request.session_id is not None:
            return None
        try:
            model = self._first_checks(request, owner)
        except DomainError:
            return None
        try:
            model.admission.check_room(principal=owner)
        except (QueueFull, PerKeyLimit) as exc:
            self._count(exc, model, priority_class)
            return exc
        return None

    async def _prepare(
        self, request: GenerationRequest, owner: str, chosen: list[ServedModel],
        priority_class: str | None,
    ) -> Generation:
        model = self._first_checks(request, owner)
        max_tokens = request.max_tokens or self.settings.default_max_tokens
        session: Session | None = None
        lock_token: str | None = None
        if request.session_id is None:
            chosen.append(model)
            # Refuse before the session and the tokenizer. `refusal()` answers exactly
            # this far (the HTTP fast path): a check added above must be added there too.
            model.admission.check_room(principal=owner)
        else:
            session = await self.open_session(
                request.session_id, owner, autocreate=self.settings.session_autocreate
            )
            chosen.append(model := self._pick_model(request, session))
            model.admission.check_room(principal=owner)
            lock_token = uuid.uuid4().hex
            await self._release_unreleased()
            if not await self.store_call(
                self.store.try_lock(session.id, lock_token, self.settings.session_lock_seconds,
                                    incarnation=session.incarnation)
            ):
                raise SessionBusy()
        locked = session
        try:
            new_messages = request.new_messages()
            if locked is not None:
                # Again, under the lock: a turn that ended after the first read is history.
                session = await self.open_session(locked.id, owner)
                if session.incarnation != locked.incarnation:
                    raise UnknownSession()  # deleted (and created again) meanwhile
                chosen.append(model := self._pick_model(request, session))
                limit = self.settings.session_max_bytes
                if content_bytes(session.messages) + sum(
                    len(m.content.encode("utf-8", "surrogatepass")) for m in new_messages
                ) > limit:
                    raise SessionTooLarge(limit)
            info = model.engine.info()
            bias = logit_bias(request, info.n_vocab)
            if request.logprobs and not info.logprobs:
                raise InvalidField("logprobs", "this model's engine does not return "
                                   "log-probabilities")
            # Compiling a grammar takes milliseconds (more for a large schema): not on
            # the event loop.
            grammar = None
            if has_grammar(request):
                grammar = await trio.to_thread.run_sync(request_grammar, request,
                                                        model.engine)
            prompt = await prompt_tokens(model.engine, model.settings.n_ctx, request, session,
                                         new_messages, max_tokens)
            # What fair turns and token limits weigh: the prompt is evaluated once.
            cost = len(prompt.tokens) + max_tokens * request.n
            reservation = await self.rate_limits.take(owner, tokens=cost)
            try:
                ticket = model.admission.try_enter(principal=owner, cost=cost,
                                                   priority_class=priority_class,
                                                   slots=request.n)
            except DomainError:
                if reservation is not None:  # a refusal costs no tokens
                    with trio.move_on_after(self.settings.store_timeout_seconds):
                        await self.rate_limits.give_back(reservation, tokens=cost)
                raise
            if (owner, request.request_id) in self._live:  # registered while we awaited
                ticket.release()
                raise DuplicateRequestId()
        except BaseException:
            if locked is not None and lock_token is not None:
                with trio.CancelScope(shield=True):
                    await self.unlock(locked, lock_token)
            raise
        engine_request = EngineRequest(
            request_id=request.request_id,
            prompt_tokens=prompt.tokens,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repeat_penalty=request.repeat_penalty,
            min_p=request.min_p,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=bias,
            grammar=grammar,
            logprobs=request.engine_logprobs,
            seed=request.seed,
            stop=tuple(dict.fromkeys([*user_stops(request), *prompt.stop])),
            stop_tokens=prompt.stop_tokens,
            cache_scope=None if request.shared_prefix else owner,
            principal=owner,
            priority_rank=ticket.rank,
        )
        generation = Generation(
            service=self,
            request=request,
            engine_request=engine_request,
            ticket=ticket,
            owner=owner,
            new_messages=new_messages,
            model=model,
            session=session,
            lock_token=lock_token,
            reservation=reservation,
            dropped_messages=prompt.dropped_messages if session is not None else None,
        )
        self._live[generation.key] = generation
        self._idle = trio.Event()
        if self.remote is not None:
            self.remote.announce(owner, generation.request_id)
        return generation

    def parse(self, data: object) -> GenerationRequest:
        """A transport's decoded payload as a request, within this server's limits."""
        return parse_generation_request(
            data,
            max_tokens_limit=self.settings.max_tokens_limit,
            resume_grace_max=self.settings.resume_grace_max_seconds,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the resumable generations (in the services nursery) until cancelled;
        cancelling it cancels them (they end with `finish_reason: cancelled`)."""
        async with trio.open_nursery() as nursery:
            self._detached = nursery
            task_status.started()
            await trio.sleep_forever()

    async def start_detached(self, generation: Generation) -> None:
        """Run a resumable generation in the service's own nursery, so that it outlives
        its client's connection: it keeps going while nobody follows it for at most
        its grace (`resume_grace_seconds`), then it is cancelled (cause `disconnect`).

        Its creator counts as a follower until it calls `generation.watch(-1)`. Returns
        once the first event is in the stream log, so the creator can follow it."""
        if self._detached is None:
            raise RuntimeError("GenerationService.run() is not running")
        generation.watch(+1)
        await self._detached.start(self._run_detached, generation)

    async def _run_detached(
        self, generation: Generation, *, task_status: trio.TaskStatus[None]
    ) -> None:
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_when_unwatched, generation)
                async with aclosing(generation.events()) as events:
                    async for _ in events:
                        if not started:
                            started = True
                            task_status.started()
                nursery.cancel_scope.cancel()
        finally:
            if not started:  # it ended before its first event (or failed to start)
                with trio.CancelScope(shield=True):
                    await generation.close()
                task_status.started()

    async def _cancel_when_unwatched(self, generation: Generation) -> None:
        grace = generation.request.resume_grace_seconds
        if grace is None:
            grace = min(DEFAULT_RESUME_GRACE_SECONDS, self.settings.resume_grace_max_seconds)
        while True:
            changed = generation.watchers_changed
            if generation.watchers > 0:
                await changed.wait()
                continue
            with trio.move_on_after(grace) as timer:
                await changed.wait()
            if timer.cancelled_caught and not await self.stream_log.watched(generation.key):
                log.info("request %s: no client for %.1f s: cancelled",
                         generation.request_id, grace)
                generation.cancel("disconnect")
                return


    async def follow(
        self, owner: str, request_id: str, after: int
    ) -> AsyncGenerator[tuple[int, StreamEvent], None]:
        """The events of the owner's stream after position `after`: replayed from the
        stream log, then live until its final event. Never starts a generation.

        Raises `NothingMissing` (the client has the final event) or `StreamNotFound`
        before yielding. While it is iterated, a resumable generation running here
        counts it as a follower (on another replica, the log's `watching`)."""
        key = (owner, request_id)
        generation = self._live.get(key)
        if generation is not None and generation.resumable:
            generation.watch(+1)
            try:
                async for item in self.stream_log.follow(key, after):
                    yield item
            finally:
                generation.watch(-1)
        else:
            async with self.stream_log.watching(key):
                async for item in self.stream_log.follow(key, after):
                    yield item

    def unregister(self, generation: Generation) -> None:
        """Called by `Generation.close()`: from now on a cancel for it is a miss."""
        if self._live.get(generation.key) is generation:
            del self._live[generation.key]
            if self.remote is not None:
                self.remote.withdraw(*generation.key)
            if not self._live:
                self._idle.set()

    @property
    def live_count(self) -> int:
        return len(self._live)

    def cancel_local(self, owner: str, request_id: str, cause: CancelCause) -> bool:
        """Cancel the owner's generation with this id if it runs here."""
        generation = self._live.get((owner, request_id))
        if generation is None:
            return False
        generation.cancel(cause)
        return True

    async def cancel(self, owner: str, request_id: str, cause: CancelCause) -> bool:
        """Cancel the owner's generation with this id, here or (with a `RemoteCancel`)
        on the replica running it; False if none runs. Another owner's generation is
        never found: the answer cannot tell it apart from one that does not exist."""
        if self.cancel_local(owner, request_id, cause):
            await trio.lowlevel.checkpoint()
            return True
        if self.remote is None:
            await trio.lowlevel.checkpoint()
            return False
        return await self.remote.forward(owner, request_id, cause)

    async def drain(self, deadline: float) -> None:
        """Refuse new generations (`Draining`), let live ones run until `deadline`
        (`trio.current_time()` clock), then cancel what is left with the cause
        `shutdown` and wait for it to end. Cancellation stops the wait, not the drain."""
        self.draining = True
        with trio.move_on_at(deadline):
            await self._idle.wait()
        for generation in list(self._live.values()):
            generation.cancel("shutdown")
        await self._idle.wait()

    async def unlock(self, session: Session | tuple[str, str], token: str) -> None:
        """Release the lock of a session's incarnation. If the store is down, the lock is
        remembered and released once the store answers again (or it expires by itself)."""
        key = (session.id, session.incarnation) if isinstance(session, Session) else session
        with trio.move_on_after(self.settings.store_timeout_seconds), suppress(StoreUnavailable):
            await self.store.unlock(key[0], token, incarnation=key[1])
            self._unreleased.pop(key, None)
            return
        self._unreleased[key] = token

    async def _release_unreleased(self) -> None:
        """Retry the locks left behind by an outage, before taking a new lock: without
        this a session whose generation ended while the store was down would stay busy
        for SESSION_LOCK_SECONDS after the store is back. Bounded by one store timeout."""
        with trio.move_on_after(self.settings.store_timeout_seconds):
            for key, token in list(self._unreleased.items()):
                await self.unlock(key, token)

    async def store_call(self, call: Awaitable[T]) -> T:
        """Await one store call with the store timeout; `SessionStoreUnavailable` if the
    store is down."""
        with store_deadline(self.settings.store_timeout_seconds, self.observer):
            return await call

    async def open_session(
        self, session_id: str, owner: str, *, autocreate: bool = False
    ) -> Session:
        """The caller's session: `UnknownSession` (404) if unknown (unless `autocreate`),
        malformed or another owner's (the same answer: ids of others stay secret),
        `SessionStoreUnavailable` if the store is down; used by generations, the session
        routes and Socket.IO rooms."""
        with store_deadline(self.settings.store_timeout_seconds, self.observer):
            session = await self.store.get(session_id)
            if session is None and autocreate:
                try:
                    session = await self.store.create(owner, session_id=session_id)
                except SessionExists:  # a concurrent first use created it: use that one
                    session = await self.store.get(session_id)
        if session is None or session.owner != owner:
            raise UnknownSession()
        return session


@contextmanager
def store_deadline(
    timeout: float, observer: GenerationObserver = NULL_OBSERVER
) -> Iterator[None]:
    """Bound the store calls inside by `timeout`; a store that is down or too slow
    becomes `SessionStoreUnavailable` (the one place that mapping lives)."""
    try:
        with trio.fail_after(timeout):
            yield
    except LimitReached as exc:
        raise _limit_error(exc) from None
    except (StoreUnavailable, trio.TooSlowError) as exc:
        observer.on_store_error("timeout" if isinstance(exc, trio.TooSlowError) else "unavailable")
        raise SessionStoreUnavailable() from None


def _limit_error(exc: LimitReached) -> DomainError:
    """A store limit as what the client is told (429 or 413, see the error table)."""
    if isinstance(exc, SessionFull):
        return SessionTooLarge(exc.limit)
    if isinstance(exc, StoreFull):
        return SessionStoreFull()
    return TooManySessions(exc.limit)

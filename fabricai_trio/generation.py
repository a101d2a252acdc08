"""The one generation path shared by SSE, Socket.IO and the OpenAI-style routes.

`GenerationService.prepare()` does everything that can refuse a request before a
response starts (model loading, session checks and lock, context length, the queue),
so transports can answer with a plain HTTP status. `Generation.events()` then waits
for a slot, streams the engine's tokens and ends with `complete` or `error`; when it
ends for any reason (done, cancelled, failed) the session turn is written once and the
slot, the session lock and the queue place are released.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import trio

from .admission import Admission, QueueFull, Ticket
from .api import errors
from .api.errors import ApiError
from .api.schemas import (
    ChatMessage,
    CompleteEvent,
    ErrorEvent,
    FinishReason,
    GenerationRequest,
    QueuedEvent,
    StreamEvent,
    Timings,
    TokenEvent,
    Usage,
)
from .engine.base import Chunk, Engine, EngineError, EngineRequest
from .observer import NULL_OBSERVER, GenerationObserver
from .sessions import (
    Message,
    Session,
    SessionExists,
    SessionStore,
    SessionStoreError,
    StoreUnavailable,
)
from .settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

CancelCause = Literal["disconnect", "cancel", "shutdown"]


class Keepalive:
    """Yielded while a request waits in the queue, so transports can keep links alive."""


KEEPALIVE = Keepalive()


@dataclass(eq=False)  # hashable by identity: the service keeps a set of live ones
class Generation:
    """A prepared request: it holds a queue place (and a session lock) until it ends."""

    service: GenerationService
    request: GenerationRequest
    engine_request: EngineRequest
    ticket: Ticket
    owner: str
    new_messages: list[ChatMessage]
    session: Session | None = None
    lock_token: str | None = None
    cancel_cause: CancelCause = "disconnect"
    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    created_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # monotonic, like created_at
    first_token_at: float | None = None  # monotonic, like created_at (logs, metrics)
    _closed: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.prompt_tokens)

    async def events(self) -> AsyncGenerator[StreamEvent | Keepalive, None]:
        """Queue, decode, complete. Close it with `aclosing()` (Quart does).

        Cancellation (a disconnect, `inference_cancel`, shutdown) takes effect while
        queued or between two tokens; the partial turn is still stored, shielded.
        """
        rid = self.request_id
        service = self.service
        started = False
        try:
            yield QueuedEvent(request_id=rid, position=self.ticket.position)
            while not self.ticket.admitted:
                with trio.move_on_after(service.settings.sse_keepalive_seconds):
                    await self.ticket.wait()
                if not self.ticket.admitted:
                    yield KEEPALIVE
            self.admitted_at = last_chunk_at = time.monotonic()
            started = True
            index = 0
            try:
                async with aclosing(service.engine.generate_stream(self.engine_request)) as stream:
                    async for item in stream:
                        if isinstance(item, Chunk):
                            now = time.monotonic()
                            if self.completion_tokens:
                                service.observer.on_token_timing(now - last_chunk_at, item.tokens)
                            last_chunk_at = now
                            self.completion_tokens += item.tokens
                            if item.text:
                                if self.first_token_at is None:
                                    self.first_token_at = now
                                self.text += item.text
                                yield TokenEvent(request_id=rid, index=index, text=item.text)
                                index += 1
                        else:
                            self.finish_reason = item.reason
                            self.completion_tokens = item.completion_tokens
            except EngineError as exc:
                log.error("request %s: engine error: %s", rid, exc)
                self.finish_reason = "error"
                await self._end()
                yield ErrorEvent(request_id=rid, code=500, error="engine_error", message=str(exc))
                return
            self.finish_reason = self.finish_reason or "stop"
            complete = self.complete_event()
            await self._end()
            yield complete
        except BaseException:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.close(store_turn=started)

    def complete_event(self) -> CompleteEvent:
        """The `complete` event for the generation as it stands (finished or cancelled)."""
        done = time.monotonic()
        return CompleteEvent(
            request_id=self.request_id,
            text=self.text,
            finish_reason=self.finish_reason or "stop",
            usage=Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                total_tokens=self.prompt_tokens + self.completion_tokens,
            ),
            timings=_timings(self.created_at, self.admitted_at or done, self.first_token_at,
                             done, self.completion_tokens),
        )

    async def _end(self) -> None:
        """Store the turn and release slot and lock *before* the last event: a client
        that sends its next turn as soon as it reads `complete` (or `error`) must find
        this turn stored and the session free, not a 409."""
        with trio.CancelScope(shield=True):
            await self.close(store_turn=True)

    async def close(self, *, store_turn: bool = False) -> None:
        """Release the queue place or slot, store the turn, unlock. Idempotent.

        Safe to call from a cancelled context only inside a shielded scope (as
        `events()` does); store calls are bounded by STORE_TIMEOUT_SECONDS.
        """
        if self._closed:
            return
        self._closed = True
        self.service.live.discard(self)
        self.service.observer.on_finished(self, admitted=self.ticket.admitted)
        self.ticket.release()
        if self.session is None:
            return
        store = self.service.store
        timeout = self.service.settings.store_timeout_seconds
        if store_turn:
            with trio.move_on_after(timeout) as scope:
                try:
                    await store.append_turn(self.session.id, self._turn_messages())
                except SessionStoreError as exc:
                    self.service.observer.on_store_error("write_failed")
                    log.error("request %s: turn not stored: %s", self.request_id, exc)
            if scope.cancelled_caught:
                self.service.observer.on_store_error("timeout")
                log.error("request %s: turn not stored: store timed out", self.request_id)
        if self.lock_token is not None:
            await self.service.unlock(self.session.id, self.lock_token)

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
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                created_at=now,
                request_id=self.request_id,
            )
        )
        return turn


def _timings(
    created: float, admitted: float, first: float | None, done: float, tokens: int
) -> Timings:
    decode_s = done - (first or admitted)
    return Timings(
        queued_ms=round((admitted - created) * 1000, 3),
        ttft_ms=None if first is None else round((first - admitted) * 1000, 3),
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
        engine: Engine,
        admission: Admission,
        store: SessionStore,
        observer: GenerationObserver = NULL_OBSERVER,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.admission = admission
        self.store = store
        self.observer = observer
        self.live: set[Generation] = set()  # prepared and not yet closed
        # session id -> token of a lock `unlock` could not release (store down then).
        self._unreleased: dict[str, str] = {}

    async def prepare(self, request: GenerationRequest, *, owner: str) -> Generation:
        """Check and admit a request; raises `ApiError` (503/404/403/409/400/429).

        On success the caller owns the returned `Generation` and must either iterate
        `events()` or call `close()`.
        """
        if not self.engine.info().loaded:
            raise errors.unavailable("model_loading", "the model is still loading")
        max_tokens = request.max_tokens or self.settings.default_max_tokens
        session: Session | None = None
        lock_token: str | None = None
        if request.session_id is not None:
            session = await self.open_session(
                request.session_id, owner, autocreate=self.settings.session_autocreate
            )
            lock_token = uuid.uuid4().hex
            await self._release_unreleased()
            if not await self.store_call(
                self.store.try_lock(session.id, lock_token, self.settings.session_lock_seconds)
            ):
                raise ApiError(409, "session_busy", "a generation is already running on this "
                               "session", "session_id")
        try:
            if session is not None:
                # Again, under the lock: a turn that ended after the first read is history.
                session = await self.open_session(session.id, owner)
            new_messages = request.new_messages()
            tokens, stop = await self._prompt_tokens(request, session, new_messages, max_tokens)
            try:
                ticket = self.admission.try_enter()
            except QueueFull:
                self.observer.on_rejected()
                raise errors.queue_full(self.settings.retry_after_seconds) from None
        except BaseException:
            if session is not None and lock_token is not None:
                with trio.CancelScope(shield=True):
                    await self.unlock(session.id, lock_token)
            raise
        engine_request = EngineRequest(
            request_id=request.request_id,
            prompt_tokens=tokens,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repeat_penalty=request.repeat_penalty,
            seed=request.seed,
            stop=tuple(dict.fromkeys([*request.stop, *stop])),
        )
        generation = Generation(
            service=self,
            request=request,
            engine_request=engine_request,
            ticket=ticket,
            owner=owner,
            new_messages=new_messages,
            session=session,
            lock_token=lock_token,
        )
        self.live.add(generation)
        return generation

    def begin_shutdown(self) -> None:
        """Generations cancelled from now on were cut by the shutdown (for metrics)."""
        for generation in self.live:
            generation.cancel_cause = "shutdown"

    async def unlock(self, session_id: str, token: str) -> None:
        """Release a session lock. If the store is down, the lock is remembered and
        released once the store answers again (or it expires by itself)."""
        with trio.move_on_after(self.settings.store_timeout_seconds), suppress(StoreUnavailable):
            await self.store.unlock(session_id, token)
            self._unreleased.pop(session_id, None)
            return
        self._unreleased[session_id] = token

    async def _release_unreleased(self) -> None:
        """Retry the locks left behind by an outage, before taking a new lock: without
        this a session whose generation ended while the store was down would stay busy
        for SESSION_LOCK_SECONDS after the store is back. Bounded by one store timeout."""
        with trio.move_on_after(self.settings.store_timeout_seconds):
            for session_id, token in list(self._unreleased.items()):
                await self.unlock(session_id, token)

    async def store_call(self, call: Awaitable[T]) -> T:
        """Await one store call with the store timeout; 503 if the store is down."""
        with store_deadline(self.settings.store_timeout_seconds, self.observer):
            return await call

    async def open_session(
        self, session_id: str, owner: str, *, autocreate: bool = False
    ) -> Session:
        """The caller's session: 404 if unknown (unless `autocreate`), 403 if another
        owner's, 503 if the store is down; used by generations and the session routes."""
        with store_deadline(self.settings.store_timeout_seconds, self.observer):
            session = await self.store.get(session_id)
            if session is None and autocreate:
                try:
                    session = await self.store.create(owner, session_id=session_id)
                except SessionExists:  # a concurrent first use created it: use that one
                    session = await self.store.get(session_id)
        if session is None:
            raise errors.not_found("session", "session_id")
        if session.owner != owner:
            raise ApiError(403, "session_forbidden", "this session belongs to another identity",
                           "session_id")
        return session

    async def _prompt_tokens(
        self,
        request: GenerationRequest,
        session: Session | None,
        new_messages: Sequence[ChatMessage],
        max_tokens: int,
    ) -> tuple[list[int], tuple[str, ...]]:
        """Tokens to decode; history is trimmed oldest turn first (system kept) to fit."""
        budget = self.settings.n_ctx - max_tokens
        if not request.is_chat:
            tokens = await self.engine.tokenize(request.prompt or "")
            if len(tokens) > budget:
                raise _too_long(len(tokens), max_tokens, self.settings.n_ctx)
            return tokens, ()
        history = [
            ChatMessage(role=m.role, content=m.content)
            for m in (session.messages if session is not None else ())
            if m.content or m.role != "assistant"
        ]
        system = [m for m in history if m.role == "system"]
        older = [m for m in history if m.role != "system"]
        while True:
            chat = self.engine.format_chat([*system, *older, *new_messages])
            tokens = await self.engine.tokenize(chat.text, add_bos=chat.add_bos)
            if len(tokens) <= budget:
                return tokens, chat.stop
            if not older:
                raise _too_long(len(tokens), max_tokens, self.settings.n_ctx)
            # Drop the oldest whole turn (its user message and the reply after it): a
            # conversation that opened with a reply would put the system text after it.
            end = 1
            while end < len(older) and older[end].role != "user":
                end += 1
            older = older[end:]


@contextmanager
def store_deadline(
    timeout: float, observer: GenerationObserver = NULL_OBSERVER
) -> Iterator[None]:
    """Bound the store calls inside by `timeout`; a store that is down or too slow
    becomes a 503 `session_store_unavailable` (the one place that mapping lives)."""
    try:
        with trio.fail_after(timeout):
            yield
    except (StoreUnavailable, trio.TooSlowError) as exc:
        observer.on_store_error("timeout" if isinstance(exc, trio.TooSlowError) else "unavailable")
        raise errors.unavailable(
            "session_store_unavailable", "the session store is unavailable"
        ) from None


def _too_long(prompt_tokens: int, max_tokens: int, n_ctx: int) -> ApiError:
    return ApiError(
        400,
        "context_length_exceeded",
        f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) does not fit "
        f"the context window ({n_ctx} tokens)",
        "max_tokens",
    )

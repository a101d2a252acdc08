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
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Literal

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
from .sessions import Message, Session, SessionStore, SessionStoreError, StoreUnavailable
from .settings import Settings

log = logging.getLogger(__name__)

CancelCause = Literal["disconnect", "cancel", "shutdown"]


class Keepalive:
    """Yielded while a request waits in the queue, so transports can keep links alive."""


KEEPALIVE = Keepalive()


@dataclass
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
            admitted_at = time.monotonic()
            first_token_at: float | None = None
            started = True
            index = 0
            try:
                async with aclosing(service.engine.generate_stream(self.engine_request)) as stream:
                    async for item in stream:
                        if isinstance(item, Chunk):
                            self.completion_tokens += item.tokens
                            if item.text:
                                if first_token_at is None:
                                    first_token_at = time.monotonic()
                                self.text += item.text
                                yield TokenEvent(request_id=rid, index=index, text=item.text)
                                index += 1
                        else:
                            self.finish_reason = item.reason
                            self.completion_tokens = item.completion_tokens
            except EngineError as exc:
                log.error("request %s: engine error: %s", rid, exc)
                self.finish_reason = "error"
                yield ErrorEvent(request_id=rid, code=500, error="engine_error", message=str(exc))
                return
            done = time.monotonic()
            yield CompleteEvent(
                request_id=rid,
                text=self.text,
                finish_reason=self.finish_reason or "stop",
                usage=Usage(
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    total_tokens=self.prompt_tokens + self.completion_tokens,
                ),
                timings=_timings(self.created_at, admitted_at, first_token_at, done,
                                 self.completion_tokens),
            )
        except BaseException:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.close(store_turn=started)

    async def close(self, *, store_turn: bool = False) -> None:
        """Release the queue place or slot, store the turn, unlock. Idempotent.

        Safe to call from a cancelled context only inside a shielded scope (as
        `events()` does); store calls are bounded by STORE_TIMEOUT_SECONDS.
        """
        if self._closed:
            return
        self._closed = True
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
                    log.error("request %s: turn not stored: %s", self.request_id, exc)
            if scope.cancelled_caught:
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
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.admission = admission
        self.store = store

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
            session = await self._open_session(request.session_id, owner)
            lock_token = uuid.uuid4().hex
            if not await self._store_call(
                self.store.try_lock(session.id, lock_token, self.settings.session_lock_seconds)
            ):
                raise ApiError(409, "session_busy", "a generation is already running on this "
                               "session", "session_id")
        try:
            new_messages = request.new_messages()
            tokens, stop = await self._prompt_tokens(request, session, new_messages, max_tokens)
            try:
                ticket = self.admission.try_enter()
            except QueueFull:
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
        return Generation(
            service=self,
            request=request,
            engine_request=engine_request,
            ticket=ticket,
            owner=owner,
            new_messages=new_messages,
            session=session,
            lock_token=lock_token,
        )

    async def unlock(self, session_id: str, token: str) -> None:
        """Release a session lock; if the store is down, the lock expires by itself."""
        with trio.move_on_after(self.settings.store_timeout_seconds), suppress(StoreUnavailable):
            await self.store.unlock(session_id, token)

    async def _store_call(self, call: Awaitable[bool]) -> bool:
        """Await a store call with the store timeout; 503 if the store is down."""
        try:
            with trio.fail_after(self.settings.store_timeout_seconds):
                return await call
        except (StoreUnavailable, trio.TooSlowError):
            raise errors.unavailable(
                "session_store_unavailable", "the session store is unavailable"
            ) from None

    async def _open_session(self, session_id: str, owner: str) -> Session:
        try:
            with trio.fail_after(self.settings.store_timeout_seconds):
                session = await self.store.get(session_id)
                if session is None and self.settings.session_autocreate:
                    session = await self.store.create(owner, session_id=session_id)
        except (StoreUnavailable, trio.TooSlowError):
            raise errors.unavailable(
                "session_store_unavailable", "the session store is unavailable"
            ) from None
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
        """Tokens to decode; history is trimmed oldest-first (system kept) to fit."""
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
            older = older[1:]


def _too_long(prompt_tokens: int, max_tokens: int, n_ctx: int) -> ApiError:
    return ApiError(
        400,
        "context_length_exceeded",
        f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) does not fit "
        f"the context window ({n_ctx} tokens)",
        "max_tokens",
    )

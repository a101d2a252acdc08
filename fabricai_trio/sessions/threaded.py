"""The async `SessionStore` over a blocking client (Redis, SQL): one base, two backends.

Each protocol call validates its arguments on the trio thread, then runs one `_*_sync`
method in a worker thread through `trio.to_thread.run_sync`, behind the store's own
`CapacityLimiter` (sized like its connection pool, so a thread never waits for a
connection). Threads are never abandoned: a cancelled call still finishes its command,
which keeps every write all-or-nothing. Backends map their client's exceptions to
`StoreUnavailable` / `SessionStoreError` in `_store_error`.
"""

from __future__ import annotations

import functools
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from .base import (
    NO_LIMITS,
    SessionNotFound,
    SessionStoreError,
    StoreLimits,
    check_incarnation,
    check_limits,
    check_owner,
    check_session_id,
    check_token,
    check_ttl,
    check_turn,
    is_valid_session_id,
    new_incarnation,
)
from .models import Message, Session, SessionInfo

T = TypeVar("T")


class ThreadedSessionStore(ABC):
    """A `SessionStore` whose work happens in `_*_sync` methods on worker threads."""

    backend: str

    def __init__(
        self, *, timeout_seconds: float, max_threads: int, limits: StoreLimits = NO_LIMITS
    ) -> None:
        self._timeout = check_ttl(timeout_seconds)
        self._limiter = trio.CapacityLimiter(max_threads)
        self._limits = check_limits(limits)

    # --- the protocol (see base.SessionStore for the contract) ---

    async def create(
        self, owner: str, *, system_prompt: str | None = None, session_id: str | None = None
    ) -> Session:
        check_owner(owner)
        sid = uuid.uuid4().hex if session_id is None else check_session_id(session_id)
        first = () if system_prompt is None else (Message(role="system", content=system_prompt),)
        return await self._call(
            functools.partial(self._create_sync, owner, sid, first, new_incarnation())
        )

    async def get(self, session_id: str) -> Session | None:
        if not is_valid_session_id(session_id):
            await trio.lowlevel.checkpoint()
            return None
        return await self._call(functools.partial(self._get_sync, session_id))

    async def list_sessions(self, owner: str) -> list[SessionInfo]:
        return await self._call(functools.partial(self._list_sync, owner))

    async def append_turn(
        self, session_id: str, messages: Sequence[Message], *, incarnation: str | None = None
    ) -> Session:
        turn = check_turn(messages)
        if not is_valid_session_id(session_id):
            await trio.lowlevel.checkpoint()
            raise SessionNotFound(session_id)
        return await self._call(
            functools.partial(self._append_sync, session_id, turn, incarnation)
        )

    async def delete(self, session_id: str, *, incarnation: str | None = None) -> bool:
        if not is_valid_session_id(session_id):
            await trio.lowlevel.checkpoint()
            return False
        return await self._call(functools.partial(self._delete_sync, session_id, incarnation))

    async def try_lock(
        self, session_id: str, token: str, ttl_seconds: float, *, incarnation: str = ""
    ) -> bool:
        check_session_id(session_id)
        check_token(token)
        check_incarnation(incarnation)
        ttl = check_ttl(ttl_seconds)
        return await self._call(
            functools.partial(self._try_lock_sync, session_id, incarnation, token, ttl)
        )

    async def unlock(self, session_id: str, token: str, *, incarnation: str = "") -> None:
        if not is_valid_session_id(session_id):
            await trio.lowlevel.checkpoint()
            return
        await self._call(
            functools.partial(self._unlock_sync, session_id, incarnation, token)
        )

    async def ping(self) -> bool:
        """Waits at most about two store timeouts (limiter queue, then one round trip)."""
        answered = False
        with trio.move_on_after(self._timeout):
            try:
                answered = await self._call(self._ping_sync)
            except SessionStoreError:
                answered = False
        return answered

    async def aclose(self) -> None:
        """Waits for a free thread slot, then closes the client's connections."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    # --- threads ---

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except SessionStoreError:
            raise
        except Exception as exc:
            error = self._store_error(exc)
            if error is None:
                raise
            raise error from exc

    @abstractmethod
    def _store_error(self, exc: Exception) -> SessionStoreError | None:
        """The store error for a client exception (None: not the client's, re-raise)."""

    @abstractmethod
    def _create_sync(
        self, owner: str, sid: str, first: tuple[Message, ...], incarnation: str
    ) -> Session:
        """Create, enforcing `self._limits` (per owner, per session) atomically."""

    @abstractmethod
    def _get_sync(self, sid: str) -> Session | None: ...

    @abstractmethod
    def _list_sync(self, owner: str) -> list[SessionInfo]: ...

    @abstractmethod
    def _append_sync(
        self, sid: str, turn: tuple[Message, ...], incarnation: str | None
    ) -> Session:
        """Append if the session (and `incarnation`, unless None) is live, enforcing
        `max_session_bytes`; the check and the write are one transaction."""

    @abstractmethod
    def _delete_sync(self, sid: str, incarnation: str | None) -> bool: ...

    @abstractmethod
    def _try_lock_sync(self, sid: str, incarnation: str, token: str, ttl: float) -> bool: ...

    @abstractmethod
    def _unlock_sync(self, sid: str, incarnation: str, token: str) -> None: ...

    @abstractmethod
    def _ping_sync(self) -> bool: ...

    @abstractmethod
    def _close_sync(self) -> None: ...

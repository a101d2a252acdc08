"""The session store contract: the async protocol, its errors and its argument rules.

Every backend (memory, Redis, SQL) implements `SessionStore` and passes the same contract
tests (`tests/sessions/test_contract.py`), so the server never branches on the backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .models import Message, Session, SessionInfo

#: Session ids are used in Redis keys and SQL keys: keep them short and printable.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_OWNER_LENGTH = 255


class SessionStoreError(Exception):
    """Base of every error a session store raises on purpose."""


class StoreUnavailable(SessionStoreError):
    """The store is down or did not answer in time; the server answers 503
    `session_store_unavailable`. The outcome of a write that raised this is unknown
    only if the connection broke after the write was sent."""


class SessionNotFound(SessionStoreError, LookupError):
    """The session does not exist (never created, deleted, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class SessionExists(SessionStoreError):
    """`create` was given the id of a session that still exists."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")
        self.session_id = session_id


@runtime_checkable
class SessionStore(Protocol):
    """Async storage of conversations, with a per-session generation lock.

    Cancellation, for every method: a call cancelled before it reaches the backend does
    nothing and raises `trio.Cancelled`. Thread-backed stores (Redis, SQL) run each call
    in a worker thread that is never abandoned: once the thread has started, the call
    finishes its command (a write lands whole) and returns normally; the cancellation is
    delivered at the caller's next checkpoint. The memory store has no await between its
    check and its write, so the same holds. A write is therefore all or nothing.
    """

    backend: str
    """`"memory"`, `"redis"` or `"sql"`: what `/v1/status` reports."""

    async def create(
        self, owner: str, *, system_prompt: str | None = None, session_id: str | None = None
    ) -> Session:
        """Create a session (id: `session_id`, else a new uuid4 hex).

        A `system_prompt` becomes the first message. Raises `SessionExists` if the id is
        taken, `ValueError` for a malformed id or owner. Cancelled: created or not, whole.
        """
        ...

    async def get(self, session_id: str) -> Session | None:
        """The session with its messages in order, or None if unknown or expired.

        Cancelled: nothing to undo (a read).
        """
        ...

    async def list_sessions(self, owner: str) -> list[SessionInfo]:
        """The owner's live sessions, most recently updated first.

        Cancelled: nothing to undo (expired entries may have been pruned).
        """
        ...

    async def append_turn(self, session_id: str, messages: Sequence[Message]) -> Session:
        """Append a whole turn (user message(s) and the assistant reply) atomically.

        Updates `updated_at` and refreshes the TTL. Returns the session after the write.
        Raises `SessionNotFound` if the session is gone, `TypeError`/`ValueError` for an
        empty turn or a non-`Message` item (nothing is written). Concurrent turns on one
        session all land, each contiguous. Cancelled: the turn is in full or not at all.
        """
        ...

    async def delete(self, session_id: str) -> bool:
        """Delete a session and its messages; False if it did not exist.

        Cancelled: deleted or not, whole.
        """
        ...

    async def try_lock(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        """Take the session's generation lock for `token` unless someone holds it.

        The lock expires after `ttl_seconds` by itself, so a crashed worker cannot keep
        it. Not re-entrant: the holder's own second call returns False. Cancelled: the
        lock may have been taken; `unlock` with the same token is always safe.
        """
        ...

    async def unlock(self, session_id: str, token: str) -> None:
        """Release the lock only if `token` holds it (an expired-and-retaken lock stays).

        Cancelled: released or not; the lock expires anyway.
        """
        ...

    async def ping(self) -> bool:
        """True if the backend answers within the store timeout. Never raises.

        Cancelled: raises `trio.Cancelled` like any checkpoint; nothing is written.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads' resources. Cancelled: closed anyway."""
        ...


def check_session_id(session_id: str) -> str:
    """Raise ValueError unless `session_id` matches `SESSION_ID_PATTERN`."""
    if not is_valid_session_id(session_id):
        raise ValueError(f"invalid session id {session_id!r}: want {SESSION_ID_PATTERN.pattern}")
    return session_id


def is_valid_session_id(session_id: object) -> bool:
    """A malformed id cannot name a stored session: reads answer 'not found' for it."""
    return isinstance(session_id, str) and SESSION_ID_PATTERN.fullmatch(session_id) is not None


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_LENGTH:
        raise ValueError(f"owner must be a string of 1 to {MAX_OWNER_LENGTH} characters")
    return owner


def check_token(token: str) -> str:
    if not isinstance(token, str) or not 0 < len(token) <= 255:
        raise ValueError("lock token must be a string of 1 to 255 characters")
    return token


def check_ttl(ttl_seconds: float) -> float:
    if not ttl_seconds > 0:
        raise ValueError(f"ttl must be positive, got {ttl_seconds!r}")
    return float(ttl_seconds)


def check_turn(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Validate a turn before any I/O, so a bad turn never leaves a partial write."""
    turn = tuple(messages)
    if not turn:
        raise ValueError("a turn needs at least one message")
    for message in turn:
        if not isinstance(message, Message):
            raise TypeError(f"a turn holds Message objects, got {type(message).__name__}")
    # `Message.model_construct` skips validation: validate again, it costs microseconds.
    return tuple(Message.model_validate(m.model_dump()) for m in turn)

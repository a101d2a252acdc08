"""The session store contract: the async protocol, its errors and its argument rules.

Every backend (memory, Redis, SQL) implements `SessionStore` and passes the same contract
tests (`tests/sessions/test_contract.py`), so the server never branches on the backend.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..core.ids import SESSION_ID_RE, is_session_id
from .models import Message, Session, SessionInfo

#: Session ids are used in Redis keys and SQL keys: the API's pattern, checked here too.
SESSION_ID_PATTERN = SESSION_ID_RE
MAX_OWNER_LENGTH = 255


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What one store keeps at most; None: no cap.

    `max_sessions_per_owner`: live sessions of one owner (`create` raises
    `TooManySessions`). `max_session_bytes`: UTF-8 bytes of message content in one
    session; a write is refused (`SessionFull`) when the session's bytes plus what the
    write adds *from the client* (every message but the assistant's reply) would pass it.
    The reply of a generation that was let in is always kept, so a turn that started is
    never lost: a session holds at most the cap plus one reply. `max_total_bytes`: the
    same rule over every session of the store (memory store only; `StoreFull`), each
    session counting `SESSION_OVERHEAD_BYTES` more.
    """

    max_sessions_per_owner: int | None = None
    max_session_bytes: int | None = None
    max_total_bytes: int | None = None


NO_LIMITS = StoreLimits()
#: What an empty session costs the memory store's global count (ids, times, dicts).
SESSION_OVERHEAD_BYTES = 1024


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


class LimitReached(SessionStoreError):
    """A write refused by one of the store's `StoreLimits`; nothing was written."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class TooManySessions(LimitReached):
    def __init__(self, owner_limit: int) -> None:
        super().__init__(f"the owner already has {owner_limit} sessions", owner_limit)


class SessionFull(LimitReached):
    def __init__(self, session_id: str, byte_limit: int) -> None:
        super().__init__(f"session {session_id!r} would pass {byte_limit} bytes", byte_limit)
        self.session_id = session_id


class StoreFull(LimitReached):
    def __init__(self, byte_limit: int) -> None:
        super().__init__(f"the store would pass {byte_limit} bytes", byte_limit)


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
        """Create a session (id: `session_id`, else a new uuid4 hex) with a new random
        `incarnation`: a session deleted and created again under its id is another
        session, and writes meant for the old one never land in the new one.

        A `system_prompt` becomes the first message. Raises `SessionExists` if the id is
        taken, `ValueError` for a malformed id or owner, `TooManySessions`, `SessionFull`
        or `StoreFull` past a limit. Cancelled: created or not, whole.
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

    async def append_turn(
        self, session_id: str, messages: Sequence[Message], *, incarnation: str | None = None
    ) -> Session:
        """Append a whole turn (user message(s) and the assistant reply) atomically.

        Updates `updated_at` and refreshes the TTL. Returns the session after the write.
        With `incarnation`, the write lands only in that incarnation of the session (the
        check and the write are one atomic step). Raises `SessionNotFound` if the session
        (or that incarnation) is gone, `SessionFull`/`StoreFull` past a limit,
        `TypeError`/`ValueError` for an empty turn or a non-`Message` item (nothing is
        written). Concurrent turns on one session all land, each contiguous. Cancelled:
        the turn is in full or not at all.
        """
        ...

    async def delete(self, session_id: str, *, incarnation: str | None = None) -> bool:
        """Delete a session and its messages; False if it did not exist (or, with
        `incarnation`, if the live session under that id is another incarnation).

        Cancelled: deleted or not, whole.
        """
        ...

    async def try_lock(
        self, session_id: str, token: str, ttl_seconds: float, *, incarnation: str = ""
    ) -> bool:
        """Take the generation lock of the session's `incarnation` for `token` unless
        someone holds it (a lock of a deleted incarnation never blocks the next one).

        The lock expires after `ttl_seconds` by itself, so a crashed worker cannot keep
        it. Not re-entrant: the holder's own second call returns False. Cancelled: the
        lock may have been taken; `unlock` with the same token is always safe.
        """
        ...

    async def unlock(self, session_id: str, token: str, *, incarnation: str = "") -> None:
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
    return is_session_id(session_id)


def new_incarnation() -> str:
    """A random id for one life of a session (128 bits, hex)."""
    return secrets.token_hex(16)


def content_bytes(messages: Iterable[Message], *, client_only: bool = False) -> int:
    """UTF-8 bytes of the messages' content; `client_only`: not counting assistant
    replies (what a limit check weighs, see `StoreLimits`)."""
    return sum(
        len(m.content.encode("utf-8", "surrogatepass"))
        for m in messages
        if not (client_only and m.role == "assistant")
    )


def check_limits(limits: StoreLimits) -> StoreLimits:
    for name in ("max_sessions_per_owner", "max_session_bytes", "max_total_bytes"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
    return limits


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_LENGTH:
        raise ValueError(f"owner must be a string of 1 to {MAX_OWNER_LENGTH} characters")
    return owner


def check_token(token: str) -> str:
    if not isinstance(token, str) or not 0 < len(token) <= 255:
        raise ValueError("lock token must be a string of 1 to 255 characters")
    return token


def check_incarnation(incarnation: str) -> str:
    if not isinstance(incarnation, str) or len(incarnation) > 64 or not (
        incarnation == "" or (incarnation.isascii() and incarnation.isalnum())
    ):
        raise ValueError("incarnation must be up to 64 letters and digits")
    return incarnation


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

"""In-process session store: a dict, for one server process (dev, tests, no Redis).

Safe under trio without locks: every method checks for cancellation first, then reads
and writes with no await in between, then yields once, shielded. A task switch can
therefore never land between a check and its write.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .base import (
    NO_LIMITS,
    SESSION_OVERHEAD_BYTES,
    SessionExists,
    SessionFull,
    SessionNotFound,
    StoreFull,
    StoreLimits,
    TooManySessions,
    check_incarnation,
    check_limits,
    check_owner,
    check_session_id,
    check_token,
    check_ttl,
    check_turn,
    content_bytes,
    is_valid_session_id,
    new_incarnation,
)
from .models import Message, Session, SessionInfo


@dataclass(slots=True)
class _Entry:
    session: Session
    expires_at: float
    size: int  # content bytes of its messages

    @property
    def footprint(self) -> int:
        """What this entry counts against `max_total_bytes`."""
        return self.size + SESSION_OVERHEAD_BYTES


@dataclass(slots=True, frozen=True)
class _Lock:
    token: str
    expires_at: float


class MemorySessionStore:
    """Sessions in a dict, expiring `ttl_seconds` after their last write.

    `clock` measures expiry (monotonic seconds); pass `trio.current_time` to drive TTLs
    with `trio.testing.MockClock`. Timestamps in the models are wall-clock epoch seconds.
    `limits.max_total_bytes` bounds the whole dict (see `StoreLimits`).
    """

    backend = "memory"

    def __init__(
        self,
        *,
        ttl_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
        limits: StoreLimits = NO_LIMITS,
    ) -> None:
        self._ttl = check_ttl(ttl_seconds)
        self._clock = clock
        self._limits = check_limits(limits)
        self._sessions: dict[str, _Entry] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._locks: dict[tuple[str, str], _Lock] = {}
        self._total = 0  # sum of the entries' footprints
        self._next_sweep = clock()

    @property
    def total_bytes(self) -> int:
        """What the live and not yet swept sessions count against `max_total_bytes`."""
        return self._total

    async def create(
        self, owner: str, *, system_prompt: str | None = None, session_id: str | None = None
    ) -> Session:
        await trio.lowlevel.checkpoint_if_cancelled()
        check_owner(owner)
        sid = uuid.uuid4().hex if session_id is None else check_session_id(session_id)
        self._sweep()
        if self._live(sid) is not None:
            raise SessionExists(sid)
        messages = () if system_prompt is None else (Message(role="system", content=system_prompt),)
        size = content_bytes(messages)
        limits = self._limits
        if limits.max_sessions_per_owner is not None:
            owned = [s for s in list(self._by_owner.get(owner, ())) if self._live(s) is not None]
            if len(owned) >= limits.max_sessions_per_owner:
                raise TooManySessions(limits.max_sessions_per_owner)
        if limits.max_session_bytes is not None and size > limits.max_session_bytes:
            raise SessionFull(sid, limits.max_session_bytes)
        self._check_total(size + SESSION_OVERHEAD_BYTES)
        now = time.time()
        session = Session(id=sid, owner=owner, created_at=now, updated_at=now, messages=messages,
                          incarnation=new_incarnation())
        entry = _Entry(session, self._clock() + self._ttl, size)
        self._sessions[sid] = entry
        self._total += entry.footprint
        self._by_owner.setdefault(owner, set()).add(sid)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return session

    async def get(self, session_id: str) -> Session | None:
        await trio.lowlevel.checkpoint()
        entry = self._live(session_id)
        return None if entry is None else entry.session

    async def list_sessions(self, owner: str) -> list[SessionInfo]:
        await trio.lowlevel.checkpoint()
        infos = []
        for sid in list(self._by_owner.get(owner, ())):
            entry = self._live(sid)
            if entry is not None:
                infos.append(entry.session.info())
        return sorted(infos, key=lambda info: info.updated_at, reverse=True)

    async def append_turn(
        self, session_id: str, messages: Sequence[Message], *, incarnation: str | None = None
    ) -> Session:
        await trio.lowlevel.checkpoint_if_cancelled()
        turn = check_turn(messages)
        entry = self._live(session_id)
        if entry is None or (incarnation is not None
                             and entry.session.incarnation != incarnation):
            raise SessionNotFound(session_id)
        asked = content_bytes(turn, client_only=True)
        limit = self._limits.max_session_bytes
        if limit is not None and entry.size + asked > limit:
            raise SessionFull(session_id, limit)
        self._check_total(asked)
        added = content_bytes(turn)
        entry.session = entry.session.model_copy(
            update={"messages": entry.session.messages + turn, "updated_at": time.time()}
        )
        entry.size += added
        self._total += added
        entry.expires_at = self._clock() + self._ttl
        await trio.lowlevel.cancel_shielded_checkpoint()
        return entry.session

    async def delete(self, session_id: str, *, incarnation: str | None = None) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        entry = self._live(session_id)
        existed = entry is not None and (
            incarnation is None or entry.session.incarnation == incarnation
        )
        if existed:
            self._drop(session_id)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return existed

    async def try_lock(
        self, session_id: str, token: str, ttl_seconds: float, *, incarnation: str = ""
    ) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        check_session_id(session_id)
        check_token(token)
        check_incarnation(incarnation)
        check_ttl(ttl_seconds)
        now = self._clock()
        key = (session_id, incarnation)
        held = self._locks.get(key)
        taken = held is None or held.expires_at <= now
        if taken:
            self._locks[key] = _Lock(token, now + ttl_seconds)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return taken

    async def unlock(self, session_id: str, token: str, *, incarnation: str = "") -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        key = (session_id, incarnation)
        held = self._locks.get(key)
        if held is not None and held.token == token:
            del self._locks[key]
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def ping(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def _live(self, session_id: str) -> _Entry | None:
        """The entry if it exists and has not expired; an expired one is dropped."""
        if not is_valid_session_id(session_id):
            return None
        entry = self._sessions.get(session_id)
        if entry is not None and entry.expires_at <= self._clock():
            self._drop(session_id)
            return None
        return entry

    def _check_total(self, adding: int) -> None:
        limit = self._limits.max_total_bytes
        if limit is not None and self._total + adding > limit:
            self._sweep(force=True)
            if self._total + adding > limit:
                raise StoreFull(limit)

    def _drop(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id, None)
        if entry is not None:
            self._total -= entry.footprint
            owned = self._by_owner.get(entry.session.owner)
            if owned is not None:
                owned.discard(session_id)
                if not owned:
                    del self._by_owner[entry.session.owner]

    def _sweep(self, *, force: bool = False) -> None:
        """Drop expired sessions and locks, at most once a second (unless `force`d, when
        the store is full): memory stays bounded."""
        now = self._clock()
        if now < self._next_sweep and not force:
            return
        self._next_sweep = now + 1.0
        for sid in [s for s, e in self._sessions.items() if e.expires_at <= now]:
            self._drop(sid)
        for key in [k for k, lock in self._locks.items() if lock.expires_at <= now]:
            del self._locks[key]

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
    SessionExists,
    SessionNotFound,
    check_owner,
    check_session_id,
    check_token,
    check_ttl,
    check_turn,
    is_valid_session_id,
)
from .models import Message, Session, SessionInfo


@dataclass(slots=True)
class _Entry:
    session: Session
    expires_at: float


@dataclass(slots=True, frozen=True)
class _Lock:
    token: str
    expires_at: float


class MemorySessionStore:
    """Sessions in a dict, expiring `ttl_seconds` after their last write.

    `clock` measures expiry (monotonic seconds); pass `trio.current_time` to drive TTLs
    with `trio.testing.MockClock`. Timestamps in the models are wall-clock epoch seconds.
    """

    backend = "memory"

    def __init__(
        self, *, ttl_seconds: float = 86_400.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = check_ttl(ttl_seconds)
        self._clock = clock
        self._sessions: dict[str, _Entry] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._locks: dict[str, _Lock] = {}
        self._next_sweep = clock()

    async def create(
        self, owner: str, *, system_prompt: str | None = None, session_id: str | None = None
    ) -> Session:
        await trio.lowlevel.checkpoint_if_cancelled()
        check_owner(owner)
        sid = uuid.uuid4().hex if session_id is None else check_session_id(session_id)
        self._sweep()
        if self._live(sid) is not None:
            raise SessionExists(sid)
        now = time.time()
        messages = () if system_prompt is None else (Message(role="system", content=system_prompt),)
        session = Session(id=sid, owner=owner, created_at=now, updated_at=now, messages=messages)
        self._sessions[sid] = _Entry(session, self._clock() + self._ttl)
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

    async def append_turn(self, session_id: str, messages: Sequence[Message]) -> Session:
        await trio.lowlevel.checkpoint_if_cancelled()
        turn = check_turn(messages)
        entry = self._live(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        entry.session = entry.session.model_copy(
            update={"messages": entry.session.messages + turn, "updated_at": time.time()}
        )
        entry.expires_at = self._clock() + self._ttl
        await trio.lowlevel.cancel_shielded_checkpoint()
        return entry.session

    async def delete(self, session_id: str) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        existed = self._live(session_id) is not None
        self._drop(session_id)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return existed

    async def try_lock(self, session_id: str, token: str, ttl_seconds: float) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        check_session_id(session_id)
        check_token(token)
        check_ttl(ttl_seconds)
        now = self._clock()
        held = self._locks.get(session_id)
        taken = held is None or held.expires_at <= now
        if taken:
            self._locks[session_id] = _Lock(token, now + ttl_seconds)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return taken

    async def unlock(self, session_id: str, token: str) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        held = self._locks.get(session_id)
        if held is not None and held.token == token:
            del self._locks[session_id]
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

    def _drop(self, session_id: str) -> None:
        entry = self._sessions.pop(session_id, None)
        if entry is not None:
            owned = self._by_owner.get(entry.session.owner)
            if owned is not None:
                owned.discard(session_id)
                if not owned:
                    del self._by_owner[entry.session.owner]

    def _sweep(self) -> None:
        """Drop expired sessions and locks, at most once a second: memory stays bounded."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for sid in [s for s, e in self._sessions.items() if e.expires_at <= now]:
            self._drop(sid)
        for sid in [s for s, lock in self._locks.items() if lock.expires_at <= now]:
            del self._locks[sid]

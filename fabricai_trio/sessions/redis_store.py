"""Redis session store: redis-py's blocking client, run in trio worker threads.

redis-py has no trio support, so every call runs in a worker thread
(`ThreadedSessionStore`), never abandoned: a cancelled call still finishes its Redis
command, which keeps every write all-or-nothing.

Keys, all under `prefix` (a session id has no `:`, so no id names another key):
  `{p}session:{id}`           hash: owner, created_at, updated_at, incarnation, bytes
  `{p}session:{id}:messages`  list of message JSON, in order
  `{p}owner:{owner}`          zset of session ids, score = expiry (epoch seconds)
  `{p}lock:{id}#{incarnation}` string: the lock holder's token, with a PX expiry
Session keys expire `ttl_seconds` after the last write (PEXPIRE on every write). The
limits (`StoreLimits`) are checked under WATCH on the keys they read, so the check and
the write are one transaction (a concurrent writer makes it run again).

Failure policy: socket timeouts equal `timeout_seconds` and redis-py's own retries are
off, so a dead or paused Redis costs one timeout per call, never a hang, and a write is
never re-sent behind our back (a blind retry after a lost EXEC reply could append a
turn twice). Connection errors become `StoreUnavailable`; the pool drops a broken
connection and the next call connects again, so the store recovers when Redis returns.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .base import (
    NO_LIMITS,
    SessionExists,
    SessionFull,
    SessionNotFound,
    SessionStoreError,
    StoreLimits,
    StoreUnavailable,
    TooManySessions,
    check_ttl,
    content_bytes,
)
from .models import Message, Session, SessionInfo
from .threaded import ThreadedSessionStore

T = TypeVar("T")

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError)

# Compare-and-delete: only the holder's token releases the lock (atomic in Redis).
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisSessionStore(ThreadedSessionStore):
    """Sessions in Redis; see the module docstring for keys and failure policy."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "fabricai:",
        ttl_seconds: float = 86_400.0,
        timeout_seconds: float = 2.0,
        max_connections: int = 16,
        limits: StoreLimits = NO_LIMITS,
    ) -> None:
        super().__init__(
            timeout_seconds=timeout_seconds, max_threads=max_connections, limits=limits
        )
        self._prefix = prefix
        self._ttl_ms = max(1, round(check_ttl(ttl_seconds) * 1000))
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
        )
        self._unlock_script = self._client.register_script(_UNLOCK_LUA)

    # --- keys ---

    def _meta_key(self, sid: str) -> str:
        return f"{self._prefix}session:{sid}"

    def _messages_key(self, sid: str) -> str:
        return f"{self._prefix}session:{sid}:messages"

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}owner:{owner}"

    def _lock_key(self, sid: str, incarnation: str) -> str:
        return f"{self._prefix}lock:{sid}#{incarnation}"

    # --- threads (see ThreadedSessionStore) ---

    def _store_error(self, exc: Exception) -> SessionStoreError | None:
        if isinstance(exc, WatchError):  # redis-py: the connection died mid-WATCH
            return StoreUnavailable(f"redis: {exc}")
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailable(f"redis: {exc}")
        if isinstance(exc, RedisError):
            return SessionStoreError(f"redis: {exc}")
        return None

    def _transaction(self, body: Callable[[Pipeline], T]) -> T:
        """Run `body` as a WATCH/MULTI/EXEC transaction, again while another client wins.

        `body` WATCHes its keys, reads them, calls `multi()` and queues its writes; this
        executes them. A conflict is retried (with jitter) until `timeout_seconds` has
        passed. redis-py also raises `WatchError` when the connection dies while
        watching: that one is not retried (the EXEC may have run) but propagates.
        """
        deadline = time.monotonic() + self._timeout
        while True:
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    return body(pipe)
                except WatchError as exc:
                    if isinstance(exc.__context__, (*_UNAVAILABLE, OSError)):
                        raise
            if time.monotonic() > deadline:
                raise StoreUnavailable("redis: too much contention on one session")
            time.sleep(random.uniform(0, 0.002))

    def _create_sync(
        self, owner: str, sid: str, first: tuple[Message, ...], incarnation: str
    ) -> Session:
        meta_key, messages_key = self._meta_key(sid), self._messages_key(sid)
        owner_key = self._owner_key(owner)
        size = content_bytes(first)
        limits = self._limits
        if limits.max_session_bytes is not None and size > limits.max_session_bytes:
            raise SessionFull(sid, limits.max_session_bytes)

        def body(pipe: Pipeline) -> Session:
            pipe.watch(meta_key, owner_key)  # type: ignore[no-untyped-call]
            if pipe.exists(meta_key):
                raise SessionExists(sid)
            now = time.time()
            cap = limits.max_sessions_per_owner
            # Live ids only (score = expiry); deleted ones left the zset with their hash.
            if cap is not None and int(pipe.zcount(owner_key, f"({now}", "+inf")) >= cap:
                raise TooManySessions(cap)
            pipe.multi()
            pipe.delete(messages_key)  # leftovers if the hash expired a moment earlier
            pipe.hset(meta_key, mapping={"owner": owner, "created_at": now, "updated_at": now,
                                         "incarnation": incarnation, "bytes": size})
            if first:
                pipe.rpush(messages_key, *(m.to_json() for m in first))
            self._queue_refresh(pipe, sid, owner, now)
            pipe.execute()
            return Session(id=sid, owner=owner, created_at=now, updated_at=now, messages=first,
                           incarnation=incarnation)

        return self._transaction(body)

    def _get_sync(self, sid: str) -> Session | None:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._meta_key(sid))
            pipe.lrange(self._messages_key(sid), 0, -1)
            meta, raw = pipe.execute()
        if not meta:
            return None
        return _session(sid, meta, raw)

    def _list_sync(self, owner: str) -> list[SessionInfo]:
        owner_key = self._owner_key(owner)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(owner_key, "-inf", time.time())
            pipe.zrange(owner_key, 0, -1)
            _, sids = pipe.execute()
        if not sids:
            return []
        with self._client.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(self._meta_key(sid))
                pipe.llen(self._messages_key(sid))
            replies = pipe.execute()
        infos = []
        for sid, meta, count in zip(sids, replies[::2], replies[1::2], strict=True):
            if meta:  # gone since the zrange (deleted, expired): skip it
                infos.append(
                    SessionInfo(
                        id=sid,
                        owner=meta["owner"],
                        created_at=float(meta["created_at"]),
                        updated_at=float(meta["updated_at"]),
                        message_count=int(count),
                    )
                )
        return sorted(infos, key=lambda info: info.updated_at, reverse=True)

    def _append_sync(
        self, sid: str, turn: tuple[Message, ...], incarnation: str | None
    ) -> Session:
        meta_key, messages_key = self._meta_key(sid), self._messages_key(sid)
        encoded = [m.to_json() for m in turn]
        asked, added = content_bytes(turn, client_only=True), content_bytes(turn)
        limit = self._limits.max_session_bytes

        def body(pipe: Pipeline) -> Session:
            pipe.watch(meta_key)  # type: ignore[no-untyped-call]
            meta = {str(k): str(v) for k, v in pipe.hgetall(meta_key).items()}
            if not meta or (incarnation is not None
                            and meta.get("incarnation", "") != incarnation):
                raise SessionNotFound(sid)
            if limit is not None and int(meta.get("bytes", 0)) + asked > limit:
                raise SessionFull(sid, limit)
            now = time.time()
            pipe.multi()
            pipe.rpush(messages_key, *encoded)
            pipe.hset(meta_key, "updated_at", now)
            pipe.hincrby(meta_key, "bytes", added)
            self._queue_refresh(pipe, sid, meta["owner"], now)
            pipe.lrange(messages_key, 0, -1)
            raw = pipe.execute()[-1]
            return _session(sid, {**meta, "updated_at": str(now)}, raw)

        return self._transaction(body)

    def _delete_sync(self, sid: str, incarnation: str | None) -> bool:
        meta_key = self._meta_key(sid)

        def body(pipe: Pipeline) -> bool:
            pipe.watch(meta_key)  # type: ignore[no-untyped-call]
            found, live = pipe.hmget(meta_key, ["owner", "incarnation"])
            if found is not None and incarnation is not None and (live or "") != incarnation:
                pipe.unwatch()  # type: ignore[no-untyped-call]
                return False  # another incarnation lives under this id now
            owner = None if found is None else str(found)
            pipe.multi()
            pipe.delete(meta_key, self._messages_key(sid))
            if owner is not None:
                pipe.zrem(self._owner_key(owner), sid)
            return owner is not None and int(pipe.execute()[0]) > 0

        return self._transaction(body)

    def _try_lock_sync(self, sid: str, incarnation: str, token: str, ttl: float) -> bool:
        px = max(1, round(ttl * 1000))
        return bool(self._client.set(self._lock_key(sid, incarnation), token, nx=True, px=px))

    def _unlock_sync(self, sid: str, incarnation: str, token: str) -> None:
        self._unlock_script(keys=[self._lock_key(sid, incarnation)], args=[token])

    def _ping_sync(self) -> bool:
        return bool(self._client.ping())

    def _close_sync(self) -> None:
        self._client.close()

    def _queue_refresh(self, pipe: Pipeline, sid: str, owner: str, now: float) -> None:
        """Queue the TTL refresh every write does: both session keys and the owner index."""
        owner_key = self._owner_key(owner)
        pipe.pexpire(self._meta_key(sid), self._ttl_ms)
        pipe.pexpire(self._messages_key(sid), self._ttl_ms)
        pipe.zadd(owner_key, {sid: now + self._ttl_ms / 1000})
        # Every session has the same TTL, so the latest write has the latest expiry.
        pipe.pexpire(owner_key, self._ttl_ms)


def _session(sid: str, meta: dict[str, Any], raw: list[str]) -> Session:
    return Session(
        id=sid,
        owner=meta["owner"],
        created_at=float(meta["created_at"]),
        updated_at=float(meta["updated_at"]),
        messages=tuple(Message.from_json(item) for item in raw),
        incarnation=meta.get("incarnation", ""),
    )

"""SQL session store: SQLAlchemy Core 2.x on a sync engine, run in trio worker threads.

Works on SQLite (a file, or `sqlite://` in memory) and PostgreSQL (psycopg 3). Each call
is one transaction in one worker thread (`ThreadedSessionStore`), never abandoned: a
cancelled call still commits or rolls back its transaction, so a write is all or
nothing.

Tables (created on first use): `sessions` (one row per session, with `message_count`,
`incarnation`, `bytes` and `expires_at`), `messages` (session_id, seq) -> message,
deleted in cascade, and `locks` ((session_id, incarnation) -> token, expires_at). Expiry
is checked on every read; expired rows are deleted lazily by `create`. Tables made by an
older version gain the new columns on first use (`_upgrade_schema`).

Limits (`StoreLimits`): the turn write checks the incarnation and the byte cap in the
UPDATE's WHERE clause (one statement, atomic); `create` counts the owner's sessions
after taking a per-owner lock (PostgreSQL: an advisory transaction lock; SQLite: the
database write lock its first DELETE takes), so two creates cannot both pass the cap.

A PostgreSQL server that stops answering (paused, or its host gone) would block a
thread in `recv` for ever: the server-side `statement_timeout` cannot fire, and TCP
acks the bytes. So every connection has TCP keepalives and `tcp_user_timeout`, and a
watchdog shuts down the socket of a call still running after `timeout_seconds`
(`_Watchdog`): the call fails as `StoreUnavailable`, its transaction is rolled back by
the server, and the pool drops the connection.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import StaticPool

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

_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
_PURGE_EVERY_SECONDS = 60.0

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("message_count", Integer, nullable=False),
    Column("incarnation", String(64), nullable=False, server_default=""),
    Column("bytes", Integer, nullable=False, server_default="0"),
    Index("ix_sessions_owner", "owner"),
    Index("ix_sessions_expires_at", "expires_at"),
)

messages = Table(
    "messages",
    metadata,
    Column(
        "session_id",
        String(128),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("role", String(16), nullable=False),
    # UTF-8 bytes, not TEXT: PostgreSQL text cannot hold NUL, and a prompt may.
    Column("content", LargeBinary, nullable=False),
    Column("finish_reason", String(16)),
    Column("model", String(255)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("created_at", Double, nullable=False),
    Column("request_id", String(255)),
)

locks = Table(
    "locks",
    metadata,
    Column("session_id", String(128), nullable=False),
    Column("incarnation", String(64), nullable=False),
    Column("token", String(255), nullable=False),
    Column("expires_at", Double, nullable=False),
    PrimaryKeyConstraint("session_id", "incarnation", name="pk_locks"),
)


class SqlSessionStore(ThreadedSessionStore):
    """Sessions in SQL tables; see the module docstring. `engine` is public for tests."""

    backend = "sql"

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float = 86_400.0,
        timeout_seconds: float = 2.0,
        pool_size: int = 8,
        limits: StoreLimits = NO_LIMITS,
    ) -> None:
        engine = _make_engine(url, timeout_seconds, pool_size)
        threads = 1 if isinstance(engine.pool, StaticPool) else pool_size
        super().__init__(timeout_seconds=timeout_seconds, max_threads=threads, limits=limits)
        self._postgres = engine.dialect.name == "postgresql"
        self._watchdog = _Watchdog(engine, timeout_seconds) if self._postgres else None
        self._ttl = check_ttl(ttl_seconds)
        self.engine = engine
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._next_purge = 0.0

    # --- threads (see ThreadedSessionStore) ---

    async def _call(self, fn: Callable[[], T]) -> T:
        call = functools.partial(self._with_schema, fn)
        if self._watchdog is not None:
            call = functools.partial(self._watchdog.run, call)
        return await super()._call(call)

    def _store_error(self, exc: Exception) -> SessionStoreError | None:
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailable(f"sql: {_short(exc)}")
        if isinstance(exc, SQLAlchemyError):
            return SessionStoreError(f"sql: {_short(exc)}")
        return None

    def _close_sync(self) -> None:
        self.engine.dispose()

    def _with_schema(self, fn: Callable[[], T]) -> T:
        """Create the tables on first use, so the server starts while the DB is down."""
        if not self._schema_ready:
            with self._schema_lock:
                if not self._schema_ready:
                    try:
                        metadata.create_all(self.engine, checkfirst=True)
                    except IntegrityError:  # another process created them meanwhile
                        metadata.create_all(self.engine, checkfirst=True)
                    _add_model_column(self.engine)
                    _upgrade_schema(self.engine)
                    self._schema_ready = True
        return fn()

    def _create_sync(
        self, owner: str, sid: str, first: tuple[Message, ...], incarnation: str
    ) -> Session:
        size = content_bytes(first)
        limits = self._limits
        if limits.max_session_bytes is not None and size > limits.max_session_bytes:
            raise SessionFull(sid, limits.max_session_bytes)
        now = time.time()
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY_SECONDS
            with self.engine.begin() as conn:
                conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
                conn.execute(delete(locks).where(locks.c.expires_at <= now))
        try:
            with self.engine.begin() as conn:
                cap = limits.max_sessions_per_owner
                if cap is not None and self._postgres:
                    # Serialize the creates of one owner (released at commit).
                    conn.execute(select(func.pg_advisory_xact_lock(_owner_lock_id(owner))))
                conn.execute(
                    delete(sessions).where(sessions.c.id == sid, sessions.c.expires_at <= now)
                )
                if cap is not None and _count_live(conn, owner, now) >= cap:
                    raise TooManySessions(cap)
                conn.execute(
                    insert(sessions).values(
                        id=sid,
                        owner=owner,
                        created_at=now,
                        updated_at=now,
                        expires_at=now + self._ttl,
                        message_count=len(first),
                        incarnation=incarnation,
                        bytes=size,
                    )
                )
                if first:
                    conn.execute(insert(messages), _rows(sid, 0, first))
        except IntegrityError:
            raise SessionExists(sid) from None
        return Session(id=sid, owner=owner, created_at=now, updated_at=now, messages=first,
                       incarnation=incarnation)

    def _get_sync(self, sid: str) -> Session | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(sessions).where(sessions.c.id == sid, sessions.c.expires_at > time.time())
            ).first()
            if row is None:
                return None
            # `seq < message_count`: the messages of the session row we read, even if a
            # turn commits between the two statements (READ COMMITTED on PostgreSQL).
            found = _messages(conn, sid, row.message_count)
        return Session(
            id=sid,
            owner=row.owner,
            created_at=row.created_at,
            updated_at=row.updated_at,
            messages=found,
            incarnation=row.incarnation,
        )

    def _list_sync(self, owner: str) -> list[SessionInfo]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(sessions)
                .where(sessions.c.owner == owner, sessions.c.expires_at > time.time())
                .order_by(sessions.c.updated_at.desc())
            ).all()
        return [
            SessionInfo(
                id=row.id,
                owner=row.owner,
                created_at=row.created_at,
                updated_at=row.updated_at,
                message_count=row.message_count,
            )
            for row in rows
        ]

    def _append_sync(
        self, sid: str, turn: tuple[Message, ...], incarnation: str | None
    ) -> Session:
        now = time.time()
        asked, added = content_bytes(turn, client_only=True), content_bytes(turn)
        limit = self._limits.max_session_bytes
        live = [sessions.c.id == sid, sessions.c.expires_at > now]
        if incarnation is not None:
            live.append(sessions.c.incarnation == incarnation)
        with self.engine.begin() as conn:
            # The UPDATE comes first: it locks the row (PostgreSQL) or takes the write
            # lock (SQLite), so concurrent turns on one session queue up here. Its WHERE
            # is the whole check (alive, this incarnation, room left): one atomic step.
            fits = [] if limit is None else [sessions.c.bytes + asked <= limit]
            row = conn.execute(
                update(sessions)
                .where(*live, *fits)
                .values(
                    updated_at=now,
                    expires_at=now + self._ttl,
                    message_count=sessions.c.message_count + len(turn),
                    bytes=sessions.c.bytes + added,
                )
                .returning(sessions.c.owner, sessions.c.created_at, sessions.c.message_count,
                           sessions.c.incarnation)
            ).first()
            if row is None:
                if fits and conn.execute(select(sessions.c.id).where(*live)).first():
                    raise SessionFull(sid, limit or 0)
                raise SessionNotFound(sid)
            conn.execute(insert(messages), _rows(sid, row.message_count - len(turn), turn))
            found = _messages(conn, sid, row.message_count)
        return Session(
            id=sid, owner=row.owner, created_at=row.created_at, updated_at=now, messages=found,
            incarnation=row.incarnation,
        )

    def _delete_sync(self, sid: str, incarnation: str | None) -> bool:
        which = [sessions.c.id == sid]
        if incarnation is not None:
            which.append(sessions.c.incarnation == incarnation)
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(sessions).where(*which).returning(sessions.c.expires_at)
            ).first()
        return result is not None and result.expires_at > time.time()

    def _try_lock_sync(self, sid: str, incarnation: str, token: str, ttl: float) -> bool:
        now = time.time()
        key = (locks.c.session_id == sid, locks.c.incarnation == incarnation)
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(locks).where(*key, locks.c.expires_at <= now))
                conn.execute(
                    insert(locks).values(session_id=sid, incarnation=incarnation, token=token,
                                         expires_at=now + ttl)
                )
        except IntegrityError:
            return False
        return True

    def _unlock_sync(self, sid: str, incarnation: str, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(locks).where(locks.c.session_id == sid,
                                             locks.c.incarnation == incarnation,
                                             locks.c.token == token))

    def _ping_sync(self) -> bool:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True


def _count_live(conn: Connection, owner: str, now: float) -> int:
    return int(conn.execute(
        select(func.count()).select_from(sessions)
        .where(sessions.c.owner == owner, sessions.c.expires_at > now)
    ).scalar_one())


def _owner_lock_id(owner: str) -> int:
    """A 63-bit key for PostgreSQL's advisory lock of one owner's creates."""
    return zlib.crc32(owner.encode("utf-8", "surrogatepass")) | (len(owner) << 32)


def _upgrade_schema(engine: Engine) -> None:
    """Bring tables made by an older version up to date: add `sessions.incarnation` and
    `sessions.bytes` (old sessions keep incarnation "" and count 0 bytes until their
    next turn), and re-create `locks` keyed by (session_id, incarnation): locks are
    short-lived, so a lock held across the upgrade is the only thing lost."""
    found = inspect(engine)
    columns = {c["name"] for c in found.get_columns("sessions")}
    with engine.begin() as conn:
        if "incarnation" not in columns:
            conn.execute(text(
                "ALTER TABLE sessions ADD COLUMN incarnation VARCHAR(64) NOT NULL DEFAULT ''"
            ))
        if "bytes" not in columns:
            conn.execute(text("ALTER TABLE sessions ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0"))
    if "incarnation" not in {c["name"] for c in found.get_columns("locks")}:
        locks.drop(engine)
        locks.create(engine)


def _rows(sid: str, start: int, turn: Sequence[Message]) -> list[dict[str, Any]]:
    return [
        {
            "session_id": sid,
            "seq": start + i,
            "role": m.role,
            "content": m.content.encode("utf-8", "surrogatepass"),
            "finish_reason": m.finish_reason,
            "model": m.model,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "created_at": m.created_at,
            "request_id": m.request_id,
        }
        for i, m in enumerate(turn)
    ]


def _messages(conn: Connection, sid: str, count: int) -> tuple[Message, ...]:
    rows = conn.execute(
        select(messages)
        .where(messages.c.session_id == sid, messages.c.seq < count)
        .order_by(messages.c.seq)
    ).all()
    return tuple(
        Message(
            role=row.role,
            content=bytes(row.content).decode("utf-8", "surrogatepass"),
            finish_reason=row.finish_reason,
            model=row.model,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            created_at=row.created_at,
            request_id=row.request_id,
        )
        for row in rows
    )


def _add_model_column(engine: Engine) -> None:
    """A database made before messages had a `model` column gets it (nullable)."""
    if "model" in {c["name"] for c in inspect(engine).get_columns("messages")}:
        return
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN model VARCHAR(255)")


def _make_engine(url: str, timeout_seconds: float, pool_size: int) -> Engine:
    """An engine whose every wait (connect, lock, statement, pool) is bounded."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")
        engine = create_engine(
            parsed,
            connect_args={"timeout": timeout_seconds, "check_same_thread": False},
            **(
                {"poolclass": StaticPool}
                if in_memory
                else {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": timeout_seconds}
            ),
        )
        _sqlite_transactions(engine, wal=not in_memory)
        return engine
    if parsed.get_backend_name() == "postgresql":
        ms = max(1, round(timeout_seconds * 1000))
        # No `pool_pre_ping`: `_Watchdog` pings on checkout itself, under its deadline.
        return create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=timeout_seconds,
            connect_args={
                "connect_timeout": max(2, math.ceil(timeout_seconds)),
                "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
                # A peer that vanishes (host down, partition): the kernel gives up.
                "keepalives": 1,
                "keepalives_idle": max(1, math.ceil(timeout_seconds)),
                "keepalives_interval": 1,
                "keepalives_count": 3,
                "tcp_user_timeout": ms,
            },
        )
    return create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout_seconds,
        pool_pre_ping=True,
    )


class _Watchdog:
    """Bound every PostgreSQL call by `timeout_seconds`, even against a server that
    holds its connections open and never answers (SIGSTOP, a hung host whose kernel
    still acks): TCP keepalives cannot see that, and libpq has no read timeout.

    `run` arms a timer per call; the pool's checkout event records which connection
    the calling thread uses (then pings it, which is why the engine has no
    `pool_pre_ping`). When the timer fires first, the connection's socket is shut down:
    the blocked read returns at once, the call raises a disconnect error (the store's
    `StoreUnavailable`) and the pool throws the connection away.
    """

    def __init__(self, engine: Engine, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds
        self._lock = threading.Lock()
        self._calls: dict[int, object] = {}  # thread -> the call it runs
        self._in_use: dict[int, Any] = {}  # thread -> its checked-out DBAPI connection
        self.fired = 0  # calls cut short (for tests and logs)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)

    def run(self, fn: Callable[[], T]) -> T:
        me, call = threading.get_ident(), object()
        with self._lock:
            self._calls[me] = call
        timer = threading.Timer(self._timeout, self._expire, (me, call))
        timer.daemon = True
        timer.start()
        try:
            return fn()
        finally:
            timer.cancel()
            with self._lock:
                self._calls.pop(me, None)

    def _on_checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        with self._lock:
            self._in_use[threading.get_ident()] = dbapi_connection
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()
        except Exception as exc:  # dead connection: the pool retries with a new one
            raise DisconnectionError(str(exc)) from exc

    def _on_checkin(self, _dbapi_connection: Any, _record: Any) -> None:
        with self._lock:
            self._in_use.pop(threading.get_ident(), None)

    def _expire(self, thread: int, call: object) -> None:
        with self._lock:
            if self._calls.get(thread) is not call:
                return  # that call ended meanwhile
            connection = self._in_use.get(thread)
        if connection is None:
            return
        self.fired += 1
        try:
            fd = connection.fileno()
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception:  # closed meanwhile (fileno raises): nothing left to cut
            return


def _sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    """Real transactions on pysqlite: turn off its implicit BEGIN, emit our own.

    Also turns on foreign keys (for the cascade) and WAL for files (readers do not block
    the writer).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")


def _short(exc: SQLAlchemyError) -> str:
    """The driver's message without SQLAlchemy's statement dump and help link."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip().splitlines()[0]

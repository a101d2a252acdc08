"""Conversation sessions: one async `SessionStore` protocol, memory/Redis/SQL backends.

`create_store(settings)` picks the backend; the Redis and SQL stores are imported from
their own modules (`redis_store`, `sql`) so a memory-only server never loads them.
"""

from .base import (
    LimitReached,
    SessionExists,
    SessionFull,
    SessionNotFound,
    SessionStore,
    SessionStoreError,
    StoreFull,
    StoreLimits,
    StoreUnavailable,
    TooManySessions,
    content_bytes,
)
from .factory import create_store
from .memory import MemorySessionStore
from .models import Message, Session, SessionInfo

__all__ = [
    "LimitReached",
    "MemorySessionStore",
    "Message",
    "Session",
    "SessionExists",
    "SessionFull",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "SessionStoreError",
    "StoreFull",
    "StoreLimits",
    "StoreUnavailable",
    "TooManySessions",
    "content_bytes",
    "create_store",
]

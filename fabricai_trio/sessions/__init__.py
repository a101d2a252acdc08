"""Conversation sessions: one async `SessionStore` protocol, memory/Redis/SQL backends.

`create_store(settings)` picks the backend; the Redis and SQL stores are imported from
their own modules (`redis_store`, `sql`) so a memory-only server never loads them.
"""

from .base import (
    SessionExists,
    SessionNotFound,
    SessionStore,
    SessionStoreError,
    StoreUnavailable,
)
from .factory import create_store
from .memory import MemorySessionStore
from .models import Message, Session, SessionInfo

__all__ = [
    "MemorySessionStore",
    "Message",
    "Session",
    "SessionExists",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "SessionStoreError",
    "StoreUnavailable",
    "create_store",
]

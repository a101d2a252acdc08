"""Build the configured session store from `Settings` (the only place that branches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import SessionStore, StoreLimits
from .memory import MemorySessionStore

if TYPE_CHECKING:
    from ..settings import Settings


def create_store(settings: Settings) -> SessionStore:
    """The store named by `settings.resolved_session_store`; no I/O happens here.

    Redis and SQL connect on first use (and again after an outage), so the server can
    start while its store is down and report it in `/v1/status`.
    """
    backend = settings.resolved_session_store
    ttl = float(settings.session_ttl_seconds)
    timeout = settings.store_timeout_seconds
    limits = StoreLimits(
        max_sessions_per_owner=settings.session_max_per_owner,
        max_session_bytes=settings.session_max_bytes,
    )
    if backend == "memory":
        return MemorySessionStore(
            ttl_seconds=ttl,
            limits=StoreLimits(
                max_sessions_per_owner=limits.max_sessions_per_owner,
                max_session_bytes=limits.max_session_bytes,
                max_total_bytes=settings.memory_store_max_bytes,
            ),
        )
    if backend == "redis":
        from .redis_store import RedisSessionStore

        if not settings.redis_url:
            raise ValueError("REDIS_URL is required when SESSION_STORE=redis")
        return RedisSessionStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            ttl_seconds=ttl,
            timeout_seconds=timeout,
            limits=limits,
        )
    if backend == "sql":
        from .sql import SqlSessionStore

        if not settings.database_url:
            raise ValueError("DATABASE_URL is required when SESSION_STORE=sql")
        return SqlSessionStore(
            settings.database_url, ttl_seconds=ttl, timeout_seconds=timeout, limits=limits
        )
    raise ValueError(f"unknown session store {backend!r}")

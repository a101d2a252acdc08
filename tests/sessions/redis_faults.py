"""Fault injection for redis-py: lose the connection in the middle of a MULTI/EXEC."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


@contextmanager
def cut_transactions() -> Iterator[None]:
    """While active, a transaction that appends (MULTI ... RPUSH ... EXEC) reaches Redis
    only half-sent, then the connection drops: Redis must discard the queued commands."""
    real = AbstractConnection.send_packed_command

    def half_sent(self: Any, command: Any, check_health: bool = True) -> None:
        data = command.encode() if isinstance(command, str) else b"".join(command)
        if b"MULTI" in data and b"RPUSH" in data and b"EXEC" in data:
            self._sock.sendall(data[: len(data) // 2])
            self.disconnect()
            raise RedisConnectionError("injected: connection lost mid-transaction")
        real(self, command, check_health)  # type: ignore[no-untyped-call]

    AbstractConnection.send_packed_command = half_sent  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbstractConnection.send_packed_command = real  # type: ignore[method-assign]

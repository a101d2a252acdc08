"""Spawning helpers: every task has a parent nursery, lets `Cancelled` through, logs the rest.

A handler that crashes must not take its siblings (or the session) down with it, and a
cancellation must never be swallowed; this is hypercorn's `trio/task_group.py` habit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import ClientGone

logger = logging.getLogger("fabricai_trio.realtime")


async def run_logged(fn: Callable[..., Awaitable[Any]], *args: Any, what: str = "task") -> None:
    """Await `fn(*args)`; log an exception instead of raising it.

    Cancellation propagates unchanged (also out of an exception group that mixes
    `Cancelled` with errors: the errors are logged, the `Cancelled` re-raised). A
    handler that finds its client gone (`ClientGone`: it disconnected while the handler
    ran) ends quietly: that is a client leaving, not a failure.
    """
    try:
        await fn(*args)
    except ClientGone as exc:
        logger.debug("%s ended: %s", what, exc)
    except Exception:
        logger.exception("%s failed", what)
    except BaseExceptionGroup as group:
        cancelled, others = group.split(trio.Cancelled)
        if others is not None:
            logger.error("%s failed", what, exc_info=others)
        if cancelled is not None:
            raise cancelled from None
        raise


def spawn_logged(
    nursery: trio.Nursery, fn: Callable[..., Awaitable[Any]], *args: Any, what: str = "task"
) -> None:
    """Start `fn(*args)` in `nursery` under `run_logged`."""
    nursery.start_soon(_logged, fn, args, what, name=what)


async def _logged(fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], what: str) -> None:
    await run_logged(fn, *args, what=what)


class Signal:
    """A re-armable broadcast wakeup: `fire()` wakes every current `wait()`er.

    Waiters re-check their condition after waking, so a spurious wakeup is harmless and
    a `fire()` with nobody waiting is simply lost (the condition is state, not the event).
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Block until the next `fire()`. Cancellation leaves nothing behind."""
        await self._event.wait()

"""Streaming HTTP responses (SSE, OpenAI) decoupled from their sockets.

A stream's frames are produced by a task of the request (`outbox.pump`, in the request
nursery the composition layer puts in the scope) into a small bounded `Outbox`; the
response body only writes what is there. A client that stops reading therefore cannot
pace its generation: once its oldest frame has waited SLOW_CLIENT_TIMEOUT_SECONDS the
generation is cancelled with the cause `slow_client` (the turn is stored, the slot
freed), and the server's write deadline closes the connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Any, cast

import trio
from quart import request

from ..core.events import CancelCause
from ..generation import Generation
from ..outbox import Outbox, pump
from .state import state

log = logging.getLogger(__name__)

#: The scope key of the request's nursery (opened by `app.FabricApp` for each request).
REQUEST_NURSERY_KEY = "fabricai.nursery"


def buffered(generation: Generation, frames: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """Start producing `frames` (a generation's framed events) into an outbox in the
    current request's nursery; returns the response body that writes them."""
    settings = state().settings
    outbox = Outbox[bytes](
        max_bytes=settings.stream_buffer_bytes, timeout=settings.slow_client_timeout_seconds
    )

    def cut_cause() -> CancelCause:
        return "slow_client" if outbox.slow or outbox.overdue() else "disconnect"

    def on_slow() -> None:
        log.info("request %s: the client took nothing for %.1f s: cancelled (slow_client)",
                 generation.request_id, outbox.timeout)
        generation.cancel("slow_client")

    generation.cut_cause = cut_cause
    generation.on_cancel = outbox.release  # a cancel (shutdown, explicit) is not held up
    nursery: trio.Nursery = cast(dict[str, Any], request.scope)[REQUEST_NURSERY_KEY]
    nursery.start_soon(partial(
        pump, frames, outbox, on_slow=on_slow,
        finished=lambda: generation.finish_reason is not None,
    ))
    return outbox.frames()

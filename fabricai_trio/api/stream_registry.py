"""The running SSE streams, by (owner, request_id), so that a second HTTP request can
cancel one (`POST /v1/inference_sse/{request_id}/cancel`).

Socket.IO cancels through the client's own connection; an SSE stream has no way back
from the client, so the cancel arrives on another connection and finds the stream here.
The key holds the owner: one identity can never cancel (or probe for) another's
stream. An owner that runs two streams with the same `request_id` cancels both.

The SSE body is an async generator, and an async generator must not `yield` inside a
cancel scope (the scope would then cover whatever its consumer does between two
frames). So the body runs each *step* of `Generation.events()` in a fresh scope from
`StreamHandle.step()`, and `cancel()` cancels the step in progress and every later one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..generation import Generation

Key = tuple[str, str]  # (owner, request_id)


class StreamHandle:
    """One registered stream; its body asks it for a cancel scope per step."""

    def __init__(self, registry: StreamRegistry, generation: Generation) -> None:
        self.registry = registry
        self.generation = generation
        self.key: Key = (generation.owner, generation.request_id)
        self.cancelled = False
        self._scope: trio.CancelScope | None = None

    @contextmanager
    def step(self) -> Iterator[trio.CancelScope]:
        """A scope for one step of the stream, already cancelled if `cancel()` ran.

        Check `scope.cancelled_caught` afterwards: the step was cut by the cancel."""
        scope = trio.CancelScope()
        if self.cancelled:
            scope.cancel()
        self._scope = scope
        try:
            with scope:
                yield scope
        finally:
            self._scope = None

    def cancel(self) -> None:
        """Stop the stream at its next checkpoint (while queued, or between two tokens)."""
        self.cancelled = True
        self.generation.cancel_cause = "cancel"
        if self._scope is not None:
            self._scope.cancel()

    def unregister(self) -> None:
        """Idempotent; from now on a cancel for this stream is a 404."""
        self.registry.discard(self)

    async def aclose(self) -> None:
        """`unregister()` as a per-request cleanup (`scope["fabricai.cleanups"]`)."""
        self.unregister()
        await trio.lowlevel.checkpoint()


class StreamRegistry:
    """The streams of one app; synchronous, so a lookup and a cancel cannot interleave."""

    def __init__(self) -> None:
        self._streams: dict[Key, list[StreamHandle]] = {}

    def register(self, generation: Generation) -> StreamHandle:
        handle = StreamHandle(self, generation)
        self._streams.setdefault(handle.key, []).append(handle)
        return handle

    def discard(self, handle: StreamHandle) -> None:
        handles = self._streams.get(handle.key)
        if handles is None or handle not in handles:
            return
        handles.remove(handle)
        if not handles:
            del self._streams[handle.key]

    def cancel(self, owner: str, request_id: str) -> bool:
        """Cancel the owner's running streams with this id; False if there is none."""
        handles = self._streams.get((owner, request_id), [])
        for handle in handles:
            handle.cancel()
        return bool(handles)

    def __len__(self) -> int:
        return sum(len(handles) for handles in self._streams.values())

"""Server-sent events framing: the one place that writes SSE bytes."""

from __future__ import annotations

import json
from typing import Any

KEEPALIVE = b": keepalive\n\n"


def encode_event(event: str | None, data: Any, *, event_id: str | int | None = None) -> bytes:
    """One SSE event; `data` is JSON-encoded on a single line (or sent as-is if a str)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in payload.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

"""Stream positions and SSE event ids.

Every event of a generation has a position: `queued` is 0, the token with index `i` is
`i + 1`, and the final `complete` or `error` comes right after the last token. An SSE
event's id is `<request_id>:<position>`, so a reconnect's `Last-Event-ID` names both
the stream and where to continue.
"""

from __future__ import annotations

from .events import CompleteEvent, ErrorEvent, StreamEvent
from .ids import is_request_id


def event_id(request_id: str, position: int) -> str:
    return f"{request_id}:{position}"


def parse_event_id(value: str) -> tuple[str, int] | None:
    """`(request_id, position)` of an event id, or None if it is not one of ours."""
    request_id, colon, position = value.strip().rpartition(":")
    if not colon or not is_request_id(request_id) or not position.isdigit():
        return None
    if len(position) > 9:
        return None
    return request_id, int(position)


def is_final(event: StreamEvent) -> bool:
    return isinstance(event, CompleteEvent | ErrorEvent)

"""A small SSE reader for tests (the server's framing is checked, not reused)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class SSEEvent:
    event: str | None
    data: Any
    id: str | None
    comment: str | None = None


def _first(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None


def parse_lines(lines: Iterator[str]) -> Iterator[SSEEvent]:
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line == "":
            if fields:
                data = "\n".join(fields.get("data", []))
                yield SSEEvent(
                    event=_first(fields, "event"),
                    data=json.loads(data) if data else None,
                    id=_first(fields, "id"),
                )
                fields = {}
            continue
        if line.startswith(":"):
            yield SSEEvent(event=None, data=None, id=None, comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


async def aparse(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    buffer: list[str] = []
    async for line in lines:
        buffer.append(line)
        if line == "" or line.startswith(":"):
            for event in parse_lines(iter(buffer)):
                yield event
            buffer = []

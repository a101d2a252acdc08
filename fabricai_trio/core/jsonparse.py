"""The one JSON parser for what clients send (HTTP bodies, Socket.IO packets).

`json.loads` alone lets a client spend the server's stack and CPU: a body of 100,000
`[` raises `RecursionError` (a 500 with a traceback, and it ended a Socket.IO session's
reader task), and a 5,000-digit integer raises a bare `ValueError`. `loads()` bounds
both, and every failure is a `JsonRejected` (a `ValueError`) whose message names the
problem, for the transport to answer with a 400 or a Socket.IO error event.
"""

from __future__ import annotations

import json
from typing import Any, Final

#: Deepest nesting of arrays and objects accepted (a chat request needs 3).
MAX_JSON_DEPTH: Final = 32
#: Most digits of an integer literal (an int64 has 19).
MAX_INT_DIGITS: Final = 32


class JsonRejected(ValueError):
    """Not JSON, or JSON beyond the bounds above; the message says which."""


class JsonTooComplex(JsonRejected):
    """Well-formed so far, but beyond the bounds above (depth, integer size)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonTooComplex(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON value")


def check_depth(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise `JsonRejected` if arrays/objects nest deeper than `max_depth` (iterative:
    it uses no stack whatever the value)."""
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            raise JsonTooComplex(f"arrays and objects nest deeper than {max_depth} levels")
        todo.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def loads(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse client JSON within the bounds above; `JsonRejected` otherwise."""
    try:
        value = json.loads(data, parse_int=_parse_int, parse_constant=_parse_constant)
    except JsonRejected:
        raise
    except RecursionError:
        raise JsonTooComplex(f"arrays and objects nest deeper than {max_depth} levels"
                             ) from None
    except UnicodeDecodeError as exc:
        raise JsonRejected(f"not UTF-8: {exc.reason}") from None
    except ValueError as exc:  # JSONDecodeError, and int() of an odd literal
        raise JsonRejected(str(exc)) from None
    check_depth(value, max_depth)
    return value

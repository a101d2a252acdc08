"""Identifier shapes every layer agrees on (request ids, session ids)."""

from __future__ import annotations

import re
import uuid

#: A request id: from a client (`request_id`, `X-Request-Id`) or made by `new_request_id`.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
#: A session id: the one shape every route, transport and store accepts (no `:` or `.`,
#: so an id can never name another key of a store, like Redis's `session:<id>:messages`).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_request_id(value: str) -> bool:
    return REQUEST_ID_RE.match(value) is not None


def is_session_id(value: object) -> bool:
    """True for a well-formed session id; a malformed one names no session (a 404)."""
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None

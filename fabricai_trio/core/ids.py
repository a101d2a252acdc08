"""Identifier shapes every layer agrees on (request ids, session ids)."""

from __future__ import annotations

import re
import uuid

#: A request id: from a client (`request_id`, `X-Request-Id`) or made by `new_request_id`.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
#: A session id a client may name (a subset of what the stores accept).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_request_id(value: str) -> bool:
    return REQUEST_ID_RE.match(value) is not None

"""The `Host` allowlist (ALLOWED_HOSTS), for HTTP and websocket requests alike.

Without it, a page on any site can rebind its own DNS name to 127.0.0.1 and then talk
to a server without authentication as if it were same-origin (DNS rebinding): the
browser still sends the attacker's name as `Host`. So with authentication off, only
loopback names are served unless ALLOWED_HOSTS says otherwise; with it on, any `Host`
(a rebound page has no key). The probes (`/livez`, `/readyz`, `/health`) answer any
`Host`: orchestrators call them by IP, and they hold nothing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..core.errors import HostNotAllowed, http_error
from ..settings import Settings, is_loopback

PROBE_PATHS = frozenset({"/livez", "/readyz", "/health"})


def host_name(header: str) -> str:
    """The host of a `Host` header, without its port, lower-cased (`[::1]:80` → `::1`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") > 1:  # a bare IPv6 address (not valid in Host, but harmless)
        return header
    return header.partition(":")[0].rstrip(".")


class HostAllowlist:
    """Which `Host` names are served; `None` patterns: loopback names only."""

    #: `Host` values whose answer is remembered (every request asks; parsing an address
    #: each time was a few percent of a small request's CPU). Past it, nothing is added.
    MEMO_SIZE = 256

    def __init__(self, patterns: Iterable[str] | None) -> None:
        self.patterns = None if patterns is None else [p.lower() for p in patterns]
        self.any = self.patterns is not None and "*" in self.patterns
        self._memo: dict[str, bool] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, auth_enabled: bool) -> HostAllowlist:
        patterns = settings.allowed_host_patterns
        if patterns:
            return cls(patterns)
        return cls(["*"] if auth_enabled else None)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        known = self._memo.get(header)
        if known is not None:
            return known
        allowed = self._allows(header)
        if len(self._memo) < self.MEMO_SIZE:
            self._memo[header] = allowed
        return allowed

    def _allows(self, header: str) -> bool:
        name = host_name(header)
        if self.patterns is None:
            return is_loopback(name)
        for pattern in self.patterns:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]):
                    return True
            elif name == host_name(pattern):
                return True
        return False

    def allows_scope(self, scope: dict[str, Any]) -> bool:
        """Whether an ASGI http/websocket scope may be served."""
        if self.any or scope.get("path") in PROBE_PATHS:
            return True
        for key, value in scope.get("headers", ()):
            if bytes(key).lower() == b"host":
                return self.allows(bytes(value).decode("latin-1"))
        return False


async def refuse(scope: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]
                 ) -> None:
    """Answer a request whose `Host` is not allowed: the table's `host_not_allowed`
    for HTTP; a websocket is closed before it is accepted (the server answers 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    rendered = http_error(HostNotAllowed())
    body = json.dumps(rendered.body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in rendered.headers.items())]
    await send({"type": "http.response.start", "status": rendered.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

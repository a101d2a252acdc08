"""The HTTP side of authentication: who the current request acts as.

`install()` authenticates every request in a `before_request` hook, so a 401 never
reaches a route; routes read the result with `current_identity()`. The checks
themselves are `auth.Authenticator`'s, shared with Socket.IO's CONNECT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

from quart import Quart, request

from ..auth import ANONYMOUS_IDENTITY, Authenticator, Identity, is_loopback
from ..settings import Settings

log = logging.getLogger("fabricai_trio.auth")

IDENTITY_SCOPE_KEY = "fabricai.identity"


def current_identity() -> Identity:
    """The identity the auth hook stored for the current request."""
    identity = request.scope.get(IDENTITY_SCOPE_KEY)
    return identity if isinstance(identity, Identity) else ANONYMOUS_IDENTITY


def install(
    app: Quart,
    authenticator: Authenticator,
    settings: Settings,
    *,
    public_paths: Iterable[str] = (),
    public_prefixes: tuple[str, ...] = (),
) -> None:
    """Authenticate every request before its route runs (a 401 never reaches a route).

    `public_paths` (exact) and `public_prefixes` need no credentials, like `/health`:
    the playground page and its files, which a browser loads without a bearer token."""
    if not authenticator.enabled and not is_loopback(settings.host):
        log.warning(
            "AUTH_MODE=off and HOST=%s is not a loopback address: anyone who can reach the "
            "server can use it", settings.host,
        )
    open_paths = {"/health", "/livez", "/readyz", *public_paths}
    if not settings.metrics_require_auth:
        open_paths.add("/metrics")

    @app.before_request
    async def _authenticate() -> None:
        if request.path in open_paths or request.path.startswith(public_prefixes):
            return
        scope = cast(dict[str, Any], request.scope)
        client = scope.get("client")
        scope[IDENTITY_SCOPE_KEY] = authenticator.authenticate(
            dict(request.headers.items()), client=client[0] if client else None
        )

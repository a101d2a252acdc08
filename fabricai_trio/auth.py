"""Authentication: API keys and JWTs, who a request acts as (its owner), and a
throttle on failed attempts.

With AUTH_MODE=auto and none of `API_KEYS`, `API_KEYS_FILE`, `JWT_SECRET`,
`JWT_PUBLIC_KEY` set, everyone is `anonymous` (settings allow that on a loopback HOST
only; AUTH_MODE=off allows it anywhere). With any of them set, every HTTP route needs
`Authorization: Bearer <key or JWT>` or `X-Api-Key: <key>`, except the probes, the
playground page and its files (`/`, `/playground/…`: they hold no data, and a browser
cannot send a bearer token with a page load), and `/metrics` when
`METRICS_REQUIRE_AUTH=false`.

Owner ids are namespaced by kind, so no credential of one kind can name another's:
an API key is `key:<HMAC-SHA256(OWNER_ID_SECRET, key), 32 hex>` (secret: without the
server's secret nobody can tell which key it is, or test a guess offline), a JWT is
`jwt:<iss, percent-encoded>:<sub>`. Logs carry `Identity.tag`, a short non-reversible
tag of the owner id, never the id. `Authenticator.authenticate()` takes plain headers and
`authenticate_payload()` a Socket.IO CONNECT `auth` object, so every transport
authenticates the same way; both take the client's address for `AuthThrottle`.

An identity may carry a priority class (docs/fairness.md): an API key's from
API_KEYS_FILE (`priority=<class>`), a JWT's from the claim JWT_PRIORITY_CLAIM when it
names one of PRIORITY_CLASSES; otherwise None, the default class.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import jwt

from .core.errors import AuthThrottled, Unauthenticated
from .sessions.base import MAX_OWNER_LENGTH
from .settings import Settings, is_loopback

ANONYMOUS = "anonymous"
#: Hex digits of the HMAC kept in a key's owner id (128 bits).
KEY_ID_HEX = 32

__all__ = ["ANONYMOUS", "AuthThrottle", "Authenticator", "Identity", "is_loopback",
           "jwt_owner", "key_owner", "owner_tag"]


def owner_tag(owner: str) -> str:
    """What logs say instead of an owner id: its kind and 8 hex digits of its SHA-256
    (enough to follow one client through a log, useless to act as it)."""
    if owner == ANONYMOUS:
        return ANONYMOUS
    kind = owner.split(":", 1)[0]
    return f"{kind}:{hashlib.sha256(owner.encode()).hexdigest()[:8]}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request acts as; `owner` is what sessions are stored under."""

    owner: str
    kind: Literal["anonymous", "api_key", "jwt"]
    #: Its priority class, one of PRIORITY_CLASSES; None: the default class.
    priority_class: str | None = None

    @property
    def tag(self) -> str:
        """The owner as logs show it (`owner_tag`)."""
        return owner_tag(self.owner)


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, "anonymous")


def key_owner(key: str, secret: bytes) -> str:
    """The owner id of an API key: stable for one `secret`, and secret itself."""
    digest = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
    return "key:" + digest[:KEY_ID_HEX]


def jwt_owner(issuer: str | None, subject: str) -> str:
    """`jwt:<issuer>:<subject>`; the issuer is percent-encoded (no `:` in it), so the
    first `:` after it ends it and two (issuer, subject) pairs never share an id."""
    return f"jwt:{quote(issuer or '', safe='')}:{subject}"


def unauthorized(code: str, message: str, *, invalid: bool) -> Unauthenticated:
    return Unauthenticated(message, code=code, invalid_token=invalid)


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None without one);
    `Unauthenticated` (`invalid_authorization`) for any other scheme or an empty token."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized(
            "invalid_authorization",
            "the Authorization header must be `Bearer <API key or token>`",
            invalid=True,
        )
    return value.strip()


def _credential(token: str | None, api_key: str | None) -> str:
    """The credential to check: the bearer token, else the API key ("" if neither)."""
    return (token or api_key or "").strip()


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


@dataclass
class AuthThrottle:
    """Failed authentications per client address, as a leaky bucket: each failure adds
    one, the level drains at `limit / window_seconds` per second, and an address at
    `limit` is refused (`AuthThrottled`) until one more would fit again (so at most about
    `limit` failures per `window_seconds` are checked). At most `max_clients`
    addresses are tracked (the least recently failing one is forgotten first), so memory
    is bounded whatever the addresses. `clock` is passed in for tests."""

    limit: int
    window_seconds: float
    max_clients: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def _level(self, client: str, now: float) -> float:
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        rate = self.limit / self.window_seconds
        return max(0.0, bucket.level - (now - bucket.at) * rate)

    def check(self, client: str | None) -> None:
        """Refuse `client` if it failed too often (before its credentials are checked)."""
        if not self.limit or client is None:
            return
        now = self.clock()
        level = self._level(client, now)
        if level + 1 > self.limit:  # one more failure would exceed the limit
            wait = (level + 1 - self.limit) * self.window_seconds / self.limit
            raise AuthThrottled(retry_after=max(1, int(wait + 0.999)))

    def failed(self, client: str | None) -> None:
        """Count one failed authentication of `client`."""
        if not self.limit or client is None:
            return
        now = self.clock()
        level = self._level(client, now) + 1
        self._buckets[client] = _Bucket(level, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class Authenticator:
    """Checks credentials against the configured keys and JWT settings."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        owner_secret: bytes | None = None,
        jwt_key: str | None = None,
        jwt_algorithm: Literal["HS256", "RS256"] = "HS256",
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
        jwt_require_exp: bool = True,
        jwt_leeway_seconds: float = 0.0,
        throttle: AuthThrottle | None = None,
        key_classes: Mapping[str, str] | None = None,
        jwt_priority_claim: str | None = None,
        priority_classes: Collection[str] = (),
    ) -> None:
        # Keys are kept as SHA-256 digests (the lookup never compares secrets), each with
        # its identity (owner id and priority class), computed once here.
        secret = owner_secret if owner_secret is not None else secrets.token_bytes(32)
        classes = key_classes or {}
        self._keys = {
            hashlib.sha256(k.encode()).digest(): Identity(key_owner(k, secret), "api_key",
                                                          classes.get(k))
            for k in api_keys if k
        }
        self._jwt_priority_claim = jwt_priority_claim
        self._priority_classes = frozenset(priority_classes)
        self._jwt_key = jwt_key
        self._jwt_algorithm = jwt_algorithm
        self._jwt_audience = jwt_audience
        self._jwt_issuer = jwt_issuer
        self._jwt_require = ["sub", "exp"] if jwt_require_exp else ["sub"]
        self._jwt_leeway = jwt_leeway_seconds
        self.throttle = (throttle if throttle is not None
                         else AuthThrottle(limit=0, window_seconds=1.0))

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Settings have been checked (settings.py fails closed on empty credentials)."""
        jwt_key: str | None = None
        algorithm: Literal["HS256", "RS256"] = "HS256"
        if settings.jwt_secret is not None:
            jwt_key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key:
            algorithm = "RS256"
            jwt_key = settings.jwt_public_key
            if not jwt_key.lstrip().startswith("-----BEGIN"):
                jwt_key = Path(jwt_key).read_text()
        owner_secret = settings.owner_id_secret
        return cls(
            api_keys=settings.configured_api_keys(),
            key_classes=settings.file_api_key_classes(),
            jwt_priority_claim=settings.jwt_priority_claim,
            priority_classes=settings.priority_class_names,
            owner_secret=owner_secret.get_secret_value().encode() if owner_secret else None,
            jwt_key=jwt_key,
            jwt_algorithm=algorithm,
            jwt_audience=settings.jwt_audience,
            jwt_issuer=settings.jwt_issuer,
            jwt_require_exp=settings.jwt_require_exp,
            jwt_leeway_seconds=settings.jwt_leeway_seconds,
            throttle=AuthThrottle(limit=settings.auth_failure_limit,
                                  window_seconds=settings.auth_failure_window_seconds),
        )

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._jwt_key is not None

    def authenticate(self, headers: Mapping[str, str], *, client: str | None = None
                     ) -> Identity:
        """The identity behind `Authorization: Bearer …` or `X-Api-Key`; `Unauthenticated`
        if credentials are missing or wrong (anonymous when auth is off), `AuthThrottled`
        if `client` (its address) failed too often lately."""
        lowered = {name.lower(): value for name, value in headers.items()}
        token: str | None = None
        if self.enabled:
            try:
                token = _bearer(lowered.get("authorization"))
            except Unauthenticated:
                self.throttle.check(client)
                self.throttle.failed(client)
                raise
        return self.authenticate_credentials(
            token=token, api_key=lowered.get("x-api-key"), client=client
        )

    def identify(self, headers: Mapping[str, str], *, client: str | None = None
                 ) -> Identity | None:
        """The identity `authenticate()` would return for these headers now, or None
        where it would raise. Unlike it, no failed attempt is counted (nothing changes):
        a caller that gets None hands the request to `authenticate()`, which refuses it
        and counts the failure once. For the HTTP fast path (api/refusals.py)."""
        if not self.enabled:
            return ANONYMOUS_IDENTITY
        lowered = {name.lower(): value for name, value in headers.items()}
        try:
            credential = _credential(_bearer(lowered.get("authorization")),
                                     lowered.get("x-api-key"))
            if not credential:
                return None
            self.throttle.check(client)
            return self._check(credential)
        except (Unauthenticated, AuthThrottled):
            return None

    def authenticate_payload(self, payload: Any, *, client: str | None = None) -> Identity:
        """For Socket.IO CONNECT: `{"token": …}` or `{"apiKey": …}` (either may hold a key)."""
        if not isinstance(payload, Mapping):
            payload = {}
        token, api_key = payload.get("token"), payload.get("apiKey")
        return self.authenticate_credentials(
            token=token if isinstance(token, str) else None,
            api_key=api_key if isinstance(api_key, str) else None,
            client=client,
        )

    def authenticate_credentials(
        self, *, token: str | None = None, api_key: str | None = None,
        client: str | None = None,
    ) -> Identity:
        """Check a bearer token (an API key or a JWT) or an API key. A request without
        credentials is not a failed attempt (a browser's first try); a wrong one is."""
        if not self.enabled:
            return ANONYMOUS_IDENTITY
        credential = _credential(token, api_key)
        if not credential:
            raise unauthorized(
                "missing_credentials",
                "authentication required: send `Authorization: Bearer <API key or token>` "
                "or `X-Api-Key: <key>`",
                invalid=False,
            )
        self.throttle.check(client)
        try:
            return self._check(credential)
        except Unauthenticated:
            self.throttle.failed(client)
            raise

    def _check(self, credential: str) -> Identity:
        identity = self._keys.get(hashlib.sha256(credential.encode()).digest())
        if identity is not None:
            return identity
        if self._jwt_key is not None and credential.count(".") == 2:
            return self._decode_jwt(credential)
        raise unauthorized("invalid_api_key", "the API key or token is not valid", invalid=True)

    def _decode_jwt(self, token: str) -> Identity:
        assert self._jwt_key is not None
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=[self._jwt_algorithm],
                audience=self._jwt_audience,
                issuer=self._jwt_issuer,
                leeway=self._jwt_leeway,
                options={"require": self._jwt_require},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the token has expired", invalid=True) from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized(
                "invalid_token", f"the token is not valid: {exc}", invalid=True
            ) from None
        subject, issuer = claims["sub"], claims.get("iss")
        if not isinstance(issuer, str | None):
            raise unauthorized("invalid_token", "the token's `iss` must be a string",
                               invalid=True)
        owner = jwt_owner(issuer, subject) if isinstance(subject, str) and subject else ""
        if not 0 < len(owner) <= MAX_OWNER_LENGTH:
            raise unauthorized(
                "invalid_token",
                "the token's `sub` must be a non-empty string, and `jwt:<iss>:<sub>` at most "
                f"{MAX_OWNER_LENGTH} characters",
                invalid=True,
            )
        return Identity(owner, "jwt", self._claimed_class(claims))

    def _claimed_class(self, claims: Mapping[str, Any]) -> str | None:
        """The class JWT_PRIORITY_CLAIM names, if it is one of PRIORITY_CLASSES; else
        None (the default class: a token is not refused for it, since the identity
        provider, not this server, decides what its tokens say)."""
        if self._jwt_priority_claim is None:
            return None
        value = claims.get(self._jwt_priority_claim)
        return value if isinstance(value, str) and value in self._priority_classes else None

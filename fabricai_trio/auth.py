"""Authentication: API keys and JWTs, and who a request acts as (its owner).

With no `API_KEYS`, `API_KEYS_FILE`, `JWT_SECRET` or `JWT_PUBLIC_KEY` set, everyone is
`anonymous` (fine on loopback; we warn otherwise). With any of them set, every HTTP route
needs `Authorization: Bearer <key or JWT>` or `X-Api-Key: <key>`, except `/health`, the
playground page and its files (`/`, `/playground/…`: they hold no data, and a browser
cannot send a bearer token with a page load), and `/metrics` when
`METRICS_REQUIRE_AUTH=false`.

The owner of an API key is `key:<sha256 prefix>` (stable, not secret: it is stored with
sessions); the owner of a JWT is its `sub` claim. `Authenticator.authenticate()` takes
plain headers and `authenticate_payload()` a Socket.IO CONNECT `auth` object, so every
transport authenticates the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt

from .core.errors import Unauthenticated
from .sessions.base import MAX_OWNER_LENGTH
from .settings import ConfigError, Settings

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request acts as; `owner` is what sessions are stored under."""

    owner: str
    kind: Literal["anonymous", "api_key", "jwt"]


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, "anonymous")


def key_owner(key: str) -> str:
    """The non-secret, stable identity of an API key."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def unauthorized(code: str, message: str, *, invalid: bool) -> Unauthenticated:
    return Unauthenticated(message, code=code, invalid_token=invalid)


class Authenticator:
    """Checks credentials against the configured keys and JWT settings."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        jwt_key: str | None = None,
        jwt_algorithm: Literal["HS256", "RS256"] = "HS256",
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
    ) -> None:
        # Keys are kept hashed: the lookup compares digests, never the secrets.
        self._keys = {hashlib.sha256(k.encode()).digest() for k in api_keys if k}
        self._jwt_key = jwt_key
        self._jwt_algorithm = jwt_algorithm
        self._jwt_audience = jwt_audience
        self._jwt_issuer = jwt_issuer

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        keys = []
        if settings.api_keys is not None:
            keys += [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
        if settings.api_keys_file is not None:
            try:
                lines = settings.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"invalid setting: API_KEYS_FILE: {exc}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        jwt_key: str | None = None
        algorithm: Literal["HS256", "RS256"] = "HS256"
        if settings.jwt_secret is not None and settings.jwt_secret.get_secret_value():
            jwt_key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key:
            algorithm = "RS256"
            jwt_key = settings.jwt_public_key
            if not jwt_key.lstrip().startswith("-----BEGIN"):
                jwt_key = Path(jwt_key).read_text()
        return cls(
            api_keys=[k for k in keys if k],
            jwt_key=jwt_key,
            jwt_algorithm=algorithm,
            jwt_audience=settings.jwt_audience,
            jwt_issuer=settings.jwt_issuer,
        )

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._jwt_key is not None

    def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """The identity behind `Authorization: Bearer …` or `X-Api-Key`; `Unauthenticated`
        if credentials are missing or wrong (anonymous when auth is off)."""
        lowered = {name.lower(): value for name, value in headers.items()}
        authorization = lowered.get("authorization")
        token: str | None = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                if self.enabled:
                    raise unauthorized(
                        "invalid_authorization",
                        "the Authorization header must be `Bearer <API key or token>`",
                        invalid=True,
                    )
            else:
                token = value.strip()
        return self.authenticate_credentials(token=token, api_key=lowered.get("x-api-key"))

    def authenticate_payload(self, payload: Any) -> Identity:
        """For Socket.IO CONNECT: `{"token": …}` or `{"apiKey": …}` (either may hold a key)."""
        if not isinstance(payload, Mapping):
            payload = {}
        token, api_key = payload.get("token"), payload.get("apiKey")
        return self.authenticate_credentials(
            token=token if isinstance(token, str) else None,
            api_key=api_key if isinstance(api_key, str) else None,
        )

    def authenticate_credentials(
        self, *, token: str | None = None, api_key: str | None = None
    ) -> Identity:
        """Check a bearer token (an API key or a JWT) or an API key."""
        if not self.enabled:
            return ANONYMOUS_IDENTITY
        credential = (token or api_key or "").strip()
        if not credential:
            raise unauthorized(
                "missing_credentials",
                "authentication required: send `Authorization: Bearer <API key or token>` "
                "or `X-Api-Key: <key>`",
                invalid=False,
            )
        if hashlib.sha256(credential.encode()).digest() in self._keys:
            return Identity(key_owner(credential), "api_key")
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
                options={"require": ["sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the token has expired", invalid=True) from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized(
                "invalid_token", f"the token is not valid: {exc}", invalid=True
            ) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_OWNER_LENGTH:
            raise unauthorized(
                "invalid_token",
                f"the token's `sub` must be a string of 1 to {MAX_OWNER_LENGTH} characters",
                invalid=True,
            )
        return Identity(subject, "jwt")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

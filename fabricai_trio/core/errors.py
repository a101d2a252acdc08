"""Domain errors, and the one table that turns them into what each transport sends.

Raise sites say *what* went wrong (`SessionBusy`, `QueueFull`, `InvalidField`…) and
never choose a status. Each error class has a `kind`; `ERROR_TABLE` is the only place
where a kind becomes an HTTP status and an error `type`, and where our API and the
OpenAI-compatible routes differ (a field that fails validation is a 422 on ours, a 400
on OpenAI's, as OpenAI answers). The functions below the table render an error for
every transport from that table alone:

* `http_error()`: status, headers (`Retry-After`, `WWW-Authenticate`,
  `X-RateLimit-*`) and the JSON body
  `{"error": {"type", "code", "message", "param"}}`;
* `error_event()`: the SSE `error` event and the Socket.IO `inference_error` payload;
* `ack_error()`: the `{request_id, error}` of a Socket.IO acknowledgement;
* `connect_refusal()`: the `{message, data}` of a Socket.IO CONNECT_ERROR.

`code` is a stable string everywhere (the same in an HTTP body, an SSE event and a
Socket.IO payload); the status travels beside it as `status` where a transport has no
status line of its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import ValidationError

from .events import ErrorEvent


class ErrorKind(enum.Enum):
    """What sort of failure an error is; the table maps each kind to a status."""

    BAD_REQUEST = "bad_request"  # the body or a parameter cannot be used as sent
    INVALID_FIELD = "invalid_field"  # a field fails validation
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"  # the request names a model not served here
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    QUOTA_EXCEEDED = "quota_exceeded"  # a per-key or per-store cap on what is kept
    OVERLOADED = "overloaded"  # the queue, or the caller's share of it, is full: come back later
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"  # loading, a dependency down: come back later


@dataclass(frozen=True, slots=True)
class Presentation:
    status: int
    type: str
    openai_status: int


#: The one error table.
ERROR_TABLE: dict[ErrorKind, Presentation] = {
    ErrorKind.BAD_REQUEST: Presentation(400, "invalid_request_error", 400),
    ErrorKind.INVALID_FIELD: Presentation(422, "invalid_request_error", 400),
    ErrorKind.UNAUTHENTICATED: Presentation(401, "authentication_error", 401),
    ErrorKind.FORBIDDEN: Presentation(403, "permission_error", 403),
    ErrorKind.NOT_FOUND: Presentation(404, "not_found_error", 404),
    ErrorKind.MODEL_NOT_FOUND: Presentation(404, "invalid_request_error", 404),
    ErrorKind.METHOD_NOT_ALLOWED: Presentation(405, "invalid_request_error", 405),
    ErrorKind.CONFLICT: Presentation(409, "conflict_error", 409),
    ErrorKind.TOO_LARGE: Presentation(413, "invalid_request_error", 413),
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: Presentation(415, "invalid_request_error", 415),
    ErrorKind.QUOTA_EXCEEDED: Presentation(429, "rate_limit_error", 429),
    ErrorKind.OVERLOADED: Presentation(429, "rate_limit_error", 429),
    ErrorKind.INTERNAL: Presentation(500, "server_error", 500),
    ErrorKind.UNAVAILABLE: Presentation(503, "unavailable_error", 503),
}

#: The status of "come back later" (a full queue, a rate limit…): the request log counts
#: these instead of writing a line for each.
REFUSAL_STATUS = ERROR_TABLE[ErrorKind.OVERLOADED].status

Dialect = Literal["native", "openai"]
AUTH_REALM = "fabricai-trio"


class DomainError(Exception):
    """A failure a client is told about. Subclasses fix `kind` and the default `code`."""

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    default_code: ClassVar[str] = "internal_error"
    default_retry_after: ClassVar[int | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after
        #: Fields an error of this kind adds to the error object (after the four common
        #: ones), the same on every transport.
        self.details: dict[str, Any] = details or {}

    @property
    def status_hint(self) -> int:
        """The HTTP status of this error on our own routes (from the table)."""
        return ERROR_TABLE[self.kind].status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, param={self.param!r})"


# --- what went wrong: the client's request -------------------------------------------


class InvalidBody(DomainError):
    kind = ErrorKind.BAD_REQUEST
    default_code = "invalid_body"


class InvalidJson(DomainError):
    kind = ErrorKind.BAD_REQUEST
    default_code = "invalid_json"

    def __init__(self, detail: str) -> None:
        super().__init__(f"the body is not valid JSON: {detail}")


class InvalidValue(DomainError):
    """A value that is well-formed but not allowed with the rest of the request."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "invalid_value"


class Unsupported(DomainError):
    """A parameter (code `unsupported_parameter`) or value (`unsupported_value`) this
    server does not implement: refused by name, never silently ignored."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "unsupported_parameter"


class TooManyChoices(DomainError):
    """`n` asks for more choices than can ever run at once for this caller: each choice
    takes a slot of the model, and a request's slots are granted together."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "too_many_choices"

    def __init__(self, n: int, limit: int, what: str) -> None:
        super().__init__(f"n={n} choices need {n} slots at once, more than {limit}, {what}",
                         param="n", details={"n": n, "limit": limit})


class ContextLengthExceeded(DomainError):
    """The prompt and `max_tokens` do not fit the context window. The error object
    carries `prompt_tokens` (a lower bound when `prompt_tokens_exact` is false: the
    server stops counting once the prompt cannot fit), `n_ctx` and `max_tokens`."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "context_length_exceeded"

    def __init__(self, *, prompt_tokens: int, exact: bool, n_ctx: int, max_tokens: int
                 ) -> None:
        counted = f"{prompt_tokens}" if exact else f"at least {prompt_tokens}"
        super().__init__(
            f"the prompt ({counted} tokens) plus max_tokens ({max_tokens}) does not fit "
            f"the context window ({n_ctx} tokens)",
            param="max_tokens",
            details={"prompt_tokens": prompt_tokens, "prompt_tokens_exact": exact,
                     "n_ctx": n_ctx, "max_tokens": max_tokens},
        )


class InvalidMessages(DomainError):
    """The model's chat template refuses the conversation (its `raise_exception`, e.g.
    roles that do not alternate)."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "invalid_messages"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")


class InvalidField(DomainError):
    """A field that fails validation; the message starts with the field's name."""

    kind = ErrorKind.INVALID_FIELD
    default_code = "invalid_field"

    def __init__(self, param: str | None, reason: str) -> None:
        super().__init__(f"{param}: {reason}" if param else reason, param=param)
        self.reason = reason

    def renamed(self, param: str) -> InvalidField:
        """The same failure, naming the field as the client spelled it."""
        return InvalidField(param, self.reason)


def invalid_field(exc: ValidationError) -> InvalidField:
    """A pydantic failure as an `InvalidField` naming the first offending field."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        reason = "unknown field"
    elif first["type"] == "missing":
        reason = "field required"
    return InvalidField(param, reason)


class BodyTooLarge(DomainError):
    kind = ErrorKind.TOO_LARGE
    default_code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes")


class UnsupportedMediaType(DomainError):
    """A JSON route's body sent with another `Content-Type` (a cross-site form or
    `text/plain` POST, which a browser sends without asking the server first)."""

    kind = ErrorKind.UNSUPPORTED_MEDIA_TYPE
    default_code = "unsupported_media_type"

    def __init__(self, sent: str | None) -> None:
        super().__init__(f"the body must be sent as `Content-Type: application/json`, "
                         f"not {sent!r}" if sent else "the body must be sent as "
                         "`Content-Type: application/json`", param="Content-Type")


class HostNotAllowed(DomainError):
    """The `Host` header names no host of ALLOWED_HOSTS (DNS rebinding)."""

    kind = ErrorKind.BAD_REQUEST
    default_code = "host_not_allowed"

    def __init__(self) -> None:
        super().__init__("this Host is not served here (see ALLOWED_HOSTS)", param="Host")


class MethodNotAllowed(DomainError):
    kind = ErrorKind.METHOD_NOT_ALLOWED
    default_code = "method_not_allowed"


class NotFound(DomainError):
    """Something named by the request does not exist (code says what: `not_found` for a
    route, `session_not_found`, `request_not_found`)."""

    kind = ErrorKind.NOT_FOUND
    default_code = "not_found"


class ModelNotFound(DomainError):
    """The request's `model` is not one this server serves (OpenAI answers the same:
    404, `invalid_request_error`, code `model_not_found`)."""

    kind = ErrorKind.MODEL_NOT_FOUND
    default_code = "model_not_found"

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"the model {model!r} does not exist; served: {', '.join(served)}",
                         param="model")


# --- who is asking -------------------------------------------------------------------


class Unauthenticated(DomainError):
    """No or bad credentials. `invalid_token`: credentials were sent but are not valid
    (RFC 6750's `error="invalid_token"` in the challenge)."""

    kind = ErrorKind.UNAUTHENTICATED
    default_code = "missing_credentials"

    def __init__(self, message: str, *, code: str, invalid_token: bool) -> None:
        super().__init__(message, code=code)
        self.invalid_token = invalid_token


class AuthThrottled(DomainError):
    """Too many failed authentications from this client address lately: refused
    without checking, until `retry_after`."""

    kind = ErrorKind.OVERLOADED
    default_code = "too_many_auth_failures"

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed authentication attempts; retry later",
                         retry_after=retry_after)


class UnknownSession(NotFound):
    """Unknown, expired, malformed, or another identity's: the same answer for all four,
    so a caller cannot learn which session ids exist."""

    default_code = "session_not_found"

    def __init__(self) -> None:
        super().__init__("session not found", param="session_id")


# --- the state of the server ---------------------------------------------------------


class SessionBusy(DomainError):
    kind = ErrorKind.CONFLICT
    default_code = "session_busy"

    def __init__(self) -> None:
        super().__init__("a generation is already running on this session", param="session_id")


class SessionIdTaken(DomainError):
    kind = ErrorKind.CONFLICT
    default_code = "session_exists"

    def __init__(self) -> None:
        super().__init__("a session with this id already exists", param="session_id")


class SessionModelMismatch(DomainError):
    """A session keeps the model it started with; the request names another one."""

    kind = ErrorKind.CONFLICT
    default_code = "session_model_mismatch"

    def __init__(self, session_model: str, model: str) -> None:
        super().__init__(f"this session runs on the model {session_model!r}, not {model!r}: "
                         "omit `model` or name that one", param="model")


class TooManySessions(DomainError):
    """The caller already keeps SESSION_MAX_PER_OWNER live sessions."""

    kind = ErrorKind.QUOTA_EXCEEDED
    default_code = "too_many_sessions"

    def __init__(self, limit: int) -> None:
        super().__init__(f"you already have {limit} sessions; delete one first")


class SessionTooLarge(DomainError):
    """The session already holds SESSION_MAX_BYTES, or this request would pass it."""

    kind = ErrorKind.TOO_LARGE
    default_code = "session_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the session would hold more than {limit} bytes of messages; "
                         "start a new session", param="session_id")


class SessionStoreFull(DomainError):
    """The in-process store holds MEMORY_STORE_MAX_BYTES: nothing new until sessions
    are deleted or expire."""

    kind = ErrorKind.QUOTA_EXCEEDED
    default_code = "session_store_full"
    default_retry_after = 60

    def __init__(self) -> None:
        super().__init__("the session store is full; retry later")


class DuplicateRequestId(DomainError):
    kind = ErrorKind.CONFLICT
    default_code = "duplicate_request_id"

    def __init__(self) -> None:
        super().__init__("a generation of yours with this request_id is running",
                         param="request_id")


class QueueFull(DomainError):
    kind = ErrorKind.OVERLOADED
    default_code = "queue_full"

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is at capacity and its queue is full; retry later",
                         retry_after=retry_after)


class PerKeyLimit(DomainError):
    """This identity holds its share of the queue (MAX_QUEUED_PER_KEY); others still
    get in."""

    kind = ErrorKind.OVERLOADED
    default_code = "per_key_limit"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Where a principal stands against one rate limit: `X-RateLimit-*` on HTTP."""

    limit: int  # per minute
    remaining: int  # what may still be spent now
    reset_seconds: int  # until the bucket is full again


class RateLimited(DomainError):
    """This identity spent its requests or tokens per minute (RATE_LIMIT_*_PER_MINUTE);
    `which` is `requests` or `tokens`, `state` where it stands against that limit."""

    kind = ErrorKind.OVERLOADED
    default_code = "rate_limited"

    def __init__(self, which: str, retry_after: int, state: RateLimit) -> None:
        super().__init__(
            f"rate limit of {state.limit} {which} per minute reached; retry in "
            f"{retry_after} s", retry_after=retry_after,
        )
        self.which = which
        self.state = state


def rate_limit_headers(state: RateLimit) -> dict[str, str]:
    """`X-RateLimit-Limit/Remaining/Reset` (reset in seconds from now)."""
    return {
        "X-RateLimit-Limit": str(state.limit),
        "X-RateLimit-Remaining": str(max(0, state.remaining)),
        "X-RateLimit-Reset": str(state.reset_seconds),
    }


class TooManyEvents(DomainError):
    """A Socket.IO connection has too many events (or event bytes) in flight: it must
    wait for some of them to finish before it sends more."""

    kind = ErrorKind.OVERLOADED
    default_code = "too_many_events"
    default_retry_after = 1

    def __init__(self, limit: int) -> None:
        super().__init__(f"this connection already has {limit} events in flight; wait for "
                         "their acknowledgements before sending more")


class Unavailable(DomainError):
    """Not now: the model is loading (`model_loading`), the session store is down
    (`session_store_unavailable`)…; clients retry after `retry_after` seconds."""

    kind = ErrorKind.UNAVAILABLE
    default_code = "unavailable"
    default_retry_after = 1


class ModelLoading(Unavailable):
    default_code = "model_loading"

    def __init__(self) -> None:
        super().__init__("the model is still loading")


class SessionStoreUnavailable(Unavailable):
    default_code = "session_store_unavailable"

    def __init__(self) -> None:
        super().__init__("the session store is unavailable")


class Draining(Unavailable):
    """The server is shutting down: it finishes what it runs and takes nothing new."""

    default_code = "draining"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica")


class EngineFailed(DomainError):
    """The model backend failed while generating."""

    kind = ErrorKind.INTERNAL
    default_code = "engine_error"


class InternalError(DomainError):
    """A bug: the client is told no more than that."""

    kind = ErrorKind.INTERNAL
    default_code = "internal_error"

    def __init__(self, message: str = "internal server error") -> None:
        super().__init__(message)


# --- rendering: every transport asks these, and only these ---------------------------


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def error_object(error: DomainError) -> dict[str, Any]:
    """`{"type", "code", "message", "param"}` and the error's `details`: the inside of
    every error body."""
    return {
        "type": ERROR_TABLE[error.kind].type,
        "code": error.code,
        "message": error.message,
        "param": error.param,
        **error.details,
    }


def http_error(error: DomainError, *, dialect: Dialect = "native") -> HttpError:
    """Status, headers and JSON body of an HTTP error answer."""
    row = ERROR_TABLE[error.kind]
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthenticated):
        challenge = f'Bearer realm="{AUTH_REALM}"'
        if error.invalid_token:
            challenge += ', error="invalid_token"'
        headers["WWW-Authenticate"] = challenge
    if isinstance(error, RateLimited):
        headers.update(rate_limit_headers(error.state))
    status = row.openai_status if dialect == "openai" else row.status
    return HttpError(status=status, headers=headers, body={"error": error_object(error)})


def error_event(error: DomainError, request_id: str | None) -> ErrorEvent:
    """The SSE `error` event; also the Socket.IO `inference_error` payload."""
    return ErrorEvent(
        request_id=request_id or "", status=ERROR_TABLE[error.kind].status, **error_object(error)
    )


def ack_error(error: DomainError, request_id: str | None) -> dict[str, Any]:
    """A Socket.IO acknowledgement that reports a failure."""
    return {"request_id": request_id, "error": error_object(error)}


def connect_refusal(error: DomainError) -> tuple[str, dict[str, Any]]:
    """`(message, data)` of a Socket.IO CONNECT_ERROR packet."""
    return error.message, error_object(error)

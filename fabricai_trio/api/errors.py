"""The error format, and the one mapping from exceptions to HTTP errors.

Every error leaves the server as `{"error": {"type", "code", "message", "param"}}`;
Socket.IO `inference_error` events and SSE `error` events carry the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}


@dataclass
class ApiError(Exception):
    """An error a client gets back; `code` is a stable machine-readable string."""

    status: int
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        return _TYPES.get(self.status, fallback)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
            }
        }


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic failure as a 422 naming the first offending field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "field required"
    return ApiError(422, "invalid_field", f"{param}: {message}" if param else message, param)


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, "invalid_json", f"the body is not valid JSON: {detail}")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the body is larger than {limit} bytes")


def queue_full(retry_after: int) -> ApiError:
    return ApiError(
        429,
        "queue_full",
        "the server is at capacity and its queue is full; retry later",
        headers={"Retry-After": str(retry_after)},
    )


def not_found(what: str = "route", param: str | None = None) -> ApiError:
    return ApiError(404, f"{what}_not_found" if what != "route" else "not_found",
                    f"{what.replace('_', ' ')} not found", param)


def unavailable(code: str, message: str) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": "1"})

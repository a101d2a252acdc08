"""Protocol errors and the one place that maps them to HTTP statuses and close codes.

`RemoteProtocolError`: the peer broke the protocol (a 4xx). `LocalProtocolError`: our own
code asked for something the protocol forbids (a bug: 500). Both carry the Engine.IO error
code that the reference server puts in its JSON error bodies.
"""

from __future__ import annotations

import enum
import json


class EioErrorCode(enum.IntEnum):
    """Error codes of the reference Engine.IO server's `{"code", "message"}` bodies."""

    UNKNOWN_TRANSPORT = 0
    UNKNOWN_SID = 1
    BAD_HANDSHAKE_METHOD = 2
    BAD_REQUEST = 3
    FORBIDDEN = 4
    UNSUPPORTED_PROTOCOL_VERSION = 5


class Failure(enum.Enum):
    """What kind of failure a protocol error is; `FAILURES` gives its HTTP status."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TIMEOUT = "timeout"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A protocol violation; its `failure` gives the status hint for an HTTP answer."""

    def __init__(
        self,
        message: str,
        *,
        failure: Failure = Failure.BAD_REQUEST,
        code: EioErrorCode = EioErrorCode.BAD_REQUEST,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.failure = failure
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol."""


class LocalProtocolError(ProtocolError):
    """Our side tried something the protocol or the session state forbids."""

    def __init__(self, message: str) -> None:
        super().__init__(message, failure=Failure.INTERNAL)


class ConnectionRefused(Exception):
    """Raised by a Socket.IO connect handler to refuse the client (sent as CONNECT_ERROR)."""

    def __init__(self, message: str = "Connection rejected by server", data: object = None):
        super().__init__(message)
        self.message = message
        self.data = data


class ClientGone(Exception):
    """The target client disconnected before the operation could complete."""


# --- the mapping ------------------------------------------------------------------------

WS_NORMAL_CLOSURE = 1000
WS_PROTOCOL_ERROR = 1002
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011


#: The Engine.IO layer's one table: the HTTP status and the websocket close code of each
#: kind of failure (the app's own errors have theirs in `core.errors`).
FAILURES: dict[Failure, tuple[int, int]] = {
    Failure.BAD_REQUEST: (400, WS_PROTOCOL_ERROR),
    Failure.FORBIDDEN: (403, WS_POLICY_VIOLATION),
    Failure.NOT_FOUND: (404, WS_PROTOCOL_ERROR),
    Failure.TIMEOUT: (408, WS_PROTOCOL_ERROR),
    Failure.TOO_LARGE: (413, WS_MESSAGE_TOO_BIG),
    Failure.UNAVAILABLE: (503, WS_INTERNAL_ERROR),
    Failure.INTERNAL: (500, WS_INTERNAL_ERROR),
}


def _failure(exc: BaseException) -> Failure:
    return exc.failure if isinstance(exc, ProtocolError) else Failure.INTERNAL


def http_status_for(exc: BaseException) -> int:
    """The HTTP status answering a request that failed with `exc`."""
    return FAILURES[_failure(exc)][0]


def ws_close_code_for(exc: BaseException) -> int:
    """The websocket close code ending a connection that failed with `exc`."""
    return FAILURES[_failure(exc)][1]


def error_body(exc: BaseException) -> bytes:
    """The JSON body of an HTTP error answer (the reference server's shape)."""
    if isinstance(exc, ProtocolError):
        code, message = int(exc.code), exc.message
    else:
        code, message = int(EioErrorCode.BAD_REQUEST), "Internal error"
    return json.dumps({"code": code, "message": message}).encode()

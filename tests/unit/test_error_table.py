"""The one error table: every domain error renders the same way on every transport,
and no module outside the table chooses an HTTP status."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fabricai_trio.core.errors import (
    ERROR_TABLE,
    ContextLengthExceeded,
    DomainError,
    ErrorKind,
    InvalidField,
    ModelLoading,
    QueueFull,
    SessionBusy,
    Unauthenticated,
    ack_error,
    connect_refusal,
    error_event,
    http_error,
)

PACKAGE = Path(__file__).resolve().parents[2] / "fabricai_trio"


def domain_error_classes() -> list[type[DomainError]]:
    found, todo = [], [DomainError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_kind_and_every_error_class_has_a_row() -> None:
    assert set(ERROR_TABLE) == set(ErrorKind)
    for cls in domain_error_classes():
        assert cls.kind in ERROR_TABLE, cls


def test_http_rendering() -> None:
    full = http_error(QueueFull(retry_after=3))
    assert full.status == 429
    assert full.headers == {"Retry-After": "3"}
    assert full.body == {"error": {"type": "rate_limit_error", "code": "queue_full",
                                   "message": QueueFull(3).message, "param": None}}
    loading = http_error(ModelLoading())
    assert (loading.status, loading.headers["Retry-After"]) == (503, "1")
    busy = http_error(SessionBusy())
    assert (busy.status, busy.body["error"]["param"]) == (409, "session_id")


def test_a_field_is_422_here_and_400_on_the_openai_routes() -> None:
    error = InvalidField("temperature", "must be at most 2")
    assert error.message == "temperature: must be at most 2"
    assert http_error(error).status == 422
    openai = http_error(error, dialect="openai")
    assert openai.status == 400
    assert openai.body == http_error(error).body  # the same object, another status
    renamed = error.renamed("max_completion_tokens")
    assert (renamed.param, renamed.message) == (
        "max_completion_tokens", "max_completion_tokens: must be at most 2")


def test_authentication_challenge() -> None:
    missing = http_error(Unauthenticated("no", code="missing_credentials",
                                         invalid_token=False))
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="fabricai-trio"'
    bad = http_error(Unauthenticated("bad", code="invalid_api_key", invalid_token=True))
    assert bad.headers["WWW-Authenticate"].endswith('error="invalid_token"')


def test_stream_and_socketio_payloads_carry_the_same_code() -> None:
    error = SessionBusy()
    event = error_event(error, "r1").model_dump()
    assert event == {"request_id": "r1", "status": 409, "type": "conflict_error",
                     "code": "session_busy", "message": error.message, "param": "session_id"}
    assert isinstance(event["code"], str)
    assert ack_error(error, "r1") == {"request_id": "r1",
                                      "error": http_error(error).body["error"]}
    message, data = connect_refusal(error)
    assert message == error.message and data == http_error(error).body["error"]


def test_context_length_exceeded_carries_its_counts_everywhere() -> None:
    error = ContextLengthExceeded(prompt_tokens=5000, exact=False, n_ctx=4096, max_tokens=256)
    counts = {"prompt_tokens": 5000, "prompt_tokens_exact": False, "n_ctx": 4096,
              "max_tokens": 256}
    body = http_error(error).body["error"]
    assert body == {"type": "invalid_request_error", "code": "context_length_exceeded",
                    "message": error.message, "param": "max_tokens", **counts}
    assert "at least 5000 tokens" in error.message
    assert http_error(error).status == http_error(error, dialect="openai").status == 400
    event = error_event(error, "r1").model_dump()
    assert event == {"request_id": "r1", "status": 400, **body}
    assert ack_error(error, "r1")["error"] == body


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_statuses_are_client_or_server_errors(kind: ErrorKind) -> None:
    row = ERROR_TABLE[kind]
    assert 400 <= row.status < 600 and 400 <= row.openai_status < 600


# Where a status may be written as a number: the table itself, and the Engine.IO
# protocol's own table (a protocol below our HTTP routes, with its own error codes).
ALLOWED = {"core/errors.py", "realtime/errors.py"}


def _status_like(node: ast.AST, parent: ast.AST) -> bool:
    """Whether the number `node` is used as an HTTP status where it stands."""
    def named(name: str) -> bool:
        return "status" in name.lower() or name.lower() in ("code", "http_code")

    if isinstance(parent, ast.keyword):
        return parent.arg is not None and named(parent.arg)
    if isinstance(parent, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        names = [t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute)
                 else "" for t in targets]
        return any(named(n) for n in names)
    # Comparisons (`status == 404`) and literal tables (`{404: ...}`, `(400, 422)`).
    return isinstance(parent, ast.Compare | ast.Dict | ast.Tuple | ast.List | ast.Set)


def test_no_status_is_chosen_outside_the_table() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        for parent in ast.walk(tree):
            for node in ast.iter_child_nodes(parent):
                if (isinstance(node, ast.Constant) and type(node.value) is int
                        and 400 <= node.value < 600 and _status_like(node, parent)):
                    offenders.append(f"{relative}:{node.lineno}: {node.value}")
    assert offenders == []

"""Bad input gets a clear 4xx JSON error and the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .server_process import ServerProcess

pytestmark = pytest.mark.model

JSON = {"content-type": "application/json"}

CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    # (name, request kwargs, status, code, param)
    ("invalid json", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, "invalid_json", None),
    ("empty body", {"content": b"", "headers": JSON}, 400, "invalid_json", None),
    ("not utf-8", {"content": b"\xff\xfe{}", "headers": JSON}, 400, "invalid_json", None),
    ("no content type", {"content": b'{"prompt": "hi"}'}, 415, "unsupported_media_type",
     "Content-Type"),
    ("text/plain", {"content": b'{"prompt": "hi"}', "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type", "Content-Type"),
    ("form", {"data": {"prompt": "hi"}}, 415, "unsupported_media_type", "Content-Type"),
    ("deeply nested", {"content": b"[" * 4000, "headers": JSON}, 400, "invalid_json", None),
    ("4,000-digit integer",
     {"content": b'{"prompt": "hi", "max_tokens": ' + b"9" * 4000 + b"}", "headers": JSON},
     400, "invalid_json", None),
    ("NaN", {"content": b'{"prompt": "hi", "temperature": NaN}', "headers": JSON}, 400,
     "invalid_json", None),
    ("array body", {"json": [1, 2]}, 400, "invalid_body", None),
    ("wrong type", {"json": {"prompt": "hi", "max_tokens": "many"}}, 422, "invalid_field",
     "max_tokens"),
    ("prompt not a string", {"json": {"prompt": 42}}, 422, "invalid_field", "prompt"),
    ("negative max_tokens", {"json": {"prompt": "hi", "max_tokens": -1}}, 422, "invalid_field",
     "max_tokens"),
    ("max_tokens above limit", {"json": {"prompt": "hi", "max_tokens": 513}}, 422,
     "invalid_field", "max_tokens"),
    ("empty prompt", {"json": {"prompt": "   "}}, 422, "invalid_field", None),
    ("both prompt and messages",
     {"json": {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}}, 422,
     "invalid_field", None),
    ("neither prompt nor messages", {"json": {"max_tokens": 3}}, 422, "invalid_field", None),
    ("bad role", {"json": {"messages": [{"role": "robot", "content": "x"}]}}, 422,
     "invalid_field", "messages.0.role"),
    ("unknown field", {"json": {"prompt": "hi", "bogus": 1}}, 422, "invalid_field", "bogus"),
    ("temperature out of range", {"json": {"prompt": "hi", "temperature": 9}}, 422,
     "invalid_field", "temperature"),
    ("empty stop string", {"json": {"prompt": "hi", "stop": [""]}}, 422, "invalid_field",
     "stop"),
    ("bad request id", {"json": {"prompt": "hi", "request_id": "a b"}}, 422, "invalid_field",
     "request_id"),
    ("body too large", {"json": {"prompt": "x" * 5000}}, 413, "request_too_large", None),
    ("prompt too long for the context",
     {"json": {"prompt": "word " * 700, "max_tokens": 512}}, 400, "context_length_exceeded",
     "max_tokens"),
    ("unknown session", {"json": {"prompt": "hi", "session_id": "nope"}}, 404,
     "session_not_found", "session_id"),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "code", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(
    server: ServerProcess, name: str, kwargs: dict[str, Any], status: int, code: str,
    param: str | None,
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/v1/inference_sse", **kwargs)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        # The common fields; context_length_exceeded adds its counts (test_context_bound).
        assert {"type", "code", "message", "param"} <= set(error)
        assert set(error) - {"type", "code", "message", "param"} <= {
            "prompt_tokens", "prompt_tokens_exact", "n_ctx", "max_tokens"}
        assert error["code"] == code
        assert error["message"]
        if param is not None:
            assert error["param"] == param
        # ...and the server keeps serving.
        ok = client.post("/v1/inference_sse", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200 and "event: complete" in ok.text
        status_now = client.get("/v1/status").json()["concurrency"]
        assert status_now["active"] == 0 and status_now["queued"] == 0


def test_bad_query_on_get(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.get("/v1/inference_sse", params={"prompt": "hi", "top_p": "zero"})
        assert response.status_code == 422
        assert response.json()["error"]["param"] == "top_p"


def test_unknown_route_and_method(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        missing = client.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        wrong = client.delete("/v1/inference_sse")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_chunked_body_over_the_limit(server: ServerProcess) -> None:
    def chunks() -> Any:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(
            "/v1/inference_sse", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

"""The default configuration on the real models: both embedded models (`gemma3`, and
`smollm2`, the default) in one server process, each with its own engine and queue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_process import ServerProcess
from .sse_client import parse_lines
from .test_socketio_real import TRANSPORTS, Recorder

pytestmark = pytest.mark.model

SSE = "/v1/inference_sse"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def two_models(server_logs: Path) -> Iterator[ServerProcess]:
    """MODELS at its default (LLM_MODEL and CHAT_FORMAT unset), one slot per model."""
    env = {"LLM_MODEL": "", "CHAT_FORMAT": "", "N_CTX": "1024",
           "MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "2"}
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture()
def http(two_models: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=two_models.url, timeout=60) as client:
        yield client


def lines(response: httpx.Response) -> Iterator[str]:
    return response.iter_lines()


def test_models_and_status_describe_both(http: httpx.Client) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert list(cards) == ["smollm2", "gemma3"]  # the default first
    assert cards["smollm2"]["default"] and not cards["gemma3"]["default"]
    assert cards["smollm2"]["chat_template"] == {"name": "gguf", "source": "gguf"}
    assert cards["gemma3"]["chat_template"] == {"name": "gemma", "source": "fallback"}
    for card in cards.values():
        assert card["loaded"] and card["context_length"] == 1024 and card["slots"] == 1
        assert card["capabilities"]["chat"] and card["capabilities"]["streaming"]
    status = http.get("/v1/status").json()
    assert status["default_model"] == "smollm2"
    assert {n: m["model"]["loaded"] for n, m in status["models"].items()} == {
        "smollm2": True, "gemma3": True}
    assert status["models"]["gemma3"]["model"]["path"].endswith(".gguf")
    assert http.get("/readyz").json()["status"] == "ready"
    metrics = http.get("/metrics").text
    for name in ("smollm2", "gemma3"):
        assert f'fabricai_queue_depth{{model="{name}"}} 0.0' in metrics


def test_two_models_stream_at_the_same_time(http: httpx.Client) -> None:
    """A Gemma stream (SSE) and a SmolLM2 stream (OpenAI) each hold their model's only
    slot at once: both have produced text before either has ended."""
    sse_body = {"model": "gemma3", "prompt": "Once upon a time", "max_tokens": 40,
                "temperature": 0}
    chat_body = {"model": "smollm2", "stream": True, "max_tokens": 40,
                 "messages": [{"role": "user", "content": "Tell me about the sea."}]}
    with http.stream("POST", SSE, json=sse_body) as gemma:
        gemma_events = parse_lines(lines(gemma))
        assert next(e for e in gemma_events if e.event == "token")
        with http.stream("POST", CHAT, json=chat_body) as smol:
            smol_lines = lines(smol)
            first = next(json.loads(x[6:]) for x in smol_lines if x.startswith("data: {"))
            assert first["model"] == "smollm2"
            status = http.get("/v1/status").json()["models"]
            assert [status[n]["concurrency"]["active"] for n in ("gemma3", "smollm2")] == [1, 1]
            assert [status[n]["concurrency"]["queued"] for n in ("gemma3", "smollm2")] == [0, 0]
            rest = [x for x in smol_lines if x.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
        complete = [e for e in gemma_events if e.event == "complete"]
        assert complete and complete[0].data["finish_reason"] in ("stop", "length")
    metrics = http.get("/metrics").text
    for name in ("smollm2", "gemma3"):
        assert f'fabricai_generations_total{{finish_reason="stop",model="{name}"}}' in metrics


def test_a_session_continues_on_its_own_model(http: httpx.Client) -> None:
    sid = http.post("/v1/sessions").json()["id"]
    first = http.post(SSE, json={"model": "gemma3", "session_id": sid, "max_tokens": 4,
                                 "prompt": "Hello!"})
    assert [e.event for e in parse_lines(iter(first.text.splitlines()))][-1] == "complete"
    # No `model`: the session's (gemma3), not the default (smollm2).
    second = http.post(CHAT, json={"session_id": sid, "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "And then?"}]})
    assert second.status_code == 200 and second.json()["model"] == "gemma3"
    refused = http.post(CHAT, json={"model": "smollm2", "session_id": sid, "max_tokens": 4,
                                    "messages": [{"role": "user", "content": "Hm?"}]})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "session_model_mismatch"
    assert refused.json()["error"]["param"] == "model"
    stored = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [m["model"] for m in stored if m["role"] == "assistant"] == ["gemma3", "gemma3"]


def test_unknown_model_is_404_on_every_transport(
    http: httpx.Client, two_models: ServerProcess
) -> None:
    def check(error: dict[str, Any]) -> None:
        assert (error["code"], error["param"]) == ("model_not_found", "model")

    post = http.post(SSE, json={"model": "gpt-4", "prompt": "Hi"})
    get = http.get(SSE, params={"model": "gpt-4", "prompt": "Hi"})
    chat = http.post(CHAT, json={"model": "gpt-4",
                                 "messages": [{"role": "user", "content": "Hi"}]})
    for response in (post, get, chat):
        assert response.status_code == 404
        check(response.json()["error"])
    client = Recorder(two_models.url, TRANSPORTS["websocket"])
    try:
        ack = client.prompt(prompt="Hi", model="gpt-4", max_tokens=2)
        check(ack["error"])
        assert client.done.wait(10)
        name, data = client.events[-1]
        assert name == "inference_error" and data["status"] == 404
        # The default model answers a Socket.IO prompt without `model`.
        client.done.clear()
        assert "error" not in client.prompt(prompt="Hi", max_tokens=2)
        assert client.done.wait(60)
        assert client.events[-1][0] == "inference_complete"
    finally:
        client.close()

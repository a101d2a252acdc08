"""Random disconnects across SSE, the OpenAI stream and Socket.IO, on sessions in Redis.

Each client owns one session and sends one generation on it, then leaves at a random
point: before the response headers, while queued, mid-stream, right at its last token
(when the turn is being written), or not at all. Afterwards nothing may be left over and
no turn lost or written twice:

* `/v1/status`: 0 running, 0 queued; the engine's token counter is still; the next
  request works; no traceback in the server log; RSS back in its band.
* Each session holds at most one turn (a user message followed by its assistant
  message); a client that saw a token has its turn stored; a client that saw `complete`
  finds exactly that text stored, and one cut off mid-stream finds a prefix of what it
  would have read stored (the turn keeps what was generated before the cancel landed).

FABRICAI_SOAK=short (CI, the default) runs 150 clients; FABRICAI_SOAK=long runs 1,000.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
import trio

from ..redis_server import RedisServer
from ..server_process import ServerProcess, model_env
from ..sse_client import aparse
from ..test_soak import rss_kib

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(900)]

CLIENTS = 1000 if os.environ.get("FABRICAI_SOAK") == "long" else 150
TRANSPORTS = ("sse", "openai", "socketio")
WHEN = ("early", "queued", "mid", "last", "never")


@dataclass
class Outcome:
    session_id: str
    transport: str
    when: str
    max_tokens: int
    text: str = ""  # the token texts received, in order
    tokens: int = 0
    complete: dict[str, Any] | None = None
    refused: int | None = None  # 429 and the like: no generation, no turn
    notes: list[str] = field(default_factory=list)


async def sse_client(http: httpx.AsyncClient, out: Outcome, rng: random.Random) -> None:
    body = {"prompt": f"Tell me about {out.session_id}.", "max_tokens": out.max_tokens,
            "session_id": out.session_id}
    cut_after = rng.randint(1, out.max_tokens - 1)
    async with http.stream("POST", "/v1/inference_sse", json=body) as response:
        if response.status_code != 200:
            out.refused = response.status_code
            return
        async for event in aparse(response.aiter_lines()):
            if event.event == "queued" and out.when == "queued":
                return
            if event.event == "token":
                out.tokens += 1
                out.text += event.data["text"]
                if out.when == "mid" and out.tokens >= cut_after:
                    return
                if out.when == "last" and out.tokens >= out.max_tokens:
                    return
            if event.event == "complete":
                out.complete = event.data
            if event.event == "error":
                out.notes.append(f"error {event.data}")


async def openai_client(http: httpx.AsyncClient, out: Outcome, rng: random.Random) -> None:
    body = {"stream": True, "max_tokens": out.max_tokens,
            "session_id": out.session_id,
            "messages": [{"role": "user", "content": f"Tell me about {out.session_id}."}]}
    cut_after = rng.randint(1, out.max_tokens - 1)
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            out.refused = response.status_code
            return
        finish: str | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.complete = {"text": out.text, "finish_reason": finish}
                return
            choice = json.loads(line[6:])["choices"][0]
            piece = choice["delta"].get("content")
            if piece:
                out.tokens += 1
                out.text += piece
                if out.when in ("mid", "queued") and out.tokens >= cut_after:
                    return
                if out.when == "last" and out.tokens >= out.max_tokens:
                    return
            finish = choice.get("finish_reason") or finish


def socketio_client(url: str, out: Outcome, cut_after: int) -> None:
    """python-socketio's own (threaded) client; it disconnects where `out.when` says."""
    client = socketio.Client(reconnection=False)
    done = threading.Event()

    def on_queued(_: dict[str, Any]) -> None:
        if out.when == "queued":
            done.set()

    def on_token(data: dict[str, Any]) -> None:
        out.tokens += 1
        out.text += data["text"]
        if (out.when == "mid" and out.tokens >= cut_after) or (
            out.when == "last" and out.tokens >= out.max_tokens
        ):
            done.set()

    def on_complete(data: dict[str, Any]) -> None:
        out.complete = data
        done.set()

    def on_error(data: dict[str, Any]) -> None:
        out.refused = data.get("status", 0)
        done.set()

    client.on("inference_queued", on_queued)
    client.on("inference_token", on_token)
    client.on("inference_complete", on_complete)
    client.on("inference_error", on_error)
    client.connect(url, transports=["websocket"], wait_timeout=20)
    try:
        client.emit("inference_prompt", {"prompt": f"Tell me about {out.session_id}.",
                                         "max_tokens": out.max_tokens,
                                         "session_id": out.session_id})
        if out.when != "early":
            done.wait(60)
    finally:
        client.disconnect()


async def run_client(server: ServerProcess, http: httpx.AsyncClient, out: Outcome,
                     rng: random.Random, sio_limit: trio.CapacityLimiter) -> None:
    created = await http.post("/v1/sessions", json={"session_id": out.session_id})
    assert created.status_code == 201, created.text
    if out.transport == "socketio":
        cut_after = rng.randint(1, out.max_tokens - 1)
        await trio.to_thread.run_sync(socketio_client, server.url, out, cut_after,
                                      limiter=sio_limit)
        return
    run = sse_client if out.transport == "sse" else openai_client
    if out.when == "early":
        with trio.move_on_after(rng.random() * 0.05):
            await run(http, out, rng)
        return
    await run(http, out, rng)


def check_turns(out: Outcome, messages: list[dict[str, Any]]) -> None:
    where = f"{out.transport}/{out.when} {out.session_id}: {messages} {out}"
    roles = [m["role"] for m in messages]
    assert roles in ([], ["user", "assistant"]), f"turn lost or duplicated: {where}"
    if out.tokens:
        assert roles, f"a turn that streamed tokens was not stored: {where}"
    if not roles:
        return
    stored = messages[1]
    if out.complete is not None:
        assert stored["content"] == out.text, where
        if out.complete.get("finish_reason"):
            assert stored["finish_reason"] == out.complete["finish_reason"], where
    else:
        assert stored["content"].startswith(out.text), where


async def test_random_disconnects_leave_nothing_behind(
    model_path: Path, server_logs: Path, redis: RedisServer
) -> None:
    env = model_env(model_path, MAX_CONCURRENT_REQUESTS="2", MAX_QUEUE_SIZE="6", N_CTX="512",
                    REDIS_URL=redis.url, REDIS_PREFIX=f"storm{random.randrange(10**6)}:",
                    SSE_KEEPALIVE_SECONDS="0.5",
                    # One identity (auth off) owns every session here.
                    SESSION_MAX_PER_OWNER=str(CLIENTS))
    rng = random.Random(20261201)
    outcomes = [
        Outcome(session_id=f"storm-{i}", transport=rng.choice(TRANSPORTS),
                when=rng.choice(WHEN), max_tokens=rng.randint(3, 12))
        for i in range(CLIENTS)
    ]
    sio_limit = trio.CapacityLimiter(8)
    with ServerProcess(env, log_dir=server_logs) as server:
        assert server.proc is not None
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            await http.post("/v1/inference_sse", json={"prompt": "warm", "max_tokens": 3})
            start_rss = rss_kib(server.proc.pid)
            async with trio.open_nursery() as nursery:
                for out in outcomes:
                    nursery.start_soon(run_client, server, http, out,
                                       random.Random(rng.random()), sio_limit)
                    await trio.sleep(rng.random() * 0.3)  # about the server's pace: some 429s
            with trio.fail_after(120):  # a hang guard, not a budget
                while True:
                    status = (await http.get("/v1/status")).json()
                    if status["concurrency"]["active"] == status["concurrency"]["queued"] == 0:
                        break
                    await trio.sleep(0.05)
            settled = status["engine"]["tokens_generated"]
            await trio.sleep(0.5)
            assert (await http.get("/v1/status")).json()["engine"]["tokens_generated"] == settled
            for out in outcomes:
                response = await http.get(f"/v1/sessions/{out.session_id}/messages")
                assert response.status_code == 200, response.text
                check_turns(out, response.json()["data"])
            final = await http.post("/v1/inference_sse", json={"prompt": "end", "max_tokens": 3})
            assert "event: complete" in final.text
            growth_mib = (rss_kib(server.proc.pid) - start_rss) / 1024
        log = server.log()
    assert "Traceback" not in log, log[-6000:]
    assert growth_mib < 96, f"server RSS grew by {growth_mib:.1f} MiB"
    seen = {(o.transport, o.when) for o in outcomes}
    assert len(seen) == len(TRANSPORTS) * len(WHEN), seen
    cut = sum(o.tokens > 0 and o.complete is None for o in outcomes)
    refused = sum(o.refused is not None for o in outcomes)
    print(f"{CLIENTS} clients: {cut} cut mid-stream, {refused} refused, "
          f"{sum(o.complete is not None for o in outcomes)} complete")
    assert cut > CLIENTS // 10

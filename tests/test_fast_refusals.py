"""The fast path of refusals (api/refusals.py) answers exactly as the framework does.

Each scenario fills a model (a fake engine's stream holds its only slot: these are
concurrency tests, the engine's output does not matter), then sends the same request
twice over a real socket to a real Hypercorn: once with the fast path on, once with
it off (`FastRefusals.enabled`, what FAST_REFUSALS=false sets), and compares status,
headers and body. `fabricai_fast_refusals_total` says which path answered. The real-
model test (a real generation holding the slot) is at the end.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing

from fabricai_trio.api.refusals import FastRefusals
from fabricai_trio.app import FabricApp

from .inprocess import served, wait_for
from .live import scrape, value, wait_idle
from .server_process import ServerProcess, model_env

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SSE = "/v1/inference_sse"
KEY_A, KEY_B = "fast-key-a", "fast-key-b"
A = {"authorization": f"Bearer {KEY_A}"}
B = {"authorization": f"Bearer {KEY_B}"}
#: One request per covered route, as a client sends it.
REQUESTS = [
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": "Hello there", "max_tokens": 4, "stream": True}),
    (SSE, {"prompt": "Hello there", "max_tokens": 4}),
]
MODEL = "gemma-3-270m-q4_k_m"  # the embedded Gemma, as LLM_MODEL names it
HOLD = {"prompt": "p", "max_tokens": 2000, "stream": True}  # 40 s of fake tokens


def fast_count(app: FabricApp) -> float:
    return float(app.state.metrics.fast_refusals._value.get())


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers (but the date, which moves) in order, body."""
    headers = [(k.lower(), v) for k, v in response.headers.multi_items() if k.lower() != "date"]
    return response.status_code, headers, response.content


async def both_ways(
    app: FabricApp,
    client: httpx.AsyncClient,
    path: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    fast: int = 1,
) -> httpx.Response:
    """The request with the fast path on, then off, the same X-Request-Id: the answers
    must be the same; `fast` of them (0 or 1) answered by the fast path."""
    answers = []
    for enabled in (True, False):
        app.refusals.enabled = enabled
        before = fast_count(app)
        try:
            answers.append(
                await client.post(
                    path, json=body, headers={**(headers or {}), "x-request-id": "same-id"}
                )
            )
        finally:
            app.refusals.enabled = True
        assert fast_count(app) - before == (fast if enabled else 0), (path, enabled)
    fast_answer, framework_answer = answers
    assert comparable(fast_answer) == comparable(framework_answer), path
    return fast_answer


@asynccontextmanager
async def holding(
    client: httpx.AsyncClient,
    app: FabricApp,
    body: Any = HOLD,
    *,
    headers: dict[str, str] | None = None,
    model: str | None = None,
    active: int = 1,
    queued: int = 0,
) -> AsyncIterator[None]:
    """A stream that holds a slot (or a queue place) until the block ends."""
    admission = app.state.models.get(model).admission
    async with client.stream("POST", COMPLETIONS, json=body, headers=headers) as response:
        assert response.status_code == 200
        await wait_for(
            lambda: (admission.stats().active, admission.stats().queued) == (active, queued)
        )
        yield


async def test_a_full_queue_gets_the_same_429_on_both_paths() -> None:
    async with (
        served(max_queue_size=0, retry_after_seconds=7) as (app, client),
        holding(client, app),
    ):
        rejections = app.state.metrics.rejections.labels("fake")
        http_429 = app.state.metrics.http_requests
        before = rejections._value.get()
        for path, body in REQUESTS:
            before_429 = http_429.labels(path, "POST", "429")._value.get()
            refused = await both_ways(app, client, path, body)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "7"
            assert refused.headers["x-request-id"] == "same-id"
            assert refused.headers["content-type"] == "application/json"
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
            # Both answers counted as 429s of the route, as every request is (when its
            # ASGI call returns, just after the client has the answer).
            counted = http_429.labels(path, "POST", "429")
            await wait_for(lambda: counted._value.get() - before_429 == 2)  # noqa: B023
        # ...and each as a rejection of the model (fast: in `GenerationService.refusal`).
        assert rejections._value.get() - before == 2 * len(REQUESTS)


async def test_the_model_the_body_names_decides() -> None:
    """`busy` is full, `idle` (the default) is not: a request naming `busy` is refused
    fast; one naming `idle`, or none, runs (its body, already read, is replayed to the
    route); one naming no served model is the route's 404."""
    async with (
        served(models=("idle", "busy"), max_queue_size=0) as (app, client),
        holding(client, app, {**HOLD, "model": "busy"}, model="busy"),
    ):
        assert app.state.service.may_refuse()
        for path, body in REQUESTS:
            refused = await both_ways(app, client, path, {**body, "model": "busy"})
            assert refused.json()["error"]["code"] == "queue_full"
            for named in ({"model": "idle"}, {}):
                before = fast_count(app)
                served_ok = await client.post(path, json={**body, **named})
                assert served_ok.status_code == 200, served_ok.text
                assert fast_count(app) == before
                assert "alpha" in served_ok.text  # the fake engine's first word
            unknown = await both_ways(app, client, path, {**body, "model": "nope"}, fast=0)
            assert (unknown.status_code, unknown.json()["error"]["code"]) == (
                404,
                "model_not_found",
            )


async def test_what_the_route_refuses_first_is_still_the_routes_answer() -> None:
    """A full server: a bad body, a wrong Content-Type, an empty body, a reconnect, a
    request naming a session, a duplicate request id... get what the framework path
    answers (never a 429 in place of a 4xx that comes first there)."""
    async with served(max_queue_size=0, max_body_bytes=2048) as (app, client), holding(client, app):
        cases: list[tuple[str, Any, dict[str, str], int]] = [
            (CHAT, {"messages": []}, {}, 400),
            (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, {}, 400),
            (SSE, {"prompt": "x", "temperature": "hot"}, {}, 422),
            (SSE, {"prompt": "x", "session_id": "no-such-session"}, {}, 404),
            (SSE, {"prompt": "x"}, {"last-event-id": "gone:3"}, 404),
            (SSE, {"prompt": "x" * 4000}, {}, 413),
        ]
        for path, body, headers, status in cases:
            answer = await both_ways(app, client, path, body, headers=headers, fast=0)
            assert answer.status_code == status, (path, body, answer.text)
        for path, _ in REQUESTS:
            for content, content_type, status in (
                (b"", "application/json", 400),
                (b"{", "application/json", 400),
                (b"{}", "text/plain", 415),
            ):
                answers = []
                for enabled in (True, False):
                    app.refusals.enabled = enabled
                    answers.append(
                        comparable(
                            await client.post(
                                path,
                                content=content,
                                headers={"content-type": content_type, "x-request-id": "same-id"},
                            )
                        )
                    )
                app.refusals.enabled = True
                assert answers[0] == answers[1]
                assert answers[0][0] == status, (path, content)


async def test_authentication_comes_first_and_counts_once() -> None:
    """With keys: no key or a wrong one is the framework's 401 (never a 429 telling an
    unauthenticated client the server is full), and a wrong key counts as one failed
    attempt, not two (AUTH_FAILURE_LIMIT=3: the fourth is throttled)."""
    async with (
        served(
            max_queue_size=0,
            api_keys=f"{KEY_A},{KEY_B}",
            auth_failure_limit=3,
            auth_failure_window_seconds=600,
        ) as (app, client),
        holding(client, app, headers=A),
    ):
        for path, body in REQUESTS:
            missing = await both_ways(app, client, path, body, fast=0)
            assert missing.status_code == 401
            assert missing.json()["error"]["code"] == "missing_credentials"
            refused = await both_ways(app, client, path, body, headers=B)
            assert refused.json()["error"]["code"] == "queue_full"
        wrong = {"authorization": "Bearer not-a-key"}
        for _ in range(3):  # fast path on: each refused by the framework, counted once
            answer = await client.post(COMPLETIONS, json=REQUESTS[1][1], headers=wrong)
            assert answer.json()["error"]["code"] == "invalid_api_key"
        throttled = await client.post(COMPLETIONS, json=REQUESTS[1][1], headers=wrong)
        assert throttled.json()["error"]["code"] == "too_many_auth_failures"


async def test_per_key_share_is_refused_fast_and_others_still_get_in() -> None:
    """A holds the slot and its one queue place (MAX_QUEUED_PER_KEY=1): A's next
    request is refused fast (`per_key_limit`, same answer both ways); B's is not refused:
    its body, already read by the fast path, reaches the route, and B is queued."""
    async with (
        served(
            max_queue_size=4, max_queued_per_key=1, api_keys=f"{KEY_A},{KEY_B}"
        ) as (app, client),
        holding(client, app, headers=A),
        holding(client, app, headers=A, active=1, queued=1),
    ):
        per_key = app.state.metrics.refusals.labels("fake", "per_key_limit", "normal")
        counted = per_key._value.get()
        for path, body in REQUESTS:
            refused = await both_ways(app, client, path, body, headers=A)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "per_key_limit"
            assert refused.headers["retry-after"] == "1"
        # Counted as the framework path counts it (by model, reason and class), both ways.
        assert per_key._value.get() - counted == 2 * len(REQUESTS)
        before = fast_count(app)
        async with client.stream(
            "POST", SSE, json={"prompt": "x", "max_tokens": 2}, headers=B
        ) as waiting:
            assert waiting.status_code == 200
            lines = waiting.aiter_lines()
            event = [await anext(lines) for _ in range(3)]
            assert "event: queued" in event, event
        assert fast_count(app) == before


async def test_refusals_are_logged_in_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    async with (
        served(max_queue_size=0, refusal_log_seconds=0.3) as (app, client),
        holding(client, app),
    ):
        caplog.set_level("INFO", logger="fabricai_trio.requests")
        for _ in range(5):
            assert (await client.post(*REQUESTS[2][:1], json=REQUESTS[2][1])).status_code == 429
        await trio.sleep(0.35)
        assert (await client.get("/v1/status")).status_code == 200  # ends the interval

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "fabricai_trio.requests"]

        await wait_for(lambda: any(line.startswith("refused ") for line in lines()))
        assert len([line for line in lines() if "status=429" in line]) == 1  # the first
        summary = [line for line in lines() if line.startswith("refused ")]
        assert summary == [f"refused 4 more request(s) with 429 within 0.3 s: {SSE}=4"]


@contextmanager
def every_turn_held(refusals: FastRefusals) -> Iterator[None]:
    """Hold every refusal turn (as clients that do not read their answers would) for
    the block."""
    holders = [object() for _ in range(refusals.TURNS)]
    for holder in holders:
        refusals._turns.acquire_on_behalf_of_nowait(holder)
    try:
        yield
    finally:
        for holder in holders:
            refusals._turns.release_on_behalf_of(holder)


async def test_refusals_take_turns_but_never_wait_long_for_one() -> None:
    """Refusals are sent TURNS at a time; with every turn held (a client that does not
    read its answer can hold one until its write deadline), a refusal still goes out
    after TURN_WAIT_SECONDS."""
    async with served(max_queue_size=0) as (app, client), holding(client, app):
        refusals = app.refusals
        with every_turn_held(refusals):
            started = trio.current_time()
            assert (await client.post(SSE, json={"prompt": "x"})).status_code == 429
            waited = trio.current_time() - started
            assert refusals.TURN_WAIT_SECONDS <= waited < refusals.TURN_WAIT_SECONDS + 5
        started = trio.current_time()
        assert (await client.post(SSE, json={"prompt": "x"})).status_code == 429
        assert trio.current_time() - started < refusals.TURN_WAIT_SECONDS
        await wait_for(lambda: refusals._turns.borrowed_tokens == 0)  # given back


async def test_a_fixed_length_response_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """`GuardedTCPServer` holds a head with a Content-Length for its body: one `send`
    per 429 (or any JSON answer); a stream's head (chunked) is not held."""
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def recording(self: trio.SocketStream, data: Any) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    async with served(max_queue_size=0) as (app, client):
        status = await client.get("/v1/status")
        async with holding(client, app):
            refused = await client.post(SSE, json={"prompt": "x"})
            assert refused.status_code == 429
        answers = [w for w in writes if w.startswith(b"HTTP/1.1 ")]
        assert answers[0].startswith(b"HTTP/1.1 200") and answers[0].endswith(status.content)
        stream_head = answers[1]  # the holding stream's head, sent alone at once
        assert b"transfer-encoding: chunked" in stream_head.lower()
        assert stream_head.endswith(b"\r\n\r\n")
        assert answers[2].startswith(b"HTTP/1.1 429") and answers[2].endswith(refused.content)


# --- the connection layer's raw path (api/raw_refusals.py, server.GuardedTCPServer) ---


def raw_request(path: str, body: Any, *headers: str, content: bytes | None = None) -> bytes:
    """One whole HTTP/1.1 request as bytes (sent in one write, as `wrk` sends it)."""
    payload = json.dumps(body).encode() if content is None else content
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
             *headers]
    if not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class RawConnection:
    """A kept-alive connection that writes bytes as given and reads whole responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def response(self) -> bytes:
        """The next response (head and Content-Length body), as sent."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "the server closed the connection"
                self.buffer += chunk
            end = self.buffer.index(b"\r\n\r\n") + 4
            found = re.search(rb"(?im)^content-length: *(\d+)\r$", bytes(self.buffer[:end]))
            interim = self.buffer.startswith(b"HTTP/1.1 1")  # 100 Continue: a head only
            assert found is not None or interim, bytes(self.buffer[:end])
            length = int(found.group(1)) if found else 0
            while len(self.buffer) < end + length:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "the server closed the connection"
                self.buffer += chunk
            whole = bytes(self.buffer[: end + length])
            del self.buffer[: len(whole)]
            return whole

    async def exchange(self, data: bytes) -> bytes:
        await self.stream.send_all(data)
        return await self.response()

    async def closed(self) -> bool:
        """Whether the server closes the connection (nothing more arrives)."""
        with trio.fail_after(10):
            return await self.stream.receive_some(65536) == b""


@asynccontextmanager
async def raw_connection(client: httpx.AsyncClient) -> AsyncIterator[RawConnection]:
    port = client.base_url.port
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield RawConnection(stream)


def undated(response: bytes) -> bytes:
    return re.sub(rb"(?im)^date: [^\r]*\r\n", b"", response)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def three_ways(app: FabricApp, connection: RawConnection, data: bytes, *,
                     raw: int = 1) -> bytes:
    """`data` (one whole request) answered by the raw path, the fast path over ASGI and
    the framework path, on one connection: the same bytes but the date; `raw` of them
    (0 or 1) answered from the raw bytes."""
    answers = []
    for raw_on, fast_on in ((True, True), (False, True), (False, False)):
        app.raw_refusals.enabled, app.refusals.enabled = raw_on, fast_on
        before = app.raw_refusals.answered
        try:
            answers.append(await connection.exchange(data))
        finally:
            app.raw_refusals.enabled = app.refusals.enabled = True
        assert app.raw_refusals.answered - before == (raw if raw_on else 0), data
    assert undated(answers[0]) == undated(answers[1]) == undated(answers[2]), answers
    return answers[0]


async def test_the_raw_path_answers_byte_for_byte_as_the_framework() -> None:
    async with (
        served(max_queue_size=0, retry_after_seconds=7) as (app, client),
        holding(client, app),
        raw_connection(client) as connection,
    ):
        http_429 = app.state.metrics.http_requests
        for path, body in REQUESTS:
            counted = http_429.labels(path, "POST", "429")
            before = counted._value.get()
            fast_before = fast_count(app)
            data = raw_request(path, body, "x-request-id: rid-7")
            refused = await three_ways(app, connection, data)
            assert refused.startswith(b"HTTP/1.1 429 \r\n")
            for header in (b"retry-after: 7\r\n", b"x-request-id: rid-7\r\n",
                           b"server: hypercorn-h11\r\n", b"content-type: application/json\r\n"):
                assert header in refused, header
            assert b'"code":"queue_full"' in refused
            # Counted as any request is: by route and status, and as a fast refusal.
            await wait_for(lambda: counted._value.get() - before == 3)  # noqa: B023
            assert fast_count(app) - fast_before == 2
        # No X-Request-Id: one is made, as the request observer makes it.
        made = await connection.exchange(raw_request(COMPLETIONS, REQUESTS[1][1]))
        rid = re.search(rb"(?m)^x-request-id: ([0-9a-f]{32})\r$", made)
        assert rid is not None, made
        # The same connection then serves a normal request, and another refusal.
        status = await connection.exchange(b"GET /v1/status HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert status_of(status) == 200 and b'"queue_capacity":0' in status
        # Hypercorn readies the connection for the next request just after it sent the
        # answer (until then a request goes to it, not to the raw path).
        await trio.testing.wait_all_tasks_blocked()
        before = app.raw_refusals.answered
        assert status_of(await connection.exchange(raw_request(*REQUESTS[0]))) == 429
        assert app.raw_refusals.answered - before == 1


async def test_connection_close_is_answered_then_closed() -> None:
    async with (
        served(max_queue_size=0) as (app, client),
        holding(client, app),
        raw_connection(client) as connection,
    ):
        before = app.raw_refusals.answered
        data = raw_request(SSE, REQUESTS[2][1], "connection: close", "x-request-id: rid-8")
        refused = await connection.exchange(data)
        assert app.raw_refusals.answered - before == 1
        assert status_of(refused) == 429 and b"\r\nconnection: close\r\n" in refused.lower()
        assert await connection.closed()
        app.raw_refusals.enabled = False  # the framework's answer is the same
        try:
            async with raw_connection(client) as framework:
                assert undated(await framework.exchange(data)) == undated(refused)
                assert await framework.closed()
        finally:
            app.raw_refusals.enabled = True


async def test_what_is_not_one_simple_request_goes_to_the_http_server() -> None:
    """Each of these is answered by Hypercorn and the app as before (never from the raw
    bytes): a chunked body, `Expect`, two requests in one write, a request split over
    two writes, bad credentials, a session request, a body the route refuses."""
    async with (
        served(max_queue_size=0, api_keys=KEY_A) as (app, client),
        holding(client, app, headers=A),
        raw_connection(client) as connection,
    ):
        auth = f"authorization: Bearer {KEY_A}"
        body = REQUESTS[1][1]
        payload = json.dumps(body).encode()
        chunked = raw_request(COMPLETIONS, body, auth, "transfer-encoding: chunked",
                              content=b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        whole = raw_request(COMPLETIONS, body, auth)
        cases: list[tuple[bytes, int]] = [
            (chunked, 429),
            (raw_request(COMPLETIONS, body, auth, "expect: 100-continue"), 429),
            (raw_request(COMPLETIONS, body), 401),
            (raw_request(COMPLETIONS, body, "authorization: Bearer wrong"), 401),
            (raw_request(SSE, {"prompt": "x", "session_id": "no-such-session"}, auth), 404),
            (raw_request(COMPLETIONS, {"prompt": "x", "max_tokens": -1}, auth), 400),
            (raw_request(COMPLETIONS, body, auth, content=b"{"), 400),
        ]
        before = app.raw_refusals.answered
        for data, status in cases:
            await connection.stream.send_all(data)
            answer = await connection.response()
            if answer.startswith(b"HTTP/1.1 100"):  # Expect: the interim answer first
                answer = await connection.response()
            assert status_of(answer) == status, (data, answer)
        # Two requests in one write: both answered, in order, by the framework side.
        await connection.stream.send_all(whole + whole)
        assert [status_of(await connection.response()) for _ in range(2)] == [429, 429]
        # One request in two writes (the head, then the body a moment later).
        split = whole.index(b"\r\n\r\n") + 4
        await connection.stream.send_all(whole[:split])
        await trio.sleep(0.05)
        await connection.stream.send_all(whole[split:])
        assert status_of(await connection.response()) == 429
        assert app.raw_refusals.answered == before
        # ...and the connection is still good for the raw path (once Hypercorn has
        # readied it for the next request).
        await trio.testing.wait_all_tasks_blocked()
        assert status_of(await connection.exchange(whole)) == 429
        assert app.raw_refusals.answered == before + 1


async def test_raw_refusals_take_the_same_turns() -> None:
    """The raw path waits for a turn of the fast path's limiter (at most
    TURN_WAIT_SECONDS) before it decides and writes."""
    async with (
        served(max_queue_size=0) as (app, client),
        holding(client, app),
        raw_connection(client) as connection,
    ):
        refusals = app.refusals
        with every_turn_held(refusals):
            started = trio.current_time()
            refused = await connection.exchange(raw_request(*REQUESTS[1]))
            waited = trio.current_time() - started
            assert status_of(refused) == 429 and app.raw_refusals.answered == 1
            assert refusals.TURN_WAIT_SECONDS <= waited < refusals.TURN_WAIT_SECONDS + 5
        started = trio.current_time()
        assert status_of(await connection.exchange(raw_request(*REQUESTS[1]))) == 429
        assert trio.current_time() - started < refusals.TURN_WAIT_SECONDS
        assert app.raw_refusals.answered == 2
        await wait_for(lambda: refusals._turns.borrowed_tokens == 0)  # given back


async def test_raw_refusals_are_logged_as_any_refusal(caplog: pytest.LogCaptureFixture) -> None:
    async with (
        served(max_queue_size=0, refusal_log_seconds=0.3) as (app, client),
        holding(client, app),
        raw_connection(client) as connection,
    ):
        caplog.set_level("INFO", logger="fabricai_trio.requests")
        for _ in range(5):
            answer = await connection.exchange(raw_request(*REQUESTS[2], "x-request-id: r-1"))
            assert status_of(answer) == 429
        assert app.raw_refusals.answered == 5
        await trio.sleep(0.35)
        assert (await client.get("/v1/status")).status_code == 200  # ends the interval

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "fabricai_trio.requests"]

        await wait_for(lambda: any(line.startswith("refused ") for line in lines()))
        first = [line for line in lines() if "status=429" in line]
        assert len(first) == 1 and 'request_id="r-1"' in first[0] and f'route="{SSE}"' in first[0]
        summary = [line for line in lines() if line.startswith("refused ")]
        assert summary == [f"refused 4 more request(s) with 429 within 0.3 s: {SSE}=4"]


async def test_the_raw_decision_is_the_fast_paths() -> None:
    """`RawRefusals.decide` on bytes, no socket: a refusal only while the model refuses,
    only for a request the fast path would refuse."""
    async with served(max_queue_size=0) as (app, client):
        raw = app.raw_refusals
        data = raw_request(COMPLETIONS, REQUESTS[1][1])

        def decide(data: bytes) -> Any:
            return raw.decide(data, client="127.0.0.1", max_head_bytes=65536)

        assert not raw.wanted(data) and decide(data) is None  # room: nothing to refuse
        async with holding(client, app):
            assert raw.wanted(data)
            decided = decide(data)
            assert decided is not None
            _, refusal, rid = decided
            assert (refusal.route.path, refusal.error.code) == (COMPLETIONS, "queue_full")
            assert len(rid) == 32
            assert decide(raw_request(COMPLETIONS, {"prompt": "x", "max_tokens": -1})) is None
            assert decide(raw_request("/v1/sessions", {})) is None
            assert decide(raw_request(SSE, {"prompt": "x"}, "last-event-id: a:1")) is None
            assert decide(data.replace(b"host: 127.0.0.1", b"host: evil.example")) is None


# --- the real model ---


@pytest.fixture(scope="module")
def one_slot(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="0",
        MAX_TOKENS_LIMIT="512",
        RETRY_AFTER_SECONDS="3",
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.mark.model
def test_a_real_generation_holds_the_slot_and_the_next_is_refused_fast(
    one_slot: ServerProcess,
) -> None:
    with httpx.Client(base_url=one_slot.url, timeout=60) as http:
        wait_idle(http)
        before = scrape(http)
        body = {"prompt": "Once upon a time", "max_tokens": 512, "temperature": 0, "stream": True}
        with http.stream("POST", COMPLETIONS, json=body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            refused = http.post(
                CHAT,
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers={"x-request-id": "refused-1"},
            )
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "3"
            assert refused.headers["x-request-id"] == "refused-1"
            assert refused.json() == {
                "error": {
                    "type": "rate_limit_error",
                    "code": "queue_full",
                    "param": None,
                    "message": "the server is at capacity and its queue is full; retry later",
                }
            }
            sdk = openai.OpenAI(base_url=f"{one_slot.url}/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError) as info:
                sdk.completions.create(model=MODEL, prompt="hi", max_tokens=4)
            assert info.value.code == "queue_full"
            # A whole request in one write, as `wrk` sends it (the raw path's case).
            host, port = one_slot.url.rsplit("/", 1)[1].split(":")
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                data = raw_request(CHAT, {"messages": [{"role": "user", "content": "hi"}]},
                                   "x-request-id: raw-1")
                sock.sendall(data)
                received = b""
                while not received.endswith(b"}\n"):
                    chunk = sock.recv(65536)
                    assert chunk, received
                    received += chunk
            head, _, content = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 \r\n") and b"\r\nx-request-id: raw-1" in head
            assert json.loads(content) == refused.json()
            # The stream is still decoding.
            assert next(line for line in lines if line.startswith("data: {"))
        wait_idle(http)
        after = scrape(http)
        assert (
            value(after, "fabricai_fast_refusals_total")
            - value(before, "fabricai_fast_refusals_total")
            == 3
        )
        assert (
            value(after, "fabricai_queue_rejections_total")
            - value(before, "fabricai_queue_rejections_total")
            == 3
        )
        # Not refused any more: the next request runs.
        answer = http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.text)["usage"]["completion_tokens"] >= 1

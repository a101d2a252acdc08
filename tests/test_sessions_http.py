"""The /v1/sessions routes, in process (no model needed), and the generation service's
session races that a real server cannot hit on demand.

Routes run through the whole ASGI app (`create_app`) with httpx's ASGI transport; the
store is a memory store that can be taken down (`hang`: a paused server whose calls
never answer, `refuse`: a stopped one), so the 503 path is exercised for every route.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Literal

import httpx
import pytest
import trio
import trio.testing

from fabricai_trio.app import create_app, run_services
from fabricai_trio.core.engine import ChatPrompt
from fabricai_trio.core.errors import DomainError
from fabricai_trio.core.events import CompleteEvent
from fabricai_trio.core.messages import ChatMessage
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.generation import Generation, GenerationService
from fabricai_trio.sessions import (
    MemorySessionStore,
    Message,
    Session,
    SessionInfo,
    StoreUnavailable,
)
from fabricai_trio.settings import Settings

from .fakes import FakeEngine

STORE_TIMEOUT = 0.3
Mode = Literal["up", "hang", "refuse"]


class FlakyStore(MemorySessionStore):
    """A memory store that can go down like a real one: `hang` (calls never answer)
    or `refuse` (calls fail at once with `StoreUnavailable`)."""

    mode: Mode = "up"

    async def _reachable(self) -> None:
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "refuse":
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("store is down")

    async def create(
        self, owner: str, *, system_prompt: str | None = None, session_id: str | None = None
    ) -> Session:
        await self._reachable()
        return await super().create(owner, system_prompt=system_prompt, session_id=session_id)

    async def get(self, session_id: str) -> Session | None:
        await self._reachable()
        return await super().get(session_id)

    async def list_sessions(self, owner: str) -> list[SessionInfo]:
        await self._reachable()
        return await super().list_sessions(owner)

    async def delete(self, session_id: str, *, incarnation: str | None = None) -> bool:
        await self._reachable()
        return await super().delete(session_id, incarnation=incarnation)

    async def append_turn(
        self, session_id: str, messages: Sequence[Message], *, incarnation: str | None = None
    ) -> Session:
        await self._reachable()
        return await super().append_turn(session_id, messages, incarnation=incarnation)

    async def try_lock(
        self, session_id: str, token: str, ttl_seconds: float, *, incarnation: str = ""
    ) -> bool:
        await self._reachable()
        return await super().try_lock(session_id, token, ttl_seconds, incarnation=incarnation)

    async def unlock(self, session_id: str, token: str, *, incarnation: str = "") -> None:
        await self._reachable()
        await super().unlock(session_id, token, incarnation=incarnation)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "session_store": "memory",
        "store_timeout_seconds": STORE_TIMEOUT,
        "max_body_bytes": 4096,
        "max_concurrent_requests": 2,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture
async def client(store: FlakyStore) -> AsyncIterator[httpx.AsyncClient]:
    config = settings()
    engine = FakeEngine(config)
    await engine.load()
    app = create_app(config, engine=engine, store=store)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(run_services, app)  # what the lifespan starts
        await app.ready.wait()
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c
        nursery.cancel_scope.cancel()


def assert_error(
    response: httpx.Response, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert error["code"] == code
    assert error["message"]
    assert error["param"] == param
    return error


def turn(text: str, finish_reason: Literal["stop", "cancelled"] = "stop") -> list[Message]:
    return [
        Message(role="user", content=f"q {text}", request_id=text),
        Message(role="assistant", content=f"a {text}", finish_reason=finish_reason,
                prompt_tokens=5, completion_tokens=2, request_id=text),
    ]


# --- create ---


async def test_create_without_a_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/sessions")
    assert response.status_code == 201, response.text
    created = response.json()
    assert set(created) == {"object", "id", "owner", "created_at", "updated_at", "message_count"}
    assert created["object"] == "session"
    assert len(created["id"]) == 32
    assert created["owner"] == "anonymous"
    assert created["message_count"] == 0
    assert created["created_at"] == created["updated_at"]
    assert response.headers["location"] == f"/v1/sessions/{created['id']}"
    assert (await client.get(f"/v1/sessions/{created['id']}")).json() == created
    messages = (await client.get(f"/v1/sessions/{created['id']}/messages")).json()
    assert messages == {"object": "list", "session_id": created["id"], "data": []}


async def test_create_with_system_prompt_and_own_id(client: httpx.AsyncClient) -> None:
    body = {"system_prompt": "Answer in French.", "session_id": "chat-1_a"}
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "chat-1_a"
    assert response.json()["message_count"] == 1
    messages = (await client.get("/v1/sessions/chat-1_a/messages")).json()["data"]
    assert [(m["role"], m["content"]) for m in messages] == [("system", "Answer in French.")]
    # An empty JSON object is the same as no body.
    assert (await client.post("/v1/sessions", json={})).status_code == 201
    again = await client.post("/v1/sessions", json={"session_id": "chat-1_a"})
    assert_error(again, 409, "session_exists", "session_id")
    # The refused create did not touch the existing session.
    assert (await client.get("/v1/sessions/chat-1_a")).json()["message_count"] == 1


JSON = {"content-type": "application/json"}
BAD_BODIES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("invalid json", {"content": b"{nope", "headers": {"content-type": "application/json"}},
     400, "invalid_json", None),
    ("not utf-8", {"content": b"\xff\xfe", "headers": JSON}, 400, "invalid_json", None),
    ("array", {"json": ["x"]}, 400, "invalid_body", None),
    ("null", {"content": b"null", "headers": JSON}, 400, "invalid_body", None),
    ("text/plain", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type", "Content-Type"),
    ("unknown field", {"json": {"bogus": 1}}, 422, "invalid_field", "bogus"),
    ("id with a space", {"json": {"session_id": "a b"}}, 422, "invalid_field", "session_id"),
    ("id with a dot", {"json": {"session_id": "a.b"}}, 422, "invalid_field", "session_id"),
    ("id too long", {"json": {"session_id": "x" * 129}}, 422, "invalid_field", "session_id"),
    ("empty id", {"json": {"session_id": ""}}, 422, "invalid_field", "session_id"),
    ("system prompt not a string", {"json": {"system_prompt": 42}}, 422, "invalid_field",
     "system_prompt"),
    ("body too large", {"json": {"system_prompt": "x" * 5000}}, 413, "request_too_large",
     None),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "code", "param"), BAD_BODIES,
                         ids=[case[0] for case in BAD_BODIES])
async def test_create_rejects_bad_input(
    client: httpx.AsyncClient, name: str, kwargs: dict[str, Any], status: int, code: str,
    param: str | None,
) -> None:
    assert_error(await client.post("/v1/sessions", **kwargs), status, code, param)
    assert (await client.get("/v1/sessions")).json()["data"] == []


# --- read and list ---


async def test_list_shows_only_own_sessions_newest_first(
    client: httpx.AsyncClient, store: FlakyStore
) -> None:
    await store.create("someone-else", session_id="theirs")
    first = (await client.post("/v1/sessions", json={"session_id": "first"})).json()
    await trio.sleep(0.01)
    await client.post("/v1/sessions", json={"session_id": "second"})
    await trio.sleep(0.01)
    await store.append_turn("first", turn("t1"))
    listed = (await client.get("/v1/sessions")).json()
    assert listed["object"] == "list"
    assert [s["id"] for s in listed["data"]] == ["first", "second"]
    assert listed["data"][0]["message_count"] == 2
    assert listed["data"][0]["updated_at"] > first["updated_at"]


async def test_messages_in_order_with_how_each_turn_ended(
    client: httpx.AsyncClient, store: FlakyStore
) -> None:
    await store.create("anonymous", system_prompt="sys", session_id="s")
    await store.append_turn("s", turn("one"))
    await store.append_turn("s", turn("two", "cancelled"))
    data = (await client.get("/v1/sessions/s/messages")).json()["data"]
    assert [(m["role"], m["content"]) for m in data] == [
        ("system", "sys"), ("user", "q one"), ("assistant", "a one"),
        ("user", "q two"), ("assistant", "a two"),
    ]
    assert [m["finish_reason"] for m in data] == [None, None, "stop", None, "cancelled"]
    assert data[2]["prompt_tokens"] == 5 and data[2]["completion_tokens"] == 2
    assert data[2]["request_id"] == "one"
    assert (await client.get("/v1/sessions/s")).json()["message_count"] == 5


@pytest.mark.parametrize("session_id", ["nope", "a.b", "x" * 200, "%20"])
async def test_unknown_session_is_404_on_every_route(
    client: httpx.AsyncClient, session_id: str
) -> None:
    for method, path in [
        ("GET", f"/v1/sessions/{session_id}"),
        ("GET", f"/v1/sessions/{session_id}/messages"),
        ("DELETE", f"/v1/sessions/{session_id}"),
    ]:
        response = await client.request(method, path)
        assert_error(response, 404, "session_not_found", "session_id")


async def test_another_owners_session_looks_missing_and_is_untouched(
    client: httpx.AsyncClient, store: FlakyStore
) -> None:
    """403 would tell a caller which ids exist: another identity's session answers
    exactly what a session that never existed answers."""
    await store.create("someone-else", system_prompt="private", session_id="theirs")
    for method, path in [
        ("GET", "/v1/sessions/{}"),
        ("GET", "/v1/sessions/{}/messages"),
        ("DELETE", "/v1/sessions/{}"),
    ]:
        theirs = await client.request(method, path.format("theirs"))
        missing = await client.request(method, path.format("never-made"))
        error = assert_error(theirs, 404, "session_not_found", "session_id")
        assert (theirs.status_code, theirs.headers.get("content-type"), theirs.content) == (
            missing.status_code, missing.headers.get("content-type"), missing.content)
        assert "private" not in json.dumps(error)
    assert await store.get("theirs") is not None


# --- delete ---


async def test_delete_then_gone(client: httpx.AsyncClient) -> None:
    await client.post("/v1/sessions", json={"session_id": "doomed", "system_prompt": "x"})
    response = await client.delete("/v1/sessions/doomed")
    assert response.status_code == 204
    assert "content-type" not in response.headers
    assert response.content == b""
    assert_error(await client.get("/v1/sessions/doomed"), 404, "session_not_found",
                 "session_id")
    assert_error(await client.delete("/v1/sessions/doomed"), 404, "session_not_found",
                 "session_id")
    assert (await client.get("/v1/sessions")).json()["data"] == []
    # The id is free again.
    assert (await client.post("/v1/sessions", json={"session_id": "doomed"})).status_code == 201


async def test_wrong_method_is_405_in_the_error_format(client: httpx.AsyncClient) -> None:
    assert_error(await client.put("/v1/sessions/x"), 405, "method_not_allowed")
    assert_error(await client.delete("/v1/sessions"), 405, "method_not_allowed")


# --- store down ---


@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_store_down_is_503_promptly_on_every_route(
    client: httpx.AsyncClient, store: FlakyStore, mode: Mode,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Measured on the virtual trio clock, so the machine's speed does not matter: a hung
    store is given up on after exactly one STORE_TIMEOUT_SECONDS."""
    await store.create("anonymous", session_id="mine")
    store.mode = mode
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/sessions", {}),
        ("POST", "/v1/sessions", {"json": {"session_id": "new-one"}}),
        ("GET", "/v1/sessions", {}),
        ("GET", "/v1/sessions/mine", {}),
        ("GET", "/v1/sessions/mine/messages", {}),
        ("DELETE", "/v1/sessions/mine", {}),
        ("POST", "/v1/inference_sse", {"json": {"prompt": "hi", "session_id": "mine"}}),
    ]
    for method, path, kwargs in calls:
        started = trio.current_time()
        response = await client.request(method, path, **kwargs)
        elapsed = trio.current_time() - started
        error = assert_error(response, 503, "session_store_unavailable")
        assert error["type"] == "unavailable_error"
        assert response.headers["retry-after"] == "1"
        # One store timeout when it hangs, no wait at all when it refuses.
        expected = STORE_TIMEOUT if mode == "hang" else 0.0
        assert elapsed == pytest.approx(expected), (method, path, elapsed)
    # Without a session the store is not needed: generations still stream.
    response = await client.post("/v1/inference_sse", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 200
    assert "event: complete" in response.text
    # Back up: the same session is there, nothing was deleted or created while down.
    store.mode = "up"
    assert (await client.get("/v1/sessions/mine")).status_code == 200
    assert [s["id"] for s in (await client.get("/v1/sessions")).json()["data"]] == ["mine"]


# --- the generation service's session races (fake engine, in process) ---


class RenderingEngine(FakeEngine):
    """Remembers every chat it rendered, so a test can see what a prompt contained."""

    def __init__(self, config: Settings) -> None:
        super().__init__(config, step_seconds=0.001)
        self.rendered: list[str] = []

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        prompt = super().format_chat(messages)
        self.rendered.append(prompt.text)
        return prompt


class SlowReadStore(MemorySessionStore):
    """Reads return late, as from a thread-backed store (Redis, SQL): another request
    can write between the moment a read is taken and the moment its caller sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.read_delay = 0.0

    async def get(self, session_id: str) -> Session | None:
        found = await super().get(session_id)
        await trio.sleep(self.read_delay)
        return found


@pytest.fixture
async def service() -> AsyncIterator[tuple[GenerationService, SlowReadStore, RenderingEngine]]:
    config = settings(session_autocreate=True, max_concurrent_requests=2)
    engine = RenderingEngine(config)
    await engine.load()
    store = SlowReadStore()
    app = create_app(config, engine=engine, store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_services, app)
        await app.ready.wait()
        yield app.state.service, store, engine
        nursery.cancel_scope.cancel()


async def run_to_end(generation: Generation) -> CompleteEvent:
    async with aclosing(generation.events()) as events:
        last = [e async for e in events][-1]
    assert isinstance(last, CompleteEvent)
    return last


async def test_a_turn_sees_the_turn_that_finished_while_it_waited(
    service: tuple[GenerationService, SlowReadStore, RenderingEngine],
    autojump_clock: trio.testing.MockClock,  # the delays below order the tasks exactly
) -> None:
    """A turn must be built from the history as it is once it holds the lock: a turn
    that ends while the next one is still reading must be in the next one's prompt."""
    svc, store, engine = service
    await store.create("alice", session_id="s")
    first = await svc.prepare(
        GenerationRequest(prompt="first question", session_id="s", max_tokens=3),
        owner="alice",
    )
    store.read_delay = 0.2
    second: list[Generation] = []

    async def prepare_second() -> None:
        second.append(await svc.prepare(
            GenerationRequest(prompt="second question", session_id="s", max_tokens=3),
            owner="alice",
        ))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare_second)
        await trio.sleep(0.05)  # the second request has read the history: not turn 1
        first_reply = (await run_to_end(first)).text
    await run_to_end(second[0])
    assert "first question" in engine.rendered[-1]
    assert first_reply in engine.rendered[-1]
    session = await store.get("s")
    assert session is not None
    assert [m.content for m in session.messages if m.role == "user"] == [
        "first question", "second question",
    ]


async def test_concurrent_first_use_with_autocreate_is_one_turn_and_one_409(
    service: tuple[GenerationService, SlowReadStore, RenderingEngine],
    autojump_clock: trio.testing.MockClock,  # the delays below order the tasks exactly
) -> None:
    """Two requests create the same new session at once: one streams, one is busy."""
    svc, store, _ = service
    store.read_delay = 0.05  # both read "no such session" before either creates it
    outcomes: list[Generation | DomainError] = []

    async def one(text: str) -> None:
        try:
            outcomes.append(await svc.prepare(
                GenerationRequest(prompt=text, session_id="fresh", max_tokens=2), owner="bob"
            ))
        except DomainError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "a")
        nursery.start_soon(one, "b")
    errors = [o for o in outcomes if isinstance(o, DomainError)]
    generations = [o for o in outcomes if isinstance(o, Generation)]
    assert [(e.status_hint, e.code) for e in errors] == [(409, "session_busy")]
    assert len(generations) == 1
    await run_to_end(generations[0])
    session = await store.get("fresh")
    assert session is not None and session.owner == "bob"
    assert [m.role for m in session.messages] == ["user", "assistant"]


@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_a_lock_left_by_an_outage_is_released_when_the_store_returns(
    store: FlakyStore, mode: Mode, autojump_clock: trio.testing.MockClock
) -> None:
    """A generation that ends while the store is down cannot release its lock; the
    session must not stay busy for SESSION_LOCK_SECONDS once the store is back."""
    config = settings(session_lock_seconds=600.0)
    engine = FakeEngine(config, step_seconds=0.001)
    await engine.load()
    app = create_app(config, engine=engine, store=store)
    svc = app.state.service
    await store.create("alice", session_id="s")
    async with trio.open_nursery() as nursery:
        await nursery.start(run_services, app)
        await app.ready.wait()
        request = GenerationRequest(prompt="before", session_id="s", max_tokens=2)
        await run_to_end(await svc.prepare(request, owner="alice"))
        during = await svc.prepare(
            GenerationRequest(prompt="during", session_id="s", max_tokens=2), owner="alice"
        )
        store.mode = mode  # the store goes down mid-generation
        await run_to_end(during)  # the turn cannot be stored, the lock not released
        store.mode = "up"
        after = await svc.prepare(
            GenerationRequest(prompt="after", session_id="s", max_tokens=2), owner="alice"
        )
        await run_to_end(after)
        nursery.cancel_scope.cancel()
    session = await store.get("s")
    assert session is not None
    assert [m.content for m in session.messages if m.role == "user"] == ["before", "after"]


async def test_the_turn_is_stored_before_complete_is_sent(
    service: tuple[GenerationService, SlowReadStore, RenderingEngine],
) -> None:
    """`complete` means done: the turn is stored, the lock and the slot are free."""
    svc, store, _ = service
    await store.create("alice", session_id="s")
    generation = await svc.prepare(
        GenerationRequest(prompt="q", session_id="s", max_tokens=2), owner="alice"
    )
    async with aclosing(generation.events()) as events:
        async for event in events:
            if isinstance(event, CompleteEvent):
                session = await store.get("s")
                assert session is not None
                assert [m.role for m in session.messages] == ["user", "assistant"]
                assert session.messages[1].content == event.text
                assert svc.models.default.admission.stats().active == 0
                assert await store.try_lock("s", "next-turn", 5.0)
                break
        else:
            raise AssertionError("no complete event")

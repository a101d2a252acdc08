"""The session store contract: one suite, run on every backend (see conftest `BACKENDS`).

A backend is correct when it passes all of it; the server relies on nothing else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import trio
import trio.testing

from fabricai_trio.sessions import (
    Message,
    Session,
    SessionExists,
    SessionFull,
    SessionNotFound,
    SessionStore,
    StoreLimits,
    StoreUnavailable,
    TooManySessions,
)

from .conftest import StoreFactory

# Real sleeps in the TTL tests: long enough to be robust on a busy machine, short enough
# to keep the suite fast.
TTL = 2.0


def turn(tag: str, *, content: str = "hello") -> list[Message]:
    """A user message and its assistant reply, both tagged with `request_id=tag`."""
    return [
        Message(role="user", content=f"{content} {tag}", request_id=tag),
        Message(
            role="assistant",
            content=f"reply {tag}",
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
            request_id=tag,
        ),
    ]


def landed_turns(session: Session, skip: int = 0) -> list[str]:
    """The tags of the turns in `session` (after `skip` messages), checking that each
    turn is whole: its user message directly followed by its assistant message."""
    rest = session.messages[skip:]
    assert len(rest) % 2 == 0, [m.request_id for m in rest]
    tags = []
    for user, assistant in zip(rest[::2], rest[1::2], strict=True):
        assert (user.role, assistant.role) == ("user", "assistant")
        assert user.request_id is not None and user.request_id == assistant.request_id
        tags.append(user.request_id)
    assert len(tags) == len(set(tags)), "a turn landed twice"
    return tags


# --- create / get / list / delete ---


async def test_satisfies_protocol(store: SessionStore) -> None:
    assert isinstance(store, SessionStore)
    assert store.backend in ("memory", "redis", "sql")
    assert await store.ping() is True


async def test_create_and_get(store: SessionStore, owner: str) -> None:
    before = time.time()
    created = await store.create(owner, system_prompt="You are terse.")
    assert len(created.id) == 32 and int(created.id, 16) >= 0  # uuid4 hex
    assert created.owner == owner
    assert before - 1 <= created.created_at == created.updated_at <= time.time() + 1
    assert [(m.role, m.content) for m in created.messages] == [("system", "You are terse.")]
    assert await store.get(created.id) == created

    bare = await store.create(owner)
    assert bare.messages == ()
    assert await store.get(bare.id) == bare


async def test_create_with_id_and_duplicate(store: SessionStore, owner: str) -> None:
    sid = f"chat-{owner}"
    created = await store.create(owner, session_id=sid)
    assert created.id == sid
    with pytest.raises(SessionExists):
        await store.create(owner, session_id=sid, system_prompt="other")
    with pytest.raises(SessionExists):
        await store.create("someone-else", session_id=sid)
    assert await store.get(sid) == created  # the failed creates changed nothing


async def test_unknown_and_malformed_ids(store: SessionStore, owner: str) -> None:
    # `:` and `.` are not in the id pattern: "x:messages" would name Redis's message
    # list of session "x" (a 500 once); it names nothing now, on every backend.
    named = await store.create(owner, system_prompt="s")
    for sid in ("0" * 32, "no such session", "", "x" * 500, f"{named.id}:messages",
                f"{named.id}.x", "a\n"):
        assert await store.get(sid) is None
        with pytest.raises(SessionNotFound):
            await store.append_turn(sid, turn("t"))
        assert await store.delete(sid) is False
        await store.unlock(sid, "token")  # harmless
    for bad in ("has space", "has:colon", "has.dot", "x" * 129):
        with pytest.raises(ValueError):
            await store.create(owner, session_id=bad)
    with pytest.raises(ValueError):
        await store.create("")
    with pytest.raises(ValueError):
        await store.try_lock("has space", "token", 1.0)
    assert await store.list_sessions("nobody-" + owner) == []


async def test_list_sessions_by_owner(store: SessionStore, owner: str) -> None:
    other = owner + "-other"
    first = await store.create(owner, system_prompt="s")
    second = await store.create(owner)
    theirs = await store.create(other)
    await trio.sleep(0.01)
    await store.append_turn(first.id, turn("a"))  # first is now the most recent

    mine = await store.list_sessions(owner)
    assert [info.id for info in mine] == [first.id, second.id]
    assert [info.message_count for info in mine] == [3, 0]
    assert all(info.owner == owner for info in mine)
    assert mine[0].updated_at > mine[0].created_at
    assert [info.id for info in await store.list_sessions(other)] == [theirs.id]


async def test_delete(store: SessionStore, owner: str) -> None:
    kept = await store.create(owner)
    gone = await store.create(owner, system_prompt="s")
    await store.append_turn(gone.id, turn("a"))
    assert await store.delete(gone.id) is True
    assert await store.get(gone.id) is None
    assert await store.delete(gone.id) is False
    with pytest.raises(SessionNotFound):
        await store.append_turn(gone.id, turn("b"))
    assert [info.id for info in await store.list_sessions(owner)] == [kept.id]
    # The id is free again, and starts empty.
    again = await store.create(owner, session_id=gone.id)
    assert again.messages == ()
    assert (await store.get(gone.id)) == again


# --- append_turn ---


async def test_append_turn_keeps_order_and_fields(store: SessionStore, owner: str) -> None:
    session = await store.create(owner, system_prompt="sys")
    odd = 'héllo ✓ \x00 nul, "quotes", \n newline, 🙂'
    turns = [turn("t1"), turn("t2", content=odd), turn("t3")]
    last_update = session.updated_at
    for messages in turns:
        await trio.sleep(0.002)
        after = await store.append_turn(session.id, messages)
        assert after.updated_at >= last_update
        last_update = after.updated_at
        assert after == await store.get(session.id)
    stored = await store.get(session.id)
    assert stored is not None
    assert stored.messages == (session.messages[0], *(m for t in turns for m in t))
    assert stored.created_at == session.created_at
    assert stored.updated_at > session.created_at
    assert landed_turns(stored, skip=1) == ["t1", "t2", "t3"]


async def test_bad_turn_writes_nothing(store: SessionStore, owner: str) -> None:
    session = await store.create(owner, system_prompt="sys")
    good = turn("ok")[0]
    bogus = Message.model_construct(role="robot", content="x")  # type: ignore[arg-type]  # invalid on purpose
    bad_turns: list[Any] = [[], [good, "not a message"], [good, {"role": "user"}], [good, bogus]]
    for bad in bad_turns:
        with pytest.raises((TypeError, ValueError)):
            await store.append_turn(session.id, bad)
    assert await store.get(session.id) == session


async def test_injected_failure_writes_nothing(store: SessionStore, owner: str) -> None:
    """A failure in the middle of the write (after part of it has been sent to the
    backend, where the backend allows it) leaves the session as it was."""
    session = await store.create(owner, system_prompt="sys")
    await store.append_turn(session.id, turn("before"))
    before = await store.get(session.id)
    with fail_inside_write(store) as expected, pytest.raises(expected):
        await store.append_turn(session.id, turn("failing"))
    assert await store.get(session.id) == before
    await store.append_turn(session.id, turn("after"))  # and the store still works
    after = await store.get(session.id)
    assert after is not None and landed_turns(after, skip=1) == ["before", "after"]


@contextmanager
def fail_inside_write(store: SessionStore) -> Iterator[type[Exception]]:
    """Make turn writes fail half-way, the way each backend can fail; yields the error
    the store then raises."""
    if store.backend == "sql":
        from sqlalchemy import event

        engine = store.engine  # type: ignore[attr-defined]

        def fail_after_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # The session row is updated and the messages inserted: fail the read-back.
            if statement.lstrip().upper().startswith("SELECT MESSAGES"):
                raise RuntimeError("injected failure")

        event.listen(engine, "before_cursor_execute", fail_after_insert)
        try:
            yield RuntimeError
        finally:
            event.remove(engine, "before_cursor_execute", fail_after_insert)
    elif store.backend == "redis":
        from .redis_faults import cut_transactions

        with cut_transactions():
            yield StoreUnavailable
    else:
        import types

        import fabricai_trio.sessions.memory as memory

        def broken_clock() -> float:
            raise RuntimeError("injected failure")

        # The memory store reads the wall clock while building the new session state.
        real = memory.time  # type: ignore[attr-defined]
        memory.time = types.SimpleNamespace(time=broken_clock)  # type: ignore[attr-defined,assignment]
        try:
            yield RuntimeError
        finally:
            memory.time = real  # type: ignore[attr-defined]


# --- TTL ---


async def test_ttl_expiry_and_refresh(make_store: StoreFactory, owner: str) -> None:
    store = make_store(ttl_seconds=TTL)
    session = await store.create(owner, system_prompt="sys")
    doomed = await store.create(owner)
    # Each wait leaves about half a TTL for the calls after it on a busy machine: the
    # store's clock is the wall clock (Redis, SQL); delays only make expiries later.
    await trio.sleep(0.52 * TTL)
    await store.append_turn(session.id, turn("refresh"))  # a write refreshes the TTL
    await trio.sleep(0.52 * TTL)  # 1.04 TTL after create, 0.52 TTL after the write
    assert await store.get(doomed.id) is None
    alive = await store.get(session.id)
    assert alive is not None and len(alive.messages) == 3
    assert [info.id for info in await store.list_sessions(owner)] == [session.id]
    await trio.sleep(0.52 * TTL)  # 1.04 TTL after the last write (reads do not refresh)
    assert await store.get(session.id) is None
    assert await store.list_sessions(owner) == []
    with pytest.raises(SessionNotFound):
        await store.append_turn(session.id, turn("late"))
    assert await store.delete(session.id) is False
    # An expired id can be created again, empty.
    again = await store.create(owner, session_id=session.id)
    assert again.messages == ()


# --- lock ---


async def test_lock_is_exclusive(store: SessionStore, owner: str) -> None:
    sid = (await store.create(owner)).id
    assert await store.try_lock(sid, "a", 30) is True
    assert await store.try_lock(sid, "b", 30) is False
    assert await store.try_lock(sid, "a", 30) is False  # not re-entrant
    await store.unlock(sid, "b")  # wrong token: no effect
    assert await store.try_lock(sid, "b", 30) is False
    await store.unlock(sid, "a")
    assert await store.try_lock(sid, "b", 30) is True
    await store.unlock(sid, "b")
    await store.unlock(sid, "b")  # releasing twice is harmless
    # Locks are per session.
    other = (await store.create(owner)).id
    assert await store.try_lock(sid, "c", 30) is True
    assert await store.try_lock(other, "d", 30) is True


async def test_lock_expires(store: SessionStore, owner: str) -> None:
    sid = (await store.create(owner)).id
    # Lock TTLs are wall-clock in Redis and SQL: 1 s leaves a busy machine a second
    # between the first two calls; after the sleep it has expired whatever the delays.
    assert await store.try_lock(sid, "crashed-worker", 1.0) is True
    assert await store.try_lock(sid, "b", 30) is False
    await trio.sleep(1.3)
    assert await store.try_lock(sid, "b", 30) is True
    await store.unlock(sid, "crashed-worker")  # the late unlock must not free b's lock
    assert await store.try_lock(sid, "c", 30) is False


async def test_concurrent_try_lock_has_one_winner(store: SessionStore, owner: str) -> None:
    sid = (await store.create(owner)).id
    winners: list[str] = []

    async def contend(token: str) -> None:
        if await store.try_lock(sid, token, 30):
            winners.append(token)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(contend, f"t{i}")
    assert len(winners) == 1


# --- concurrency and cancellation ---


async def test_concurrent_turns_all_land(store: SessionStore, owner: str) -> None:
    session = await store.create(owner, system_prompt="sys")
    tags = [f"c{i}" for i in range(40)]
    async with trio.open_nursery() as nursery:
        for tag in tags:
            nursery.start_soon(store.append_turn, session.id, turn(tag))
    stored = await store.get(session.id)
    assert stored is not None
    assert sorted(landed_turns(stored, skip=1)) == sorted(tags)
    (info,) = await store.list_sessions(owner)
    assert info.message_count == 1 + 2 * len(tags)


async def test_cancel_before_start_writes_nothing(store: SessionStore, owner: str) -> None:
    session = await store.create(owner, system_prompt="sys")
    with trio.move_on_after(0) as scope:
        await store.append_turn(session.id, turn("never"))
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.create(owner, session_id=f"never-{owner}")
    assert await store.get(session.id) == session
    assert await store.get(f"never-{owner}") is None


async def test_cancel_after_start_completes_the_write(store: SessionStore, owner: str) -> None:
    """Cancelled while the backend is writing: the call still finishes and returns."""
    session = await store.create(owner, system_prompt="sys")
    results: list[Session] = []

    async def write() -> None:
        results.append(await store.append_turn(session.id, turn("started")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()  # in the thread (or already done)
        nursery.cancel_scope.cancel()
    stored = await store.get(session.id)
    assert stored is not None and landed_turns(stored, skip=1) == ["started"]
    assert results == [stored]


async def test_cancel_at_random_points(store: SessionStore, owner: str) -> None:
    """Cancel turn writes at random moments, alone and in a crowd: every turn is whole or
    absent, none twice, and the store keeps working."""
    session = await store.create(owner, system_prompt="sys")
    rng = random.Random(1234)
    attempted: list[str] = []
    for i in range(15):
        tag = f"seq{i}"
        attempted.append(tag)
        with trio.move_on_after(rng.uniform(0, 0.004)):
            await store.append_turn(session.id, turn(tag))
    for round_ in range(3):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                tag = f"crowd{round_}-{i}"
                attempted.append(tag)
                nursery.start_soon(store.append_turn, session.id, turn(tag))
            await trio.sleep(rng.uniform(0, 0.01))
            nursery.cancel_scope.cancel()
    await store.append_turn(session.id, turn("final"))
    stored = await store.get(session.id)
    assert stored is not None
    tags = landed_turns(stored, skip=1)
    assert tags[-1] == "final"
    assert set(tags) <= {*attempted, "final"}


@pytest.mark.parametrize(
    "call",
    [
        lambda s, sid: s.get(sid),
        lambda s, sid: s.append_turn(sid, turn("cp")),
        lambda s, sid: s.list_sessions("x"),
        lambda s, sid: s.try_lock(sid, "t", 5),
        lambda s, sid: s.unlock(sid, "t"),
        lambda s, sid: s.delete(sid),
    ],
    ids=["get", "append_turn", "list_sessions", "try_lock", "unlock", "delete"],
)
async def test_every_call_is_a_checkpoint(
    store: SessionStore, owner: str, call: Callable[[SessionStore, str], Any]
) -> None:
    sid = (await store.create(owner)).id
    with trio.testing.assert_checkpoints():
        await call(store, sid)


# --- incarnations: a deleted session and one created again under its id are two ---


async def test_every_create_is_a_new_incarnation(store: SessionStore, owner: str) -> None:
    sid = f"team-chat-{owner}"
    first = await store.create(owner, session_id=sid)
    assert len(first.incarnation) == 32
    assert (await store.get(sid)) == first
    assert await store.delete(sid) is True
    second = await store.create(owner + "-2", session_id=sid)
    assert second.incarnation != first.incarnation
    assert (await store.get(sid)) == second


async def test_a_turn_for_a_deleted_incarnation_never_lands_in_the_new_one(
    store: SessionStore, owner: str
) -> None:
    sid = f"team-chat-{owner}"
    old = await store.create(owner, session_id=sid)
    await store.append_turn(sid, turn("kept"), incarnation=old.incarnation)
    await store.delete(sid)
    new = await store.create(owner + "-other", session_id=sid, system_prompt="theirs")
    with pytest.raises(SessionNotFound):
        await store.append_turn(sid, turn("stale"), incarnation=old.incarnation)
    stored = await store.get(sid)
    assert stored is not None and stored.incarnation == new.incarnation
    assert [m.content for m in stored.messages] == ["theirs"]
    after = await store.append_turn(sid, turn("theirs"), incarnation=new.incarnation)
    assert landed_turns(after, skip=1) == ["theirs"]


async def test_delete_of_a_stale_incarnation_leaves_the_new_one(
    store: SessionStore, owner: str
) -> None:
    sid = f"team-chat-{owner}"
    old = await store.create(owner, session_id=sid)
    await store.delete(sid, incarnation=old.incarnation)
    new = await store.create(owner + "-other", session_id=sid)
    assert await store.delete(sid, incarnation=old.incarnation) is False
    assert await store.get(sid) == new
    assert await store.delete(sid, incarnation=new.incarnation) is True


async def test_locks_are_per_incarnation(store: SessionStore, owner: str) -> None:
    sid = f"team-chat-{owner}"
    old = await store.create(owner, session_id=sid)
    assert await store.try_lock(sid, "old", 60, incarnation=old.incarnation)
    await store.delete(sid)
    new = await store.create(owner + "-other", session_id=sid)
    # The stale generation's lock does not make the new session busy…
    assert await store.try_lock(sid, "new", 60, incarnation=new.incarnation)
    assert not await store.try_lock(sid, "again", 60, incarnation=new.incarnation)
    # …and its unlock does not free the new session's lock.
    await store.unlock(sid, "old", incarnation=old.incarnation)
    assert not await store.try_lock(sid, "again", 60, incarnation=new.incarnation)
    await store.unlock(sid, "new", incarnation=new.incarnation)
    assert await store.try_lock(sid, "again", 60, incarnation=new.incarnation)


async def test_concurrent_turns_race_a_delete_and_recreate(
    store: SessionStore, owner: str
) -> None:
    """Turns of the old incarnation racing delete + create: none lands in the new one."""
    sid = f"race-{owner}"
    old = await store.create(owner, session_id=sid)
    new: list[Session] = []

    async def stale(i: int) -> None:
        with suppress(SessionNotFound):
            await store.append_turn(sid, turn(f"old{i}"), incarnation=old.incarnation)

    async def replace() -> None:
        await store.delete(sid)
        new.append(await store.create(owner + "-b", session_id=sid))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(stale, i)
        nursery.start_soon(replace)
    stored = await store.get(sid)
    assert stored is not None and stored.incarnation == new[0].incarnation
    assert stored.messages == ()


# --- limits ---


async def test_sessions_per_owner_cap(make_store: StoreFactory, owner: str) -> None:
    store = make_store(limits=StoreLimits(max_sessions_per_owner=3))
    made = [await store.create(owner) for _ in range(3)]
    with pytest.raises(TooManySessions):
        await store.create(owner)
    with pytest.raises(TooManySessions):
        await store.create(owner, session_id=f"named-{owner}")
    await store.create(owner + "-other")  # per owner: another one is not counted
    await store.delete(made[0].id)
    await store.create(owner)  # a deleted session frees its place
    with pytest.raises(TooManySessions):
        await store.create(owner)
    assert len(await store.list_sessions(owner)) == 3


async def test_sessions_per_owner_cap_under_concurrent_creates(
    make_store: StoreFactory, owner: str
) -> None:
    store = make_store(limits=StoreLimits(max_sessions_per_owner=4))
    refused = 0

    async def create() -> None:
        nonlocal refused
        try:
            await store.create(owner)
        except TooManySessions:
            refused += 1

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(create)
    assert (len(await store.list_sessions(owner)), refused) == (4, 8)


async def test_session_bytes_cap(make_store: StoreFactory, owner: str) -> None:
    store = make_store(limits=StoreLimits(max_session_bytes=100))
    with pytest.raises(SessionFull):
        await store.create(owner, system_prompt="é" * 51)  # 102 bytes in UTF-8
    session = await store.create(owner, system_prompt="s" * 60)
    user = Message(role="user", content="u" * 30, request_id="a")
    reply = Message(role="assistant", content="r" * 500, request_id="a")
    # 60 + 30 <= 100: let in; the reply is always kept (it was already generated).
    stored = await store.append_turn(session.id, [user, reply])
    assert len(stored.messages) == 3
    with pytest.raises(SessionFull):  # the session is past its cap: nothing more
        await store.append_turn(session.id, [Message(role="user", content="x")])
    after = await store.get(session.id)
    assert after is not None and len(after.messages) == 3  # nothing written


async def test_memory_store_total_cap() -> None:
    from fabricai_trio.sessions import MemorySessionStore, StoreFull

    store = MemorySessionStore(limits=StoreLimits(max_total_bytes=12_000))
    first = await store.create("a", system_prompt="x" * 4000)
    second = await store.create("b", system_prompt="x" * 4000)
    assert store.total_bytes == 2 * (4000 + 1024)
    with pytest.raises(StoreFull):
        await store.create("c", system_prompt="x" * 4000)
    with pytest.raises(StoreFull):
        await store.append_turn(second.id, [Message(role="user", content="y" * 2000)])
    await store.delete(first.id)
    await store.create("c", system_prompt="x" * 4000)
    assert store.total_bytes == 2 * (4000 + 1024)

"""Socket.IO server tests: raw v5 packets over the Engine.IO websocket, no sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from fabricai_trio.realtime.asgi import Scope
from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.conformance import build_socketio
from fabricai_trio.realtime.errors import ClientGone, ConnectionRefused
from fabricai_trio.realtime.pubsub import LocalPubSub
from fabricai_trio.realtime.sio_server import DisconnectReason, SocketIOServer

from .asgi_harness import WsCall, http, ws_call

REF = RealtimeConfig.reference()


class Client:
    """Socket.IO packets over one harness websocket; answers pings by itself."""

    def __init__(self, ws: WsCall) -> None:
        self.ws = ws

    async def send(self, packet: str | bytes) -> None:
        await self.ws.send("4" + packet if isinstance(packet, str) else packet)

    async def recv(self) -> str | bytes:
        while True:
            frame = await self.ws.receive()
            if frame == "2":
                await self.ws.send("3")
                continue
            if isinstance(frame, str):
                assert frame[0] == "4", frame
                return frame[1:]
            return frame

    def pending(self) -> list[str | bytes]:
        """Frames already received, pings left out."""
        return [f for f in self.ws.pending() if f != "2"]

    async def connect(self, namespace: str = "/", auth: str = "") -> str:
        prefix = "" if namespace == "/" else namespace + ","
        await self.send("0" + prefix + auth)
        reply = await self.recv()
        assert isinstance(reply, str) and reply.startswith("0" + prefix), reply
        sid: str = json.loads(reply[1 + len(prefix) :])["sid"]
        return sid


async def open_client(app: Any, nursery: trio.Nursery) -> Client:
    ws = ws_call(app, "EIO=4&transport=websocket")
    await nursery.start(ws.run)
    handshake = await ws.receive()
    assert isinstance(handshake, str) and handshake.startswith("0")
    return Client(ws)


@pytest.fixture
async def ref_server() -> AsyncIterator[SocketIOServer]:
    server = build_socketio(REF)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


# --- the v5 reference behaviour --------------------------------------------------------


async def test_connect_main_namespace(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect()
        assert await c.recv() == '2["auth",{}]'
        nursery.cancel_scope.cancel()


async def test_connect_with_payload_and_custom_namespace(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect(auth='{"token":"123"}')
        assert await c.recv() == '2["auth",{"token":"123"}]'
        await c.connect("/custom", auth='{"token":"abc"}')
        assert await c.recv() == '2/custom,["auth",{"token":"abc"}]'
        nursery.cancel_scope.cancel()


async def test_unknown_namespace_is_connect_error(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.send("0/random")
        assert await c.recv() == '4/random,{"message":"Invalid namespace"}'
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("first", ["abc", '2["message","x"]'])
async def test_first_packet_must_be_connect(ref_server: SocketIOServer, first: str) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.send(first)
        assert await c.ws.wait_closed() is not None
        assert "1" in c.ws.pending()  # Engine.IO CLOSE, then the websocket closes


async def test_no_connect_closes_after_connect_timeout(
    ref_server: SocketIOServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ws = ws_call(ref_server.asgi_app, "EIO=4&transport=websocket")
        await nursery.start(ws.run)
        await ws.receive()
        start = trio.current_time()
        while not ws.closed.is_set():
            frame = await ws.receive()
            if frame == "2":
                await ws.send("3")
            elif frame == "1":
                break
        await ws.wait_closed()
        assert 1.0 <= trio.current_time() - start < 1.5


async def test_disconnect_main_keeps_the_session(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect()
        await c.recv()
        await c.send("1")
        assert await c.ws.receive() == "2"  # a ping: the Engine.IO session lives on
        nursery.cancel_scope.cancel()


async def test_custom_namespace_connect_then_disconnect(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect()
        await c.recv()
        await c.connect("/custom")
        await c.recv()
        await c.send("1/custom,")
        await c.send('2["message","message to main namespace"]')
        assert await c.recv() == '2["message-back","message to main namespace"]'
        nursery.cancel_scope.cancel()


async def test_messages_acks_and_binary(ref_server: SocketIOServer) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect()
        await c.recv()
        await c.send('2["message",1,"2",{"3":[true]}]')
        assert await c.recv() == '2["message-back",1,"2",{"3":[true]}]'
        await c.send('2456["message-with-ack",1,"2",{"3":[false]}]')
        assert await c.recv() == '3456[1,"2",{"3":[false]}]'
        placeholders = '{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}'
        await c.send(f'52-["message",{placeholders}]')
        await c.send(b"\x01\x02\x03")
        await c.send(b"\x04\x05\x06")
        assert await c.recv() == f'52-["message-back",{placeholders}]'
        assert await c.recv() == b"\x01\x02\x03"
        assert await c.recv() == b"\x04\x05\x06"
        await c.send(f'52-789["message-with-ack",{placeholders}]')
        await c.send(b"\x01\x02\x03")
        await c.send(b"\x04\x05\x06")
        assert await c.recv() == f"62-789[{placeholders}]"
        assert await c.recv() == b"\x01\x02\x03"
        assert await c.recv() == b"\x04\x05\x06"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad", ["abc", "2{}", '2abc["message-with-ack",1]'])
async def test_invalid_format_closes(ref_server: SocketIOServer, bad: str) -> None:
    async with trio.open_nursery() as nursery:
        c = await open_client(ref_server.asgi_app, nursery)
        await c.connect()
        await c.recv()
        await c.send(bad)
        assert await c.ws.wait_closed() is not None


async def test_polling_session(ref_server: SocketIOServer) -> None:
    app = ref_server.asgi_app
    r = await http(app, "EIO=4&transport=polling")
    sid = json.loads(r.text[1:])["sid"]
    q = f"EIO=4&transport=polling&sid={sid}"
    assert (await http(app, q, method="POST", body="40")).text == "ok"
    body = (await http(app, q)).text
    assert body.startswith("40{") and body.endswith('\x1e42["auth",{}]')
    burst = "\x1e".join(f'42["message",{i}]' for i in range(50))
    assert (await http(app, q, method="POST", body=burst)).text == "ok"
    got: list[str] = []
    while len(got) < 50:
        got += [p for p in (await http(app, q)).text.split("\x1e") if p != "2"]
    assert got == [f'42["message-back",{i}]' for i in range(50)]


# --- the application API ---------------------------------------------------------------


async def run_server(server: SocketIOServer, nursery: trio.Nursery) -> None:
    await nursery.start(server.run)


async def test_connection_refused_carries_message_and_data() -> None:
    server = SocketIOServer(REF)

    @server.on("connect")
    async def connect(sid: str, auth: dict[str, Any] | None, scope: Scope) -> None:
        assert scope["type"] == "websocket"
        raise ConnectionRefused("Not authorized", {"code": 401})

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        await c.send("0")
        assert await c.recv() == '4{"message":"Not authorized","data":{"code":401}}'
        nursery.cancel_scope.cancel()


async def test_disconnect_cancels_handlers_and_reports_reason() -> None:
    server = SocketIOServer(REF)
    started, cancelled = trio.Event(), trio.Event()
    reasons: list[tuple[str, DisconnectReason]] = []

    @server.on("work")
    async def work(sid: str) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    @server.on("disconnect")
    async def disconnect(sid: str, reason: DisconnectReason) -> None:
        reasons.append((sid, reason))

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        sid = await c.connect()
        await c.send('2["work"]')
        with trio.fail_after(2):
            await started.wait()
        await c.ws.disconnect()
        with trio.fail_after(2):
            await cancelled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert reasons == [(sid, DisconnectReason.TRANSPORT_CLOSE)]
        with pytest.raises(ClientGone):
            server.session_data(sid)
        nursery.cancel_scope.cancel()


async def test_disconnect_handler_runs_once_when_leave_and_close_arrive_together() -> None:
    """A POST carrying a namespace DISCONNECT and the Engine.IO CLOSE (what
    python-socketio's `disconnect()` sends over polling): whichever of the two the server
    handles first, the disconnect handler runs exactly once. Trio schedules the reader
    and the session task in a random order, so a few rounds cover both."""
    for _ in range(20):
        server = SocketIOServer(REF)
        reasons: list[DisconnectReason] = []

        @server.on("disconnect")
        async def disconnect(sid: str, reason: DisconnectReason) -> None:
            reasons.append(reason)  # noqa: B023 - each round has its own list

        async with trio.open_nursery() as nursery:
            await run_server(server, nursery)
            app = server.asgi_app
            r = await http(app, "EIO=4&transport=polling")
            q = "EIO=4&transport=polling&sid=" + json.loads(r.text[1:])["sid"]
            assert (await http(app, q, method="POST", body="40")).text == "ok"
            assert (await http(app, q)).text.startswith("40{")
            assert (await http(app, q, method="POST", body="41\x1e1")).text == "ok"
            await trio.testing.wait_all_tasks_blocked()
            assert len(reasons) == 1
            assert reasons[0] in (
                DisconnectReason.CLIENT_NAMESPACE_DISCONNECT,
                DisconnectReason.CLIENT_CLOSE,
            )
            nursery.cancel_scope.cancel()


async def test_namespace_disconnect_cancels_only_its_tasks() -> None:
    server = SocketIOServer(REF)
    cancelled: list[str] = []
    reasons: list[DisconnectReason] = []

    for ns in ("/", "/other"):

        async def work(sid: str, ns: str = ns) -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.append(ns)

        server.on("work", namespace=ns)(work)

    @server.on("disconnect", namespace="/other")
    async def gone(sid: str, reason: DisconnectReason) -> None:
        reasons.append(reason)

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        await c.connect()
        await c.connect("/other")
        await c.send('2["work"]')
        await c.send('2/other,["work"]')
        await trio.testing.wait_all_tasks_blocked()
        await c.send("1/other,")
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == ["/other"]
        assert reasons == [DisconnectReason.CLIENT_NAMESPACE_DISCONNECT]
        nursery.cancel_scope.cancel()


async def test_rooms_broadcast_and_skip_sid() -> None:
    server = SocketIOServer(REF)
    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        clients = [await open_client(server.asgi_app, nursery) for _ in range(3)]
        sids = [await c.connect() for c in clients]
        server.enter_room(sids[0], "session-1")
        server.enter_room(sids[1], "session-1")
        await server.emit("tok", "a", to="session-1", skip_sid=sids[1])
        await server.emit("all", 1)
        await server.emit("one", to=sids[2])
        assert await clients[0].recv() == '2["tok","a"]'
        assert await clients[0].recv() == '2["all",1]'
        assert await clients[1].recv() == '2["all",1]'
        assert await clients[2].recv() == '2["all",1]'
        assert await clients[2].recv() == '2["one"]'
        server.leave_room(sids[0], "session-1")
        await server.emit("tok", "b", to="session-1")
        assert await clients[1].recv() == '2["tok","b"]'
        await trio.testing.wait_all_tasks_blocked()
        assert clients[0].pending() == []
        nursery.cancel_scope.cancel()


async def test_server_call_and_callback() -> None:
    server = SocketIOServer(REF)
    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        sid = await c.connect()
        results: list[list[Any]] = []

        async def caller() -> None:
            results.append(await server.call("question", 1, to=sid))

        nursery.start_soon(caller)
        packet = await c.recv()
        assert isinstance(packet, str) and packet.endswith('["question",1]')
        ack_id = packet[1 : packet.index("[")]
        await c.send(f"3{ack_id}[42]")
        await trio.testing.wait_all_tasks_blocked()
        assert results == [[42]]

        got: list[Any] = []
        await server.emit("q2", to=sid, callback=lambda *a: got.append(a))
        packet = await c.recv()
        assert isinstance(packet, str)
        ack_id = packet[1 : packet.index("[")]
        await c.send(f'3{ack_id}["x",{{"y":1}}]')
        await trio.testing.wait_all_tasks_blocked()
        assert got == [("x", {"y": 1})]

        with trio.move_on_after(0.05) as timer:  # no ACK: the caller bounds the wait
            await server.call("ignored", to=sid)
        assert timer.cancelled_caught
        await c.recv()

        with pytest.raises(ClientGone):
            await server.call("x", to="not-a-sid")
        nursery.cancel_scope.cancel()


async def test_call_fails_when_client_leaves() -> None:
    server = SocketIOServer(REF)
    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        sid = await c.connect()
        errors: list[BaseException] = []

        async def caller() -> None:
            try:
                await server.call("question", to=sid)
            except ClientGone as exc:
                errors.append(exc)

        nursery.start_soon(caller)
        await c.recv()
        await c.send("1")
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 1
        nursery.cancel_scope.cancel()


async def test_emits_in_connect_handler_follow_connect_and_start_task() -> None:
    server = SocketIOServer(REF)
    ran = trio.Event()

    async def background(sid: str) -> None:
        ran.set()
        await trio.sleep_forever()

    @server.on("connect")
    async def connect(sid: str, auth: dict[str, Any] | None, scope: Scope) -> None:
        server.enter_room(sid, "lobby")
        server.session_data(sid)["user"] = "u1"
        await server.emit("welcome", to=sid)
        server.start_task(sid, background, sid)

    @server.on("whoami")
    async def whoami(sid: str) -> str:
        user: str = server.session_data(sid)["user"]
        return user

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        await c.connect()
        assert await c.recv() == '2["welcome"]'
        await c.send('21["whoami"]')
        assert await c.recv() == '31["u1"]'
        await server.emit("hi", to="lobby")
        assert await c.recv() == '2["hi"]'
        with trio.fail_after(1):
            await ran.wait()
        nursery.cancel_scope.cancel()


async def test_start_task_scope_cancels_one_task() -> None:
    server = SocketIOServer(REF)
    done: list[str] = []

    async def job(name: str) -> None:
        try:
            await trio.sleep_forever()
        finally:
            done.append(name)

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        sid = await c.connect()
        first = server.start_task(sid, job, "first")
        server.start_task(sid, job, "second")
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["first"]
        await c.ws.disconnect()
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["first", "second"]
        nursery.cancel_scope.cancel()


async def test_pubsub_fans_out_across_servers() -> None:
    hub = LocalPubSub()
    a, b = SocketIOServer(REF, pubsub=hub), SocketIOServer(REF, pubsub=hub)
    async with trio.open_nursery() as nursery:
        await run_server(a, nursery)
        await run_server(b, nursery)
        ca = await open_client(a.asgi_app, nursery)
        cb = await open_client(b.asgi_app, nursery)
        await ca.connect()
        sid_b = await cb.connect()
        b.enter_room(sid_b, "room")
        await a.emit("news", 1)
        assert await ca.recv() == '2["news",1]'
        assert await cb.recv() == '2["news",1]'
        await a.emit("room-only", to="room")
        assert await cb.recv() == '2["room-only"]'
        await trio.testing.wait_all_tasks_blocked()
        assert ca.pending() == []  # each message arrives once
        nursery.cancel_scope.cancel()


async def test_close_room_empties_it_on_every_server() -> None:
    """A deleted session's room: nobody in it, here or on another server, hears a later
    broadcast to it; the members' own sid rooms and other rooms stay."""
    hub = LocalPubSub()
    a, b = SocketIOServer(REF, pubsub=hub), SocketIOServer(REF, pubsub=hub)
    async with trio.open_nursery() as nursery:
        await run_server(a, nursery)
        await run_server(b, nursery)
        ca = await open_client(a.asgi_app, nursery)
        cb = await open_client(b.asgi_app, nursery)
        sid_a, sid_b = await ca.connect(), await cb.connect()
        a.enter_room(sid_a, "doomed")
        b.enter_room(sid_b, "doomed")
        b.enter_room(sid_b, "kept")
        await a.close_room("doomed")
        await a.close_room(sid_a)  # a sid's own room is never closed
        await trio.testing.wait_all_tasks_blocked()
        assert set(b.rooms_of(sid_b)) == {sid_b, "kept"}
        await a.emit("late", to="doomed")
        await b.emit("late", to="doomed")
        await a.emit("mine", to=sid_a)
        await a.emit("still", to="kept")
        assert await ca.recv() == '2["mine"]'
        assert await cb.recv() == '2["still"]'
        await trio.testing.wait_all_tasks_blocked()
        assert ca.pending() == [] and cb.pending() == []
        nursery.cancel_scope.cancel()


async def test_shutdown_closes_clients_and_runs_disconnect_handlers() -> None:
    server = SocketIOServer(REF)
    reasons: list[DisconnectReason] = []

    @server.on("disconnect")
    async def disconnect(sid: str, reason: DisconnectReason) -> None:
        reasons.append(reason)

    async with trio.open_nursery() as nursery:
        await run_server(server, nursery)
        c = await open_client(server.asgi_app, nursery)
        await c.connect()
        with trio.fail_after(3):
            await server.shutdown()
        assert await c.ws.receive() == "1"
        await c.ws.wait_closed()
    assert reasons == [DisconnectReason.SERVER_SHUTDOWN]


async def test_handlers_must_be_async() -> None:
    server = SocketIOServer(REF)
    with pytest.raises(TypeError):
        server.on("x")(lambda sid: None)  # type: ignore[type-var]  # wrong on purpose
    with pytest.raises(ValueError):
        await server.emit("connect")


def test_every_session_close_reason_is_a_disconnect_reason() -> None:
    from fabricai_trio.realtime.eio_session import CloseReason

    assert {DisconnectReason(r.value) for r in CloseReason} <= set(DisconnectReason)

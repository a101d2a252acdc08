"""Sans-IO tests of the Engine.IO session: no trio, no sockets, time passed by hand."""

from __future__ import annotations

import json
import random

import pytest

from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.eio_session import (
    _TRANSITIONS,
    CloseReason,
    EngineIOSession,
    Event,
    MessageReceived,
    SessionClosed,
    State,
    Transport,
    Upgraded,
    WsState,
)
from fabricai_trio.realtime.errors import (
    Failure,
    LocalProtocolError,
    RemoteProtocolError,
    http_status_for,
    ws_close_code_for,
)

CONFIG = RealtimeConfig.reference()


def polling(config: RealtimeConfig = CONFIG, now: float = 0.0) -> EngineIOSession:
    s = EngineIOSession(sid="sid1", transport=Transport.POLLING, config=config)
    s.handshake(now)
    return s


def websocket(config: RealtimeConfig = CONFIG) -> tuple[EngineIOSession, int]:
    s = EngineIOSession(sid="sid2", transport=Transport.WEBSOCKET, config=config)
    token = s.attach_websocket(0.0)
    s.handshake(0.0)
    return s, token


def events(s: EngineIOSession) -> list[Event]:
    out: list[Event] = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


def post(s: EngineIOSession, body: bytes | str, now: float = 0.0) -> None:
    s.begin_post(now)
    try:
        s.receive_post_data(body.encode() if isinstance(body, str) else body)
        s.end_of_post(now)
    finally:
        s.end_post()


def get(s: EngineIOSession, now: float = 0.0) -> str | None:
    s.begin_get(now)
    return s.poll_response(now)


def test_handshake_packet() -> None:
    s = EngineIOSession(sid="abc", transport=Transport.POLLING, config=CONFIG)
    assert s.state is State.OPENING
    packet = s.handshake(0.0)
    assert packet[0] == "0"
    assert json.loads(packet[1:]) == {
        "sid": "abc",
        "upgrades": ["websocket"],
        "pingInterval": 300,
        "pingTimeout": 200,
        "maxPayload": 1_000_000,
    }
    assert s.state is State.OPEN
    ws = EngineIOSession(sid="x", transport=Transport.WEBSOCKET, config=CONFIG)
    assert json.loads(ws.handshake(0.0)[1:])["upgrades"] == []


def test_illegal_transition_is_a_local_error() -> None:
    s = polling()
    with pytest.raises(LocalProtocolError):
        s.handshake(0.0)


def test_post_of_more_than_16_packets_is_all_delivered() -> None:
    s = polling()
    body = "\x1e".join(f"4msg{i}" for i in range(50))
    post(s, body)
    assert events(s) == [MessageReceived(data=f"msg{i}") for i in range(50)]


def test_message_bodies_are_kept_verbatim_and_binary_decoded() -> None:
    s = polling()
    post(s, '4{"a": 1}\x1e4[1, 2]\x1ebAQIDBA==\x1e4')
    assert events(s) == [
        MessageReceived(data='{"a": 1}'),
        MessageReceived(data="[1, 2]"),
        MessageReceived(data=b"\x01\x02\x03\x04"),
        MessageReceived(data=""),
    ]


def test_body_over_max_payload_is_rejected_and_closes() -> None:
    s = polling(RealtimeConfig(max_payload_bytes=100))
    with pytest.raises(RemoteProtocolError) as info:
        post(s, "4" + "x" * 100)
    assert http_status_for(info.value) == 413
    assert s.state is State.CLOSED
    assert events(s) == [SessionClosed(reason=CloseReason.PARSE_ERROR)]


def test_announced_content_length_over_max_payload_is_rejected_before_reading() -> None:
    s = polling(RealtimeConfig(max_payload_bytes=100))
    with pytest.raises(RemoteProtocolError) as info:
        s.begin_post(0.0, content_length=101)
    assert http_status_for(info.value) == 413
    assert s.state is State.CLOSED


@pytest.mark.parametrize("body", ["abc", "9", "4a\x1ebnot base64!", "0{}", "5", b"\xff\xfe"])
def test_invalid_packet_is_400_and_closes(body: str | bytes) -> None:
    s = polling()
    with pytest.raises(RemoteProtocolError) as info:
        post(s, body)
    assert http_status_for(info.value) == 400
    assert s.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        s.begin_get(0.0)


def test_invalid_websocket_packet_closes() -> None:
    s, token = websocket()
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_ws_message(token, "abc", 0.0)
    assert ws_close_code_for(info.value) == 1002
    assert s.state is State.CLOSED
    assert s.ws_active(token) is False


def test_second_concurrent_get_is_400_and_first_gets_close() -> None:
    s = polling()
    s.begin_get(0.0)
    assert s.poll_response(0.0) is None
    with pytest.raises(RemoteProtocolError) as info:
        s.begin_get(0.0)
    assert http_status_for(info.value) == 400
    assert s.state is State.CLOSED
    assert s.poll_response(0.0) == "1"
    assert events(s) == [SessionClosed(reason=CloseReason.TRANSPORT_ERROR)]


def test_second_concurrent_post_is_400_and_closes() -> None:
    s = polling()
    s.begin_post(0.0)
    with pytest.raises(RemoteProtocolError):
        s.begin_post(0.0)
    assert s.state is State.CLOSED


def test_client_close_while_get_pending_answers_noop() -> None:
    s = polling()
    s.begin_get(0.0)
    assert s.poll_response(0.0) is None
    post(s, "1")
    assert s.poll_response(0.0) == "6"
    assert events(s) == [SessionClosed(reason=CloseReason.CLIENT_CLOSE)]
    with pytest.raises(RemoteProtocolError) as info:
        s.begin_get(0.0)
    assert http_status_for(info.value) == 400


def test_abandoned_get_closes_the_session() -> None:
    s = polling()
    s.begin_get(0.0)
    s.abandon_get(0.0)
    assert events(s) == [SessionClosed(reason=CloseReason.TRANSPORT_CLOSE)]


def test_upgrade_flushes_buffered_packets_in_order() -> None:
    s = polling()
    s.send("a")
    assert get(s) == "4a"
    s.begin_get(0.0)  # held GET, as a real client leaves one pending
    token = s.attach_websocket(0.0)
    s.receive_ws_message(token, "2probe", 0.0)
    assert s.state is State.UPGRADING
    assert s.take_ws_output(token) == ["3probe"]
    s.send("b")
    s.send(b"\x01")
    assert s.poll_response(0.0) == "6"  # the pending GET is released with NOOP
    assert get(s) == "6"  # and so is any GET until the upgrade completes
    s.receive_ws_message(token, "5", 0.0)
    assert events(s) == [Upgraded()]
    assert s.state is State.OPEN and s.transport is Transport.WEBSOCKET
    s.send("c")
    assert s.take_ws_output(token) == ["4b", b"\x01", "4c"]
    # polling after the upgrade: 400, the session lives on
    with pytest.raises(RemoteProtocolError) as info:
        s.begin_get(0.0)
    assert http_status_for(info.value) == 400
    with pytest.raises(RemoteProtocolError):
        s.begin_post(0.0)
    assert s.state is State.OPEN
    s.receive_ws_message(token, "4hello", 0.0)
    assert events(s) == [MessageReceived(data="hello")]


def test_second_websocket_is_refused_without_harm() -> None:
    s = polling()
    token = s.attach_websocket(0.0)
    s.receive_ws_message(token, "2probe", 0.0)
    s.receive_ws_message(token, "5", 0.0)
    with pytest.raises(RemoteProtocolError):
        s.attach_websocket(0.0)
    assert s.ws_active(token) and s.state is State.OPEN


def test_second_websocket_during_the_probe_is_refused_without_harm() -> None:
    s = polling()
    token = s.attach_websocket(0.0)
    s.receive_ws_message(token, "2probe", 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        s.attach_websocket(0.0)
    assert ws_close_code_for(info.value) == 1002  # the transport closes it once accepted
    assert s.take_ws_output(token) == ["3probe"]
    s.receive_ws_message(token, "5", 0.0)
    assert s.transport is Transport.WEBSOCKET and s.ws_active(token)


def test_websocket_after_the_session_ended_is_unknown_sid() -> None:
    s = polling()
    s.fail(CloseReason.TRANSPORT_CLOSE)
    with pytest.raises(RemoteProtocolError) as info:
        s.attach_websocket(0.0)
    assert info.value.code == 1


def test_no_upgrade_while_closing_and_close_drops_the_probe() -> None:
    s = polling()
    probe = s.attach_websocket(0.0)
    s.receive_ws_message(probe, "2probe", 0.0)
    s.close(0.0)
    assert s.state is State.CLOSING and s.ws_state is WsState.EMPTY
    assert not s.ws_active(probe)
    with pytest.raises(RemoteProtocolError):
        s.attach_websocket(0.0)
    assert get(s) == "1"  # the CLOSE still goes out over polling
    assert s.state is State.CLOSED


def test_a_closed_session_has_no_websocket() -> None:
    s, token = websocket()
    s.close(0.0)
    assert s.ws_state is WsState.ATTACHED
    assert s.take_ws_output(token) == ["1"]
    assert s.state is State.CLOSED and s.ws_state is WsState.EMPTY
    s.websocket_closed(token, 0.0)  # the transport's own close afterwards: nothing new
    assert events(s) == [SessionClosed(reason=CloseReason.SERVER_CLOSE)]


def test_post_body_arrives_in_chunks() -> None:
    s = polling(RealtimeConfig(max_payload_bytes=100))
    s.begin_post(0.0)
    s.receive_post_data(b"4hel")
    s.receive_post_data(b"lo\x1e4wor")
    s.receive_post_data(b"ld")
    s.end_of_post(0.0)
    assert events(s) == [MessageReceived(data="hello"), MessageReceived(data="world")]
    # the body grows past maxPayload: 413 at once, and the session ends
    s.begin_post(0.0)
    s.receive_post_data(b"4" + b"x" * 99)
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_post_data(b"x")
    assert http_status_for(info.value) == 413 and s.state is State.CLOSED


def test_post_timeout_is_408_and_the_session_lives_on() -> None:
    s = polling()
    s.begin_post(0.0)
    s.receive_post_data(b"4par")
    assert http_status_for(s.post_timed_out()) == 408
    assert s.state is State.OPEN
    post(s, "4next")  # the half-read body is gone; the next POST is fine
    assert events(s) == [MessageReceived(data="next")]


def test_post_after_the_session_closed_mid_body_is_unknown_sid() -> None:
    s = polling()
    s.begin_post(0.0)
    s.receive_post_data(b"4late")
    s.fail(CloseReason.PING_TIMEOUT)
    with pytest.raises(RemoteProtocolError) as info:
        s.end_of_post(0.0)
    assert info.value.code == 1
    s.end_post()


def test_transition_table_rows_keep_each_machine_in_its_own_states() -> None:
    for trigger, row in _TRANSITIONS.items():
        for before, after in row.items():
            assert type(before) is type(after), (trigger, before, after)
    # a closed session's websocket slot is always empty
    for trigger in _TRANSITIONS:
        row = _TRANSITIONS[trigger]
        if State.CLOSED in row.values():
            assert {after for before, after in row.items() if isinstance(before, WsState)} == {
                WsState.EMPTY
            }, trigger


@pytest.mark.parametrize("seed", range(100))
def test_whatever_the_client_does_only_remote_errors_come_out(seed: int) -> None:
    """A random client (well- or ill-behaved) and a random server: a client can only
    cause `RemoteProtocolError`s, never a `LocalProtocolError` (our bug), and the
    invariants of the state machines hold after every step."""
    rng = random.Random(seed)
    config = RealtimeConfig(max_payload_bytes=64, max_buffered_packets=20, upgrade_timeout_ms=500)
    transport = rng.choice([Transport.POLLING, Transport.WEBSOCKET])
    s = EngineIOSession(sid="s", transport=transport, config=config)
    tokens = [s.attach_websocket(0.0)] if transport is Transport.WEBSOCKET else []
    s.handshake(0.0)
    now = 0.0
    held_get = False
    bad_frames: list[str | bytes] = ["6", "1", "abc", "", "4" + "x" * 80, "0", "5", "2probe"]
    good_bodies = [b"4a", b"3", b"4a\x1e4b", b"2\x1e4c"]
    bad_bodies = [b"1", b"xyz", b"\xff", b"5", b"4" + b"x" * 80]

    def frame() -> str | bytes:
        """Mostly what a client should send now, sometimes anything."""
        if rng.random() < 0.03:
            return rng.choice(bad_frames)
        if s.ws_state is WsState.PROBE:
            return "2probe" if s.state is State.OPEN else "5"
        good: list[str | bytes] = ["4hi", "3", b"\x01"]
        return rng.choice(good)

    for _ in range(100):
        action = rng.choices(range(10), weights=[3, 3, 0.3, 3, 2, 6, 0.5, 3, 3, 2])[0]
        try:
            if action == 0 and (not held_get or rng.random() < 0.1):
                s.begin_get(now)
                held_get = True
            elif action == 1 and held_get:
                if s.poll_response(now) is not None:
                    held_get = False
            elif action == 2 and held_get:
                s.abandon_get(now)
                held_get = False
            elif action == 3:
                s.begin_post(now, 1000 if rng.random() < 0.03 else rng.choice([None, 10]))
                try:
                    bodies = bad_bodies if rng.random() < 0.03 else good_bodies
                    s.receive_post_data(rng.choice(bodies))
                    s.end_of_post(now)
                finally:
                    s.end_post()
            elif action == 4:
                tokens.append(s.attach_websocket(now))
            elif action == 5 and tokens:
                s.receive_ws_message(rng.choice(tokens[-2:]), frame(), now)
            elif action == 6 and tokens:
                s.websocket_closed(rng.choice(tokens), now)
            elif action == 7 and tokens:
                s.take_ws_output(rng.choice(tokens))
            elif action == 8:
                now += rng.choice([0.01, 0.01, 0.05, 0.2, 0.6])
                s.tick(now)
            elif s.is_open:
                s.send("m") if rng.random() < 0.9 else s.close(now)
        except RemoteProtocolError:
            pass
        events(s)
        assert s.is_open == (s.state in (State.OPEN, State.UPGRADING))
        if s.state is State.CLOSED:
            assert s.ws_state is WsState.EMPTY and s.next_deadline() is None
        if s.ws_state is WsState.PROBE:
            assert s.transport is Transport.POLLING
        if s.state is State.UPGRADING:
            assert s.ws_state is WsState.PROBE


def test_probe_failure_returns_to_polling() -> None:
    s = polling()
    token = s.attach_websocket(0.0)
    s.receive_ws_message(token, "2probe", 0.0)
    s.websocket_closed(token, 0.0)
    assert s.state is State.OPEN and s.transport is Transport.POLLING
    s.send("x")
    assert get(s) == "4x"
    # a garbage probe drops the probe, not the session
    token = s.attach_websocket(0.0)
    with pytest.raises(RemoteProtocolError):
        s.receive_ws_message(token, "4hi", 0.0)
    assert not s.ws_active(token) and s.state is State.OPEN


def test_upgrade_timeout_drops_the_probe() -> None:
    config = RealtimeConfig(upgrade_timeout_ms=1000, ping_interval_ms=60_000)
    s = polling(config)
    token = s.attach_websocket(0.0)
    s.receive_ws_message(token, "2probe", 0.0)
    assert s.next_deadline() == 1.0
    s.tick(1.0)
    assert not s.ws_active(token)
    assert s.state is State.OPEN


def test_polling_heartbeat_and_ping_timeout() -> None:
    s = polling()
    assert s.next_deadline() == pytest.approx(0.3)
    s.tick(0.3)
    assert get(s, 0.3) == "2"
    post(s, "3", 0.35)
    assert s.next_deadline() == pytest.approx(0.65)
    s.tick(0.65)
    assert s.next_deadline() == pytest.approx(0.85)
    s.tick(0.84)
    assert s.state is State.OPEN
    s.tick(0.86)
    assert s.state is State.CLOSED
    assert events(s) == [SessionClosed(reason=CloseReason.PING_TIMEOUT)]


def test_websocket_ping_timeout() -> None:
    s, token = websocket()
    s.tick(0.3)
    assert s.take_ws_output(token) == ["2"]
    s.receive_ws_message(token, "3", 0.4)
    s.tick(0.7)
    assert s.take_ws_output(token) == ["2"]
    s.tick(0.9)
    assert events(s) == [SessionClosed(reason=CloseReason.PING_TIMEOUT)]
    assert not s.ws_active(token)


def test_graceful_close_polling_delivers_queue_then_close() -> None:
    s = polling()
    s.send("bye")
    s.close(1.0, CloseReason.SERVER_SHUTDOWN)
    assert s.state is State.CLOSING
    with pytest.raises(LocalProtocolError):
        s.send("late")
    assert get(s, 1.0) == "4bye\x1e1"
    assert s.state is State.CLOSED
    assert events(s) == [SessionClosed(reason=CloseReason.SERVER_SHUTDOWN)]


def test_graceful_close_polling_gives_up_after_grace() -> None:
    s = polling()
    s.close(1.0)
    assert s.next_deadline() == pytest.approx(1.0 + CONFIG.close_grace_s)
    s.tick(1.0 + CONFIG.close_grace_s)
    assert s.state is State.CLOSED
    assert events(s) == [SessionClosed(reason=CloseReason.SERVER_CLOSE)]


def test_graceful_close_websocket() -> None:
    s, token = websocket()
    s.send("bye")
    s.close(0.0)
    assert s.take_ws_output(token) == ["4bye", "1"]
    assert s.state is State.CLOSED and not s.ws_active(token)


def test_outbound_buffer_is_bounded_by_packets() -> None:
    s = polling(RealtimeConfig(max_buffered_packets=10))
    for i in range(10):
        s.send(str(i))
    assert s.is_open
    s.send("one too many")
    assert s.state is State.CLOSED
    assert events(s) == [SessionClosed(reason=CloseReason.BUFFER_OVERFLOW)]


def test_outbound_buffer_is_bounded_by_bytes() -> None:
    s, token = websocket(RealtimeConfig(max_buffered_bytes=1000))
    s.send("x" * 500)
    assert s.take_ws_output(token) == ["4" + "x" * 500]
    s.output_written(0.0)
    s.send("x" * 500)
    s.send("x" * 500)
    assert s.close_reason is CloseReason.BUFFER_OVERFLOW


def test_frames_count_against_the_buffer_until_written() -> None:
    s, token = websocket(RealtimeConfig(max_buffered_bytes=1000))
    s.send("x" * 500)
    assert s.take_ws_output(token) == ["4" + "x" * 500]
    s.send("x" * 600)  # the first is handed out but not written: 1100 bytes
    assert s.close_reason is CloseReason.BUFFER_OVERFLOW


def test_a_packet_left_unwritten_too_long_closes_the_session_as_a_slow_client() -> None:
    s, token = websocket(RealtimeConfig(slow_client_timeout_ms=5000))
    s.send("a", 1.0)
    assert s.take_ws_output(token) == ["4a"]
    s.output_written(2.0)
    s.send("b", 3.0)
    assert s.take_ws_output(token) == ["4b"]  # handed out, never written
    assert s.next_deadline() == 8.0
    s.tick(7.9)
    assert s.is_open
    s.tick(8.0)
    assert s.close_reason is CloseReason.SLOW_CLIENT
    assert s.next_deadline() is None


def test_a_polling_client_that_does_not_fetch_is_a_slow_client() -> None:
    s = polling(RealtimeConfig(slow_client_timeout_ms=5000, ping_interval_ms=60_000))
    s.send("a", 1.0)
    s.tick(5.9)
    assert s.is_open
    s.tick(6.0)
    assert s.close_reason is CloseReason.SLOW_CLIENT


def test_a_post_with_too_many_packets_is_refused_before_decoding() -> None:
    s = polling(RealtimeConfig(max_packets_per_post=16))
    s.begin_post(0.0)
    s.receive_post_data("\x1e".join(["6"] * 17).encode())
    with pytest.raises(RemoteProtocolError):
        s.end_of_post(0.0)
    assert s.close_reason is CloseReason.PARSE_ERROR


def messages(s: EngineIOSession) -> list[str | bytes]:
    return [e.data for e in events(s) if isinstance(e, MessageReceived)]


def test_a_post_is_delivered_in_batches() -> None:
    s = polling()
    s.begin_post(0.0)
    s.receive_post_data("\x1e".join(f"4m{i}" for i in range(10)).encode())
    assert not s.end_of_post(0.0, batch=4)
    assert messages(s) == ["m0", "m1", "m2", "m3"]
    assert not s.continue_post(0.0, batch=4)
    assert s.continue_post(0.0, batch=4)
    assert messages(s) == [f"m{i}" for i in range(4, 10)]


def test_poll_response_is_capped_for_python_clients() -> None:
    s = polling()
    for i in range(20):
        s.send(f"m{i}")
    first = get(s)
    assert first is not None and first.split("\x1e") == [f"4m{i}" for i in range(16)]
    assert get(s) == "\x1e".join(f"4m{i}" for i in range(16, 20))


def test_binary_goes_base64_over_polling() -> None:
    s = polling()
    s.send(b"\x01\x02\x03\x04")
    s.send("hello")
    assert get(s) == "bAQIDBA==\x1e4hello"


def test_exception_mapping() -> None:
    assert http_status_for(RemoteProtocolError("x")) == 400
    assert http_status_for(LocalProtocolError("x")) == 500
    assert http_status_for(ValueError()) == 500
    assert ws_close_code_for(RemoteProtocolError("x", failure=Failure.TOO_LARGE)) == 1009
    assert ws_close_code_for(RemoteProtocolError("x", failure=Failure.FORBIDDEN)) == 1008
    assert http_status_for(RemoteProtocolError("x", failure=Failure.TIMEOUT)) == 408
    assert ws_close_code_for(RuntimeError()) == 1011


def test_websocket_message_over_max_payload_closes() -> None:
    s, token = websocket(RealtimeConfig(max_payload_bytes=1024))
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_ws_message(token, "4" + "é" * 600, 0.0)  # 1201 bytes, 601 characters
    assert ws_close_code_for(info.value) == 1009
    assert s.close_reason is CloseReason.PARSE_ERROR


def test_client_ping_is_answered() -> None:
    s, token = websocket()
    s.receive_ws_message(token, "2", 0.0)
    assert s.take_ws_output(token) == ["3"]

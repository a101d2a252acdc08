"""Sans-IO tests of the Socket.IO codec."""

from __future__ import annotations

import pytest

from fabricai_trio.realtime.errors import RemoteProtocolError
from fabricai_trio.realtime.sio_protocol import (
    AckReceived,
    ConnectRequested,
    DisconnectRequested,
    EventReceived,
    SocketIOParser,
    encode_ack,
    encode_connect,
    encode_connect_error,
    encode_disconnect,
    encode_event,
)


@pytest.mark.parametrize(
    ("raw", "event"),
    [
        ("0", ConnectRequested(namespace="/", auth=None)),
        ('0{"token":"123"}', ConnectRequested(namespace="/", auth={"token": "123"})),
        ("0/custom,", ConnectRequested(namespace="/custom", auth=None)),
        ("0/random", ConnectRequested(namespace="/random", auth=None)),
        ("1/custom,", DisconnectRequested(namespace="/custom")),
        ('2["m",1,"2"]', EventReceived(namespace="/", event="m", args=[1, "2"], ack_id=None)),
        ('2/a,12["m"]', EventReceived(namespace="/a", event="m", args=[], ack_id=12)),
        ('3/admin,13["bar"]', AckReceived(namespace="/admin", ack_id=13, args=["bar"])),
        ("37[]", AckReceived(namespace="/", ack_id=7, args=[])),
    ],
)
def test_decode(raw: str, event: object) -> None:
    assert SocketIOParser(max_attachments=10).receive(raw) == event


def test_binary_attachments_are_reassembled() -> None:
    p = SocketIOParser(max_attachments=10)
    head = '52-789["m",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]'
    assert p.receive(head) is None
    assert p.receive(b"\x01") is None
    assert p.receive(b"\x02") == EventReceived(
        namespace="/", event="m", args=[b"\x01", b"\x02"], ack_id=789
    )
    assert p.receive('61-3[{"_placeholder":true,"num":0}]') is None
    assert p.receive(b"\x03") == AckReceived(namespace="/", ack_id=3, args=[b"\x03"])


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "",
        "9",
        "4{}",  # CONNECT_ERROR from a client
        "2{}",  # EVENT payload not an array
        "2",
        "2[]",
        "2[1]",
        '2abc["message-with-ack"]',  # invalid ack id
        "3[1]",  # ACK without id
        "0[1]",  # CONNECT payload not an object
        '22-["x"]',  # attachments on a non-binary packet
        '511-["x"]',  # over the attachment cap
        b"\x01",  # attachment nobody announced
    ],
)
def test_malformed_packets_are_rejected(raw: str | bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        SocketIOParser(max_attachments=10).receive(raw)


def test_text_while_attachments_due_is_rejected() -> None:
    p = SocketIOParser(max_attachments=10)
    p.receive('51-["m",{"_placeholder":true,"num":0}]')
    with pytest.raises(RemoteProtocolError):
        p.receive('2["m"]')


def test_bad_placeholder_is_rejected() -> None:
    p = SocketIOParser(max_attachments=10)
    p.receive('51-["m",{"_placeholder":true,"num":5}]')
    with pytest.raises(RemoteProtocolError):
        p.receive(b"\x01")


def test_encode() -> None:
    assert encode_connect("/", "abc") == ['0{"sid":"abc"}']
    assert encode_connect("/admin", "x") == ['0/admin,{"sid":"x"}']
    assert encode_connect_error("/random", "Invalid namespace") == [
        '4/random,{"message":"Invalid namespace"}'
    ]
    assert encode_connect_error("/", "no", {"code": 1}) == ['4{"message":"no","data":{"code":1}}']
    assert encode_disconnect("/admin") == ["1/admin,"]
    assert encode_event("/", "hey", ("Jude",)) == ['2["hey","Jude"]']
    assert encode_event("/", "m", (b"\x01", b"\x02")) == [
        '52-["m",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]',
        b"\x01",
        b"\x02",
    ]
    assert encode_ack("/", 456, [1, "2"]) == ['3456[1,"2"]']
    assert encode_ack("/", 789, [b"\x01"]) == ['61-789[{"_placeholder":true,"num":0}]', b"\x01"]

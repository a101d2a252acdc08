"""Sans-IO Socket.IO v5 codec: Engine.IO messages in, validated events out, and back.

`SocketIOParser` turns the messages of one Engine.IO session into events, reassembling
binary attachments (at most `max_attachments` per packet) and rejecting everything the
v5 spec calls malformed with `RemoteProtocolError`. A well-formed packet whose JSON is
beyond `core.jsonparse`'s bounds (nesting depth, integer size) is not a protocol error:
it becomes `PacketRejected`, so the server answers it and the session goes on. The
`encode_*` functions build the Engine.IO messages (one text message, then one binary
message per attachment) of the packets a server sends. Packets are `socketio.packet.Packet` objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from engineio import json as eio_json
from socketio import packet as sio_packet

from ..core import jsonparse
from .errors import RemoteProtocolError

CONNECT: Final = sio_packet.CONNECT
DISCONNECT: Final = sio_packet.DISCONNECT
EVENT: Final = sio_packet.EVENT
ACK: Final = sio_packet.ACK
CONNECT_ERROR: Final = sio_packet.CONNECT_ERROR
BINARY_EVENT: Final = sio_packet.BINARY_EVENT
BINARY_ACK: Final = sio_packet.BINARY_ACK

DEFAULT_NAMESPACE: Final = "/"

Messages = list[str | bytes]


@dataclass(frozen=True, kw_only=True)
class ConnectRequested:
    namespace: str
    auth: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class DisconnectRequested:
    namespace: str


@dataclass(frozen=True, kw_only=True)
class EventReceived:
    namespace: str
    event: str
    args: list[Any]
    ack_id: int | None


@dataclass(frozen=True, kw_only=True)
class AckReceived:
    namespace: str
    ack_id: int
    args: list[Any]


@dataclass(frozen=True, kw_only=True)
class PacketRejected:
    """A packet whose JSON payload `core.jsonparse` refused (`reason` says why)."""

    namespace: str
    packet_type: int
    ack_id: int | None
    reason: str


SioEvent = ConnectRequested | DisconnectRequested | EventReceived | AckReceived | PacketRejected


class _BoundedJson:
    """The `json` a packet decodes with: `core.jsonparse.loads` (bounded)."""

    loads = staticmethod(jsonparse.loads)
    dumps = staticmethod(eio_json.dumps)


class _Packet(sio_packet.Packet):  # type: ignore[misc]  # untyped library
    json = _BoundedJson


class SocketIOParser:
    """Decoder for the Socket.IO packets of one Engine.IO session."""

    def __init__(self, *, max_attachments: int) -> None:
        self.max_attachments = max_attachments
        self._partial: sio_packet.Packet | None = None
        self._skip = 0  # binary attachments of a rejected packet still to come

    def receive(self, data: str | bytes) -> SioEvent | None:
        """Feed one Engine.IO message; returns an event, or None while attachments are due.

        Raises `RemoteProtocolError` on a malformed packet (the session should close).
        """
        if isinstance(data, (bytes, bytearray)):
            return self._receive_attachment(bytes(data))
        if self._partial is not None or self._skip:
            raise RemoteProtocolError("text packet while binary attachments are due")
        if not data or not data[0].isdigit():
            raise RemoteProtocolError("malformed Socket.IO packet type")
        pkt = _Packet()
        try:
            pkt.attachment_count = pkt.decode(data) or 0
        except jsonparse.JsonTooComplex as exc:
            count, dash, _ = data[1:].partition("-")
            if pkt.packet_type in (BINARY_EVENT, BINARY_ACK) and dash and count.isdigit():
                self._skip = min(int(count), self.max_attachments)  # its attachments
            return PacketRejected(namespace=pkt.namespace or DEFAULT_NAMESPACE,
                                  packet_type=pkt.packet_type, ack_id=pkt.id, reason=str(exc))
        except (ValueError, TypeError, IndexError, KeyError):
            raise RemoteProtocolError("malformed Socket.IO packet") from None
        count = pkt.attachment_count
        if pkt.packet_type in (BINARY_EVENT, BINARY_ACK):
            if count > self.max_attachments:
                raise RemoteProtocolError("too many binary attachments")
            if count > 0:
                self._partial = pkt
                return None
        elif count:
            raise RemoteProtocolError("attachments on a non-binary packet")
        return self._to_event(pkt)

    def _receive_attachment(self, data: bytes) -> SioEvent | None:
        if self._skip:
            self._skip -= 1
            return None
        pkt = self._partial
        if pkt is None:
            raise RemoteProtocolError("unexpected binary message")
        try:
            complete = pkt.add_attachment(data)
        except (ValueError, TypeError, IndexError, KeyError):
            raise RemoteProtocolError("invalid binary attachment") from None
        if not complete:
            return None
        self._partial = None
        return self._to_event(pkt)

    @staticmethod
    def _to_event(pkt: sio_packet.Packet) -> SioEvent:
        namespace = pkt.namespace or DEFAULT_NAMESPACE
        data = pkt.data
        ptype = pkt.packet_type
        if ptype == CONNECT:
            if data is not None and not isinstance(data, dict):
                raise RemoteProtocolError("CONNECT payload must be an object")
            return ConnectRequested(namespace=namespace, auth=data)
        if ptype == DISCONNECT:
            return DisconnectRequested(namespace=namespace)
        if ptype in (EVENT, BINARY_EVENT):
            if not isinstance(data, list) or not data or not isinstance(data[0], str):
                raise RemoteProtocolError("EVENT payload must be a non-empty array")
            return EventReceived(namespace=namespace, event=data[0], args=data[1:], ack_id=pkt.id)
        if ptype in (ACK, BINARY_ACK):
            if pkt.id is None or not isinstance(data, list):
                raise RemoteProtocolError("ACK needs an id and an array payload")
            return AckReceived(namespace=namespace, ack_id=pkt.id, args=data)
        raise RemoteProtocolError(f"unexpected Socket.IO packet type {ptype}")


def _messages(pkt: sio_packet.Packet) -> Messages:
    encoded = pkt.encode()
    if isinstance(encoded, list):
        return list(encoded)
    return [encoded]


def encode_connect(namespace: str, sid: str) -> Messages:
    return _messages(sio_packet.Packet(CONNECT, {"sid": sid}, namespace=namespace))


def encode_connect_error(namespace: str, message: str, data: Any = None) -> Messages:
    payload: dict[str, Any] = {"message": message}
    if data is not None:
        payload["data"] = data
    return _messages(sio_packet.Packet(CONNECT_ERROR, payload, namespace=namespace))


def encode_disconnect(namespace: str) -> Messages:
    return _messages(sio_packet.Packet(DISCONNECT, namespace=namespace))


def encode_event(
    namespace: str, event: str, args: tuple[Any, ...] | list[Any], ack_id: int | None = None
) -> Messages:
    """An EVENT (a BINARY_EVENT when an argument holds bytes)."""
    return _messages(sio_packet.Packet(EVENT, [event, *args], namespace=namespace, id=ack_id))


def encode_ack(namespace: str, ack_id: int, args: list[Any]) -> Messages:
    """An ACK (a BINARY_ACK when an argument holds bytes)."""
    return _messages(sio_packet.Packet(ACK, list(args), namespace=namespace, id=ack_id))

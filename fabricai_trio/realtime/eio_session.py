"""Sans-IO Engine.IO v4 session: no trio, no sockets, no clock (time is passed in).

One `EngineIOSession` is one client session. The transport feeds it what arrived (a poll
request starting, POST body bytes, a websocket message, the passing of time) and reads back
what to send (`poll_response()`, `take_ws_output()`) and what happened (`next_event()`),
the way h11's `Connection` works.

A session is five small state machines, and every change of any of them goes through the
one table `_TRANSITIONS` (h11's `_state.py` habit): the session's lifecycle (`State`), the
transport it runs on (`Transport`: the switch at upgrade), the polling GET (`GetState`: at
most one held), the polling POST (`PostState`: at most one reading) and the websocket slot
(`WsState`: empty, a probe, or the session's own websocket). A row of the table names, for
one `Trigger`, the state each machine it moves must be in and the state it moves to; a
trigger fires for all of them or for none. Rules that answer the client with a particular
error are checked first, in the order of the reference server; whatever is left is a
`LocalProtocolError` (our bug).

Packets are `engineio.packet.Packet` objects and polling responses are encoded with
`engineio.payload.Payload`. Incoming payloads are *not* decoded with `Payload.decode`: it
refuses more than 16 packets (a client burst would be lost) and JSON-decodes message
bodies (`4{"a": 1}` would come back re-serialised); `decode_packet` keeps them verbatim.

Outbound buffer policy: a session holds at most `max_buffered_packets` packets and
`max_buffered_bytes` bytes waiting for the client, counting those handed to the transport
until it reports them written (`output_written()`). Going over closes the session with
`CloseReason.BUFFER_OVERFLOW`; a packet still unwritten `slow_client_timeout_ms` after it
was queued closes it with `CloseReason.SLOW_CLIENT`. A slow consumer is disconnected,
never silently skipped, and the producer never blocks on it.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import json
from dataclasses import dataclass
from typing import Final, TypeVar, cast

from engineio import packet as eio_packet
from engineio.payload import Payload

from .config import RealtimeConfig
from .errors import EioErrorCode, Failure, LocalProtocolError, RemoteProtocolError

OPEN: Final = eio_packet.OPEN
CLOSE: Final = eio_packet.CLOSE
PING: Final = eio_packet.PING
PONG: Final = eio_packet.PONG
MESSAGE: Final = eio_packet.MESSAGE
UPGRADE: Final = eio_packet.UPGRADE
NOOP: Final = eio_packet.NOOP

SEPARATOR: Final = "\x1e"
PROBE: Final = "probe"


# --- the state machines ----------------------------------------------------------------


class State(enum.Enum):
    """The session's lifecycle."""

    OPENING = "opening"
    OPEN = "open"
    UPGRADING = "upgrading"  # the probe answered `3probe`; polling GETs get NOOP
    CLOSING = "closing"  # CLOSE is queued behind what the client has not fetched yet
    CLOSED = "closed"


class Transport(enum.Enum):
    """What carries the session's packets."""

    POLLING = "polling"
    WEBSOCKET = "websocket"


class GetState(enum.Enum):
    """The polling GET: the protocol allows one at a time."""

    IDLE = "idle"
    HELD = "held"


class PostState(enum.Enum):
    """The polling POST: the protocol allows one at a time."""

    IDLE = "idle"
    READING = "reading"


class WsState(enum.Enum):
    """The session's one websocket slot."""

    EMPTY = "empty"
    PROBE = "probe"  # an upgrade candidate of a polling session
    ATTACHED = "attached"  # the session's transport


class Trigger(enum.Enum):
    """What moves the machines (the rows of `_TRANSITIONS`)."""

    HANDSHAKE = "handshake"  # the OPEN packet was handed to the transport
    ATTACH = "attach"  # a websocket-only session's websocket
    ATTACH_PROBE = "attach probe"  # a websocket arrived for a polling session
    PROBE = "probe"  # `2probe` arrived on the probe
    UPGRADE = "upgrade"  # `5` arrived on the probe: it is the transport now
    PROBE_FAILED = "probe failed"  # the probe went away, misbehaved or timed out
    GET = "get"  # a polling GET arrived
    GET_ANSWERED = "get answered"  # the held GET got its answer, or its client left
    POST = "post"  # a polling POST arrived
    POST_DONE = "post done"  # the POST was read (or failed)
    CLOSE = "close"  # the server starts a graceful close: CLOSE is queued
    CLOSE_SENT = "close sent"  # the queued CLOSE was handed to the transport
    ABORT = "abort"  # client CLOSE, protocol error, timeout: the session ends at once


Part = State | Transport | GetState | PostState | WsState
P = TypeVar("P", State, Transport, GetState, PostState, WsState)

_TRANSITIONS: Final[dict[Trigger, dict[Part, Part]]] = {
    # A row maps, for each machine the trigger concerns, the state it must be in to the
    # state it moves to (the same state when it is only a precondition). A session that
    # ends (ABORT, CLOSE_SENT) empties its websocket slot: a closed session has none.
    Trigger.HANDSHAKE: {State.OPENING: State.OPEN},
    Trigger.ATTACH: {
        State.OPENING: State.OPENING,
        Transport.WEBSOCKET: Transport.WEBSOCKET,
        WsState.EMPTY: WsState.ATTACHED,
    },
    Trigger.ATTACH_PROBE: {
        State.OPEN: State.OPEN,
        Transport.POLLING: Transport.POLLING,
        WsState.EMPTY: WsState.PROBE,
    },
    Trigger.PROBE: {State.OPEN: State.UPGRADING, WsState.PROBE: WsState.PROBE},
    Trigger.UPGRADE: {
        State.UPGRADING: State.OPEN,
        Transport.POLLING: Transport.WEBSOCKET,
        WsState.PROBE: WsState.ATTACHED,
    },
    Trigger.PROBE_FAILED: {
        State.OPEN: State.OPEN,
        State.UPGRADING: State.OPEN,
        WsState.PROBE: WsState.EMPTY,
    },
    Trigger.GET: {Transport.POLLING: Transport.POLLING, GetState.IDLE: GetState.HELD},
    Trigger.GET_ANSWERED: {GetState.HELD: GetState.IDLE},
    Trigger.POST: {Transport.POLLING: Transport.POLLING, PostState.IDLE: PostState.READING},
    Trigger.POST_DONE: {PostState.READING: PostState.IDLE},
    Trigger.CLOSE: {
        State.OPEN: State.CLOSING,
        State.UPGRADING: State.CLOSING,
        WsState.EMPTY: WsState.EMPTY,
        WsState.ATTACHED: WsState.ATTACHED,
    },
    Trigger.CLOSE_SENT: {
        State.CLOSING: State.CLOSED,
        WsState.EMPTY: WsState.EMPTY,
        WsState.ATTACHED: WsState.EMPTY,
    },
    Trigger.ABORT: {
        State.OPENING: State.CLOSED,
        State.OPEN: State.CLOSED,
        State.UPGRADING: State.CLOSED,
        State.CLOSING: State.CLOSED,
        WsState.EMPTY: WsState.EMPTY,
        WsState.PROBE: WsState.EMPTY,
        WsState.ATTACHED: WsState.EMPTY,
    },
}


class CloseReason(enum.StrEnum):
    """Why a session ended (Socket.IO passes it on to disconnect handlers)."""

    CLIENT_CLOSE = "client close"  # the client sent CLOSE
    TRANSPORT_CLOSE = "transport close"  # the connection went away
    TRANSPORT_ERROR = "transport error"  # the transport was misused (e.g. two GETs)
    PARSE_ERROR = "parse error"  # an invalid or oversized packet
    PING_TIMEOUT = "ping timeout"
    BUFFER_OVERFLOW = "buffer overflow"  # the client could not keep up
    SLOW_CLIENT = "slow client"  # what was sent stayed unwritten too long
    SERVER_CLOSE = "server close"  # the application closed the session
    SERVER_SHUTDOWN = "server shutting down"


# --- events (what the session reports to its transport) ---------------------------------


@dataclass(frozen=True, kw_only=True)
class MessageReceived:
    """A MESSAGE packet from the client: text or binary."""

    data: str | bytes


@dataclass(frozen=True, kw_only=True)
class Upgraded:
    """The session now runs over the websocket it probed."""


@dataclass(frozen=True, kw_only=True)
class SessionClosed:
    """The session ended; nothing more will be delivered either way."""

    reason: CloseReason


Event = MessageReceived | Upgraded | SessionClosed


# --- packet codec ----------------------------------------------------------------------


def decode_packet(raw: str | bytes) -> eio_packet.Packet:
    """One packet from a websocket frame or a polling payload segment.

    Binary frames and `b`-prefixed base64 segments are MESSAGE packets; text message
    bodies stay as sent. Raises `RemoteProtocolError` on anything else malformed.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return eio_packet.Packet(MESSAGE, bytes(raw))
    if not raw:
        raise RemoteProtocolError("empty packet")
    head = raw[0]
    if head == "b":
        try:
            data = base64.b64decode(raw[1:], validate=True)
        except (binascii.Error, ValueError):
            raise RemoteProtocolError("invalid base64 packet") from None
        return eio_packet.Packet(MESSAGE, data)
    if head not in "0123456":
        raise RemoteProtocolError("invalid packet type")
    return eio_packet.Packet(int(head), raw[1:])


def encode_ws(pkt: eio_packet.Packet) -> str | bytes:
    """A packet as one websocket frame (binary messages go as binary frames)."""
    encoded: str | bytes = pkt.encode(b64=False)
    return encoded


def _packet_size(pkt: eio_packet.Packet) -> int:
    data = pkt.data
    if isinstance(data, (bytes, bytearray)):
        return len(data) * 4 // 3 + 2
    if isinstance(data, str):
        return len(data.encode()) + 1
    return 1


def _message_size(data: str | bytes) -> int:
    return len(data.encode()) if isinstance(data, str) else len(data)


def _unknown_sid() -> RemoteProtocolError:
    return RemoteProtocolError("Session ID unknown", code=EioErrorCode.UNKNOWN_SID)


class EngineIOSession:
    """The protocol state of one Engine.IO session (see the module docstring)."""

    def __init__(self, *, sid: str, transport: Transport, config: RealtimeConfig) -> None:
        self.sid = sid
        self.config = config
        self._parts: dict[type[enum.Enum], Part] = {
            State: State.OPENING,
            Transport: transport,
            GetState: GetState.IDLE,
            PostState: PostState.IDLE,
            WsState: WsState.EMPTY,
        }
        self._close_reason: CloseReason | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._outbound: collections.deque[eio_packet.Packet] = collections.deque()
        self._queued_at: collections.deque[float] = collections.deque()  # per packet
        self._outbound_bytes = 0
        # handed to the transport, not yet written: still counted, still timed
        self._inflight_packets = 0
        self._inflight_bytes = 0
        self._inflight_since: float | None = None
        self._now = 0.0  # the latest time the caller passed in
        self._final_poll_answer: str | None = None
        self._post_body = bytearray()
        self._post_segments: collections.deque[str] = collections.deque()
        # each websocket gets a token, so a stale one can tell it is stale
        self._ws_token = 0
        self._probe_output: collections.deque[str] = collections.deque()
        # timers (absolute times on the caller's clock)
        self._next_ping_at: float | None = None
        self._pong_deadline: float | None = None
        self._upgrade_deadline: float | None = None
        self._close_deadline: float | None = None

    # --- state -------------------------------------------------------------------------

    def _get(self, part: type[P]) -> P:
        return cast(P, self._parts[part])

    @property
    def state(self) -> State:
        return self._get(State)

    @property
    def transport(self) -> Transport:
        return self._get(Transport)

    @property
    def ws_state(self) -> WsState:
        return self._get(WsState)

    @property
    def close_reason(self) -> CloseReason | None:
        return self._close_reason

    @property
    def is_open(self) -> bool:
        """True while the application may still send messages."""
        return self.state in (State.OPEN, State.UPGRADING)

    def _is_closed(self) -> bool:
        return self.state is State.CLOSED

    def _allowed(self, trigger: Trigger) -> bool:
        row = _TRANSITIONS[trigger]
        return all(
            self._parts[kind] in row
            for kind in self._parts
            if any(isinstance(state, kind) for state in row)
        )

    def _fire(self, trigger: Trigger) -> None:
        """Move every machine `trigger` concerns, or none (LocalProtocolError)."""
        row = _TRANSITIONS[trigger]
        moves: dict[type[enum.Enum], Part] = {}
        for kind, current in self._parts.items():
            if not any(isinstance(state, kind) for state in row):
                continue
            if current not in row:
                raise LocalProtocolError(
                    f"cannot {trigger.value} with {kind.__name__} {current.value}"
                )
            moves[kind] = row[current]
        self._parts.update(moves)

    def _abort(self, reason: CloseReason, *, poll_answer: str = "1") -> None:
        """End the session now; a held GET gets `poll_answer` (CLOSE, or NOOP)."""
        if self.state is State.CLOSED:
            return
        self._fire(Trigger.ABORT)
        self._close_reason = reason
        self._final_poll_answer = poll_answer
        self._outbound.clear()
        self._queued_at.clear()
        self._outbound_bytes = 0
        self._inflight_packets = self._inflight_bytes = 0
        self._inflight_since = None
        self._probe_output.clear()
        self._next_ping_at = self._pong_deadline = None
        self._upgrade_deadline = self._close_deadline = None
        self._events.append(SessionClosed(reason=reason))

    def _remote_error(
        self,
        message: str,
        reason: CloseReason,
        *,
        failure: Failure = Failure.BAD_REQUEST,
        close: bool = True,
    ) -> RemoteProtocolError:
        if close:
            self._abort(reason)
        return RemoteProtocolError(message, failure=failure)

    def next_event(self) -> Event | None:
        """The next thing that happened, or None."""
        return self._events.popleft() if self._events else None

    # --- handshake ---------------------------------------------------------------------

    def handshake(self, now: float) -> str:
        """The encoded OPEN packet; the session is open and its heartbeat starts."""
        self._fire(Trigger.HANDSHAKE)
        self._now = max(self._now, now)
        self._next_ping_at = now + self.config.ping_interval_s
        upgrades = ["websocket"] if self.transport is Transport.POLLING else []
        info = {
            "sid": self.sid,
            "upgrades": upgrades,
            "pingInterval": self.config.ping_interval_ms,
            "pingTimeout": self.config.ping_timeout_ms,
            "maxPayload": self.config.max_payload_bytes,
        }
        encoded: str = eio_packet.Packet(OPEN, json.dumps(info, separators=(",", ":"))).encode()
        return encoded

    # --- application output ------------------------------------------------------------

    def send(self, data: str | bytes, now: float | None = None) -> None:
        """Queue a MESSAGE for the client.

        Raises `LocalProtocolError` unless the session `is_open`. Over the buffer limits
        the session closes with `BUFFER_OVERFLOW` instead of queueing.
        """
        if not self.is_open:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        if now is not None:
            self._now = max(self._now, now)
        self._queue(eio_packet.Packet(MESSAGE, data))

    def _queue(self, pkt: eio_packet.Packet, *, force: bool = False) -> None:
        size = _packet_size(pkt)
        if not force and (
            len(self._outbound) + self._inflight_packets + 1 > self.config.max_buffered_packets
            or self._outbound_bytes + self._inflight_bytes + size > self.config.max_buffered_bytes
        ):
            self._abort(CloseReason.BUFFER_OVERFLOW)
            return
        self._outbound.append(pkt)
        self._queued_at.append(self._now)
        self._outbound_bytes += size

    def _take_packet(self) -> eio_packet.Packet:
        """The oldest queued packet, handed to the transport: in flight until written."""
        pkt = self._outbound.popleft()
        queued_at = self._queued_at.popleft()
        size = _packet_size(pkt)
        self._outbound_bytes -= size
        self._inflight_packets += 1
        self._inflight_bytes += size
        if self._inflight_since is None:
            self._inflight_since = queued_at
        return pkt

    def output_written(self, now: float) -> None:
        """The transport wrote everything it was handed (a GET's answer, websocket
        frames): those packets no longer count against the buffer limits."""
        self._now = max(self._now, now)
        self._inflight_packets = self._inflight_bytes = 0
        self._inflight_since = None

    def _oldest_unwritten(self) -> float | None:
        if self._inflight_since is not None:
            return self._inflight_since
        return self._queued_at[0] if self._queued_at else None

    def close(self, now: float, reason: CloseReason = CloseReason.SERVER_CLOSE) -> None:
        """Start a graceful close: CLOSE goes out after what is already queued."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state is State.OPENING:
            self._abort(reason)
            return
        if self.ws_state is WsState.PROBE:
            self._drop_probe()
        self._fire(Trigger.CLOSE)
        self._close_reason = reason
        self._now = max(self._now, now)
        self._queue(eio_packet.Packet(CLOSE), force=True)
        self._next_ping_at = self._pong_deadline = self._upgrade_deadline = None
        self._close_deadline = now + self.config.close_grace_s

    def fail(self, reason: CloseReason) -> None:
        """End the session at once (the transport saw it die, or the server gives up)."""
        self._abort(reason)

    # --- incoming packets (both transports) --------------------------------------------

    def _receive_packet(self, pkt: eio_packet.Packet, now: float) -> None:
        self._now = max(self._now, now)
        ptype = pkt.packet_type
        if ptype == MESSAGE:
            if self.state is not State.CLOSED:
                self._events.append(MessageReceived(data=pkt.data))
        elif ptype == PONG:
            if self._pong_deadline is not None:
                self._pong_deadline = None
                if self.is_open:
                    self._next_ping_at = now + self.config.ping_interval_s
        elif ptype == CLOSE:
            # the client is leaving: a GET it left pending is answered NOOP, not CLOSE
            self._abort(CloseReason.CLIENT_CLOSE, poll_answer="6")
        elif ptype == PING:
            if self.is_open:
                self._queue(eio_packet.Packet(PONG, pkt.data or None))
        elif ptype == NOOP:
            pass
        else:
            raise self._remote_error(f"unexpected packet type {ptype}", CloseReason.PARSE_ERROR)

    # --- polling -----------------------------------------------------------------------

    def _check_polling(self, what: str) -> None:
        if self.state is State.CLOSED:
            raise _unknown_sid()
        if self.transport is not Transport.POLLING:
            # the reference server answers 400 and the upgraded session lives on
            raise self._remote_error(
                f"{what} after upgrade", CloseReason.TRANSPORT_ERROR, close=False
            )

    def begin_get(self, now: float) -> None:
        """A polling GET arrived; a second concurrent one closes the session (400)."""
        self._check_polling("GET")
        if not self._allowed(Trigger.GET):
            raise self._remote_error("overlapping GET", CloseReason.TRANSPORT_ERROR)
        self._fire(Trigger.GET)

    def poll_response(self, now: float) -> str | None:
        """The body answering the held GET, or None while there is nothing to send.

        A non-None answer ends the GET. During an upgrade the answer is NOOP (`6`) and the
        queued packets stay for the websocket; after a CLOSE or an abort it is the last
        word (`1`, or `6` when the client closed).
        """
        if self._get(GetState) is not GetState.HELD:
            raise LocalProtocolError("no GET is held")
        if self.state is State.CLOSED:
            answer = self._final_poll_answer or "1"
        elif self.state is State.UPGRADING or self.transport is Transport.WEBSOCKET:
            answer = "6"
        elif self._outbound:
            answer = self._take_polling_payload()
        else:
            return None
        self._fire(Trigger.GET_ANSWERED)
        return answer

    def _take_polling_payload(self) -> str:
        packets: list[eio_packet.Packet] = []
        size = 0
        while self._outbound and len(packets) < self.config.max_packets_per_poll:
            pkt = self._outbound[0]
            pkt_size = _packet_size(pkt)
            if packets and size + pkt_size > self.config.max_payload_bytes:
                break
            packets.append(self._take_packet())
            size += pkt_size
        if packets[-1].packet_type == CLOSE and self.state is State.CLOSING:
            self._close_sent()
        encoded: str = Payload(packets=packets).encode()
        return encoded

    def _close_sent(self) -> None:
        self._fire(Trigger.CLOSE_SENT)
        self._close_deadline = None
        self._events.append(SessionClosed(reason=self._close_reason or CloseReason.SERVER_CLOSE))

    def abandon_get(self, now: float) -> None:
        """The client went away while its GET was held: the session ends."""
        if self._get(GetState) is GetState.HELD:
            self._fire(Trigger.GET_ANSWERED)
            self._abort(CloseReason.TRANSPORT_CLOSE)

    def begin_post(self, now: float, content_length: int | None = None) -> None:
        """A polling POST arrived; a second concurrent one closes the session (400), and
        so does an announced body larger than maxPayload (413, before reading it)."""
        self._check_polling("POST")
        if not self._allowed(Trigger.POST):
            raise self._remote_error("overlapping POST", CloseReason.TRANSPORT_ERROR)
        if content_length is not None and content_length > self.config.max_payload_bytes:
            raise self._remote_error("payload too large", CloseReason.PARSE_ERROR,
                                     failure=Failure.TOO_LARGE)
        self._fire(Trigger.POST)
        self._post_body.clear()

    def receive_post_data(self, data: bytes) -> None:
        """A chunk of the POST body (only stored). The moment the body grows past
        maxPayload the POST ends and so does the session: raises `RemoteProtocolError`
        (413) without waiting for the rest."""
        if self._get(PostState) is not PostState.READING:
            raise LocalProtocolError("no POST is being read")
        self._post_body += data
        if len(self._post_body) > self.config.max_payload_bytes:
            self.end_post()
            raise self._remote_error("payload too large", CloseReason.PARSE_ERROR,
                                     failure=Failure.TOO_LARGE)

    def post_timed_out(self) -> RemoteProtocolError:
        """The POST body did not arrive in time: the POST ends (the session lives on);
        answer with what this returns (408)."""
        self.end_post()
        return RemoteProtocolError("request body timeout", failure=Failure.TIMEOUT)

    def end_of_post(self, now: float, *, batch: int | None = None) -> bool:
        """The whole POST body arrived: deliver its packets, in order; with `batch`, at
        most that many now (`continue_post()` delivers the rest, so the transport can
        yield between batches). True once every packet is delivered.

        Raises `RemoteProtocolError` (and the session ends) if the body carries more
        than `max_packets_per_post` packets (checked before decoding any) or a packet
        is invalid.
        """
        if self._get(PostState) is not PostState.READING:
            raise LocalProtocolError("no POST is being read")
        body = bytes(self._post_body)
        self.end_post()
        if self.state is State.CLOSED:
            raise _unknown_sid()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise self._remote_error("payload is not UTF-8", CloseReason.PARSE_ERROR) from None
        if text.count(SEPARATOR) + 1 > self.config.max_packets_per_post:
            raise self._remote_error("too many packets in one payload", CloseReason.PARSE_ERROR)
        self._post_segments = collections.deque(text.split(SEPARATOR))
        return self.continue_post(now, batch=batch)

    def continue_post(self, now: float, *, batch: int | None = None) -> bool:
        """Decode and deliver (at most `batch`) more packets of the POST body that
        `end_of_post()` took; True once none is left. Raises like `end_of_post()`."""
        segments = self._post_segments
        count = 0
        while segments and (batch is None or count < batch):
            if self._is_closed():  # a CLOSE: what follows it is not delivered
                segments.clear()
                break
            try:
                pkt = decode_packet(segments.popleft())
            except RemoteProtocolError as exc:
                segments.clear()
                raise self._remote_error(exc.message, CloseReason.PARSE_ERROR) from None
            if pkt.packet_type in (OPEN, UPGRADE):
                segments.clear()
                raise self._remote_error("unexpected packet type", CloseReason.PARSE_ERROR)
            self._receive_packet(pkt, now)
            count += 1
        return not segments

    def end_post(self) -> None:
        """The POST is over, whatever happened to it (idempotent)."""
        if self._get(PostState) is PostState.READING:
            self._fire(Trigger.POST_DONE)
        self._post_body.clear()

    # --- websocket ---------------------------------------------------------------------

    def attach_websocket(self, now: float) -> int:
        """A websocket for this session was accepted; returns its token for later calls.

        For a websocket-only session this is its transport; for a polling session it is an
        upgrade probe. Raises `RemoteProtocolError` (the session is untouched; the caller
        closes this websocket) when the session is gone, a websocket is already attached
        (a probe, or the upgraded transport) or the session cannot be upgraded now.
        """
        if self.state is State.CLOSED:
            raise _unknown_sid()
        if self.ws_state is not WsState.EMPTY:
            raise RemoteProtocolError("a websocket is already attached")
        trigger = Trigger.ATTACH if self.transport is Transport.WEBSOCKET else Trigger.ATTACH_PROBE
        if not self._allowed(trigger):
            raise RemoteProtocolError(f"cannot upgrade in state {self.state.value}")
        self._fire(trigger)
        if trigger is Trigger.ATTACH_PROBE:
            self._upgrade_deadline = now + self.config.upgrade_timeout_s
        self._ws_token += 1
        return self._ws_token

    def ws_active(self, token: int) -> bool:
        """Whether the websocket holding `token` should stay open."""
        return self.ws_state is not WsState.EMPTY and token == self._ws_token

    def _drop_probe(self) -> None:
        self._fire(Trigger.PROBE_FAILED)
        self._probe_output.clear()
        self._upgrade_deadline = None

    def receive_ws_message(self, token: int, data: str | bytes, now: float) -> None:
        """One websocket message. Raises `RemoteProtocolError` on a protocol violation.

        On the session's own websocket a violation ends the session; on an upgrade probe
        it only drops the probe (polling carries on).
        """
        if not self.ws_active(token):
            return
        probe = self.ws_state is WsState.PROBE
        if _message_size(data) > self.config.max_payload_bytes:
            if not probe:
                raise self._remote_error("message too large", CloseReason.PARSE_ERROR,
                                     failure=Failure.TOO_LARGE)
            self._drop_probe()
            raise RemoteProtocolError("message too large", failure=Failure.TOO_LARGE)
        if probe:
            self._receive_probe_message(data)
            return
        try:
            pkt = decode_packet(data)
        except RemoteProtocolError as exc:
            raise self._remote_error(exc.message, CloseReason.PARSE_ERROR) from None
        if pkt.packet_type in (OPEN, UPGRADE):
            raise self._remote_error("unexpected packet type", CloseReason.PARSE_ERROR)
        self._receive_packet(pkt, now)

    def _receive_probe_message(self, data: str | bytes) -> None:
        if data == f"{PING}{PROBE}" and self._allowed(Trigger.PROBE):
            self._fire(Trigger.PROBE)
            self._probe_output.append(f"{PONG}{PROBE}")
        elif data == str(UPGRADE) and self._allowed(Trigger.UPGRADE):
            self._fire(Trigger.UPGRADE)
            self._upgrade_deadline = None
            self._events.append(Upgraded())
        elif data == str(NOOP):
            pass
        else:
            self._drop_probe()
            raise RemoteProtocolError("unexpected packet during upgrade")

    def take_ws_output(self, token: int) -> list[str | bytes]:
        """Frames to write on the websocket holding `token` (may be empty).

        Before an upgrade completes this is only the probe's `3probe`; afterwards it is the
        session's queue, in order. Handing out a queued CLOSE ends the session.
        """
        if not self.ws_active(token):
            return []
        if self.ws_state is WsState.PROBE:
            frames: list[str | bytes] = list(self._probe_output)
            self._probe_output.clear()
            return frames
        out: list[str | bytes] = []
        while self._outbound:
            pkt = self._take_packet()
            out.append(encode_ws(pkt))
            if pkt.packet_type == CLOSE and self.state is State.CLOSING:
                self._close_sent()
                break
        return out

    def websocket_closed(self, token: int, now: float) -> None:
        """The websocket holding `token` went away (a stale token is ignored)."""
        if token != self._ws_token:
            return
        if self.ws_state is WsState.ATTACHED:
            self._abort(CloseReason.TRANSPORT_CLOSE)
        elif self.ws_state is WsState.PROBE:
            self._drop_probe()

    # --- time --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `tick()` must next be called, or None if no timer is running."""
        times = [
            t
            for t in (
                self._next_ping_at,
                self._pong_deadline,
                self._upgrade_deadline,
                self._close_deadline,
                self._slow_deadline(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def _slow_deadline(self) -> float | None:
        if self.state in (State.CLOSING, State.CLOSED):  # the close grace bounds it
            return None
        oldest = self._oldest_unwritten()
        return None if oldest is None else oldest + self.config.slow_client_timeout_s

    def tick(self, now: float) -> None:
        """Let time pass: send a PING, or end the session on a missed PONG, a packet
        left unwritten too long, etc."""
        self._now = max(self._now, now)
        if self.state is State.CLOSED:
            return
        slow = self._slow_deadline()
        if slow is not None and now >= slow:
            self._abort(CloseReason.SLOW_CLIENT)
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            self._abort(self._close_reason or CloseReason.SERVER_CLOSE)
            return
        if self._pong_deadline is not None and now >= self._pong_deadline:
            self._abort(CloseReason.PING_TIMEOUT)
            return
        if self._upgrade_deadline is not None and now >= self._upgrade_deadline:
            self._drop_probe()
        if (
            self._next_ping_at is not None
            and now >= self._next_ping_at
            and self._pong_deadline is None
            and self.is_open
        ):
            self._next_ping_at = None
            self._pong_deadline = now + self.config.ping_timeout_s
            self._queue(eio_packet.Packet(PING))

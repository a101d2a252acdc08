"""Typed configuration of the Engine.IO / Socket.IO server.

The realtime package takes this plain frozen dataclass rather than the app's `Settings`,
so the conformance entry point and the tests can pass the protocol reference values
without touching the environment. Units are in the names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fabricai_trio.settings import Settings


@dataclass(frozen=True, kw_only=True)
class RealtimeConfig:
    """Limits and timers of one Engine.IO server (and the Socket.IO layer above it)."""

    ping_interval_ms: int = 25_000
    """Time between two server PINGs (sent in the handshake)."""
    ping_timeout_ms: int = 20_000
    """Time the client has to answer a PING with a PONG before the session closes."""
    max_payload_bytes: int = 1_000_000
    """Largest polling POST body or websocket message we accept (sent in the handshake)."""
    connect_timeout_ms: int = 45_000
    """Time a client has to CONNECT to a Socket.IO namespace after the handshake."""
    cors_origins: tuple[str, ...] = ()
    """Allowed `Origin`s: empty = same-origin only, `("*",)` = any origin."""
    path: str = "/socket.io/"
    """Path prefix the Engine.IO endpoint answers under."""
    upgrade_timeout_ms: int = 10_000
    """Time between a websocket probe and its UPGRADE packet before the probe is dropped."""
    close_grace_ms: int = 5_000
    """How long a gracefully closing polling session waits for a GET to fetch its CLOSE."""
    max_buffered_packets: int = 10_000
    """Outbound packets one session may have waiting; more closes it (slow consumer)."""
    max_buffered_bytes: int = 16 * 1024 * 1024
    """Outbound bytes one session may have waiting; more closes it (slow consumer)."""
    slow_client_timeout_ms: int = 15_000
    """Time a packet may stay unwritten (queued, or handed to a transport that could not
    write it) before the session closes as a slow client."""
    max_packets_per_post: int = 1000
    """Packets one polling POST may carry; more is a 400 and the session closes."""
    max_inbound_bytes: int = 4_000_000
    """Received message bytes waiting for the application before the transport stops
    reading (with `max_inbound_backlog`)."""
    max_inflight_events: int = 100
    """Socket.IO event handlers one namespace connection may have running; more are
    refused (the application's `on_busy` answers them)."""
    max_inflight_bytes: int = 8 * 1024 * 1024
    """Bytes of the Socket.IO events of one connection whose handlers are running."""
    max_sessions: int = 10_000
    """Engine.IO sessions at once; a handshake beyond it gets 503."""
    max_unconnected: int = 1000
    """Sessions not yet connected to a Socket.IO namespace; one beyond it is closed."""
    max_packets_per_poll: int = 16
    """Packets in one polling GET response: python-engineio clients reject more than 16."""
    max_inbound_backlog: int = 256
    """Received messages waiting for the application before the transport stops reading."""
    max_attachments: int = 10
    """Binary attachments one Socket.IO packet may announce."""
    body_timeout_ms: int = 30_000
    """Time a polling POST has to deliver its whole body."""
    disconnect_handler_timeout_ms: int = 5_000
    """Time disconnect handlers get once a session has ended."""
    shutdown_timeout_ms: int = 2_000
    """Time `shutdown()` waits for clients to receive their CLOSE before dropping them."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"RealtimeConfig.{f.name} must be positive, got {value}")
        if not self.path.startswith("/"):
            raise ValueError("RealtimeConfig.path must start with '/'")

    @property
    def ping_interval_s(self) -> float:
        return self.ping_interval_ms / 1000

    @property
    def ping_timeout_s(self) -> float:
        return self.ping_timeout_ms / 1000

    @property
    def connect_timeout_s(self) -> float:
        return self.connect_timeout_ms / 1000

    @property
    def upgrade_timeout_s(self) -> float:
        return self.upgrade_timeout_ms / 1000

    @property
    def close_grace_s(self) -> float:
        return self.close_grace_ms / 1000

    @property
    def slow_client_timeout_s(self) -> float:
        return self.slow_client_timeout_ms / 1000

    @property
    def body_timeout_s(self) -> float:
        return self.body_timeout_ms / 1000

    @property
    def disconnect_handler_timeout_s(self) -> float:
        return self.disconnect_handler_timeout_ms / 1000

    @property
    def shutdown_timeout_s(self) -> float:
        return self.shutdown_timeout_ms / 1000

    @classmethod
    def from_settings(cls, settings: Settings, *, path: str = "/socket.io/") -> RealtimeConfig:
        """The server's configuration from the application settings."""
        return cls(
            ping_interval_ms=settings.socketio_ping_interval_ms,
            ping_timeout_ms=settings.socketio_ping_timeout_ms,
            max_payload_bytes=settings.socketio_max_payload,
            connect_timeout_ms=settings.socketio_connect_timeout_ms,
            cors_origins=tuple(settings.cors_origins),
            path=path,
            slow_client_timeout_ms=max(1, round(settings.slow_client_timeout_seconds * 1000)),
            max_packets_per_post=settings.socketio_max_packets_per_post,
            max_inbound_bytes=max(settings.socketio_max_payload,
                                  settings.socketio_max_inflight_bytes // 2),
            max_inflight_events=settings.socketio_max_inflight_events,
            max_inflight_bytes=settings.socketio_max_inflight_bytes,
            max_sessions=settings.socketio_max_sessions,
            max_unconnected=settings.socketio_max_unconnected,
        )

    @classmethod
    def reference(cls, *, path: str = "/socket.io/") -> RealtimeConfig:
        """The configuration the protocol test suites expect (socket.io docs, v4/v5)."""
        return cls(
            ping_interval_ms=300,
            ping_timeout_ms=200,
            max_payload_bytes=1_000_000,
            connect_timeout_ms=1000,
            cors_origins=("*",),
            path=path,
        )

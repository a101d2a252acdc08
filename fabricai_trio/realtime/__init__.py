"""Engine.IO v4 + Socket.IO v5 on trio (python-socketio's AsyncServer is asyncio-only).

Layers, each usable alone:

- `eio_request`: sans-IO routing of a request (query, handshake rules, unknown sids,
  CORS) and every HTTP answer;
- `eio_session`: sans-IO Engine.IO session, its state machines in one transition table
  (no trio, time passed in);
- `eio_socket`: `EngineIOSocket`, a live session on trio (the application's API, the
  session task and its nursery, the heartbeat);
- `eio_app`: `EngineIOApp`, the trio ASGI transport (moves bytes between requests and
  sessions);
- `sio_protocol`: sans-IO Socket.IO codec;
- `sio_server`: `SocketIOServer`, namespaces, events, acks, rooms, pub/sub fan-out;
- `pubsub` / `redis_pubsub`: the cross-process fan-out hook and its Redis implementation.

Typical wiring::

    server = SocketIOServer(RealtimeConfig.from_settings(settings))
    @server.on("inference_prompt")
    async def prompt(sid, payload): ...
    # mount server.asgi_app under /socket.io/; in the lifespan nursery:
    await nursery.start(server.run)      # ... and on the way out:
    await server.shutdown()
"""

from .config import RealtimeConfig
from .eio_app import EngineIOApp
from .eio_session import CloseReason
from .eio_socket import EngineIOSocket, SessionEnded, SessionHandler
from .errors import ClientGone, ConnectionRefused, LocalProtocolError, RemoteProtocolError
from .pubsub import BroadcastMessage, LocalPubSub, PubSub
from .redis_pubsub import RedisPubSub
from .sio_server import DisconnectReason, SocketIOServer

__all__ = [
    "BroadcastMessage",
    "ClientGone",
    "CloseReason",
    "ConnectionRefused",
    "DisconnectReason",
    "EngineIOApp",
    "EngineIOSocket",
    "LocalProtocolError",
    "LocalPubSub",
    "PubSub",
    "RealtimeConfig",
    "RedisPubSub",
    "RemoteProtocolError",
    "SessionEnded",
    "SessionHandler",
    "SocketIOServer",
]

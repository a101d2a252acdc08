"""Socket.IO events for inference: the same generation path and payloads as SSE.

Client → server: `inference_prompt` (ack `{request_id}` or `{request_id, error}`),
`inference_cancel` `{request_id}`, `inference_resume` `{request_id, last_index?}`,
`join_session` / `leave_session` `{session_id}`.
Server → client: `inference_queued`, `inference_token`, `inference_complete`,
`inference_error` (the SSE event payloads), also sent to the session's room.

Each generation runs as a task in the client's session nursery (`start_task`), so a
disconnect cancels it within one token, unless it asked to be `resumable`: then it runs
in the generation service's nursery, this connection follows its stream log, and a
client that comes back (on any connection, and with Redis on any replica) sends
`inference_resume` to get what it missed and the rest. `inference_cancel` goes through
the generation service, like SSE's cancel route: it finds the caller's generation by
request id on any connection, transport or (with Redis) replica, and that generation
ends with an `inference_complete` whose `finish_reason` is `cancelled`.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import trio

from ..core.errors import (
    AuthThrottled,
    DomainError,
    InvalidField,
    InvalidJson,
    NotFound,
    TooManyEvents,
    Unauthenticated,
    ack_error,
    connect_refusal,
    error_event,
)
from ..core.events import EVENT_NAMES
from ..generation import Generation, Keepalive
from ..realtime import (
    ClientGone,
    CloseReason,
    ConnectionRefused,
    RealtimeConfig,
    RedisPubSub,
    SocketIOServer,
)
from ..realtime.asgi import Scope
from ..realtime.sio_server import PACKET_REJECTED
from ..redis_channels import RedisChannels
from ..sessions import Session
from ..stream_log import NothingMissing, StreamNotFound
from .state import AppState

OWNER = "owner"
PRIORITY_CLASS = "priority_class"


def session_room(session: Session) -> str:
    """The room of one incarnation of a session: a client that joined a session that was
    deleted hears nothing of a session created again under its id (by anyone)."""
    return f"session:{session.id}:{session.incarnation}"


def create_socketio(state: AppState, redis: RedisChannels | None) -> SocketIOServer:
    """The app's Socket.IO server with the inference events registered; with Redis,
    broadcasts fan out to the other replicas."""
    settings = state.settings
    pubsub = (
        RedisPubSub(redis, channel=f"{settings.redis_prefix}socketio") if redis else None
    )
    server = SocketIOServer(RealtimeConfig.from_settings(settings), pubsub=pubsub)
    events = InferenceEvents(server, state)
    events.register()
    state.session_deleted_hooks.append(events.session_deleted)
    return server


class InferenceEvents:
    """The handlers; one instance per app."""

    def __init__(self, server: SocketIOServer, state: AppState) -> None:
        self.server = server
        self.state = state

    def register(self) -> None:
        on = self.server.on
        on("connect")(self.connect)
        on(PACKET_REJECTED)(self.packet_rejected)
        on("inference_prompt")(self.inference_prompt)
        on("inference_cancel")(self.inference_cancel)
        on("inference_resume")(self.inference_resume)
        on("join_session")(self.join_session)
        on("leave_session")(self.leave_session)
        self.server.on_busy(self.busy)

    async def connect(self, sid: str, auth: dict[str, Any] | None, scope: Scope) -> None:
        """Authenticate the CONNECT `auth` payload (`{token}` or `{apiKey}`); refused
        with CONNECT_ERROR `{message, data}`."""
        await trio.lowlevel.checkpoint()
        client = scope.get("client")
        try:
            identity = self.state.auth.authenticate_payload(
                auth, client=client[0] if client else None
            )
        except (Unauthenticated, AuthThrottled) as error:
            raise ConnectionRefused(*connect_refusal(error)) from None
        data = self.server.session_data(sid)
        data[OWNER] = identity.owner
        data[PRIORITY_CLASS] = identity.priority_class

    async def packet_rejected(self, sid: str, reason: str) -> dict[str, Any]:
        """An event whose JSON is beyond the bounds: `inference_error` (`invalid_json`)
        and the same in the ACK; the connection goes on."""
        return await self.refuse(sid, InvalidJson(reason), None)

    @staticmethod
    def request_id_of(payload: Any) -> str | None:
        """The payload's `request_id` if it is a string (it is validated later)."""
        value = payload.get("request_id") if isinstance(payload, dict) else None
        return value if isinstance(value, str) else None

    def owner(self, sid: str) -> str:
        owner: str = self.server.session_data(sid)[OWNER]
        return owner

    async def refuse(self, sid: str, error: DomainError, request_id: str | None
                     ) -> dict[str, Any]:
        """An `inference_error` event and the ack that says the same."""
        await self.server.emit("inference_error", error_event(error, request_id).model_dump(),
                               to=sid)
        return ack_error(error, request_id)

    async def inference_prompt(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        request_id = self.request_id_of(payload)
        service = self.state.service
        try:
            generation = await service.prepare(
                service.parse(payload), owner=self.owner(sid),
                priority_class=self.server.session_data(sid).get(PRIORITY_CLASS),
            )
        except DomainError as error:
            return await self.refuse(sid, error, request_id)
        if generation.resumable:
            await service.start_detached(generation)
            try:
                self.server.start_task(sid, self.follow, sid, generation.session,
                                       generation.request_id, -1, generation)
            except ClientGone:
                generation.watch(-1)
                raise
            return {"request_id": generation.request_id}
        try:
            self.server.start_task(sid, self.stream, sid, generation)
        except ClientGone:
            await generation.close()
            raise
        return {"request_id": generation.request_id}

    async def busy(self, sid: str, event: str, args: list[Any]) -> dict[str, Any]:
        """An event refused because this connection has too many in flight."""
        error = TooManyEvents(self.server.config.max_inflight_events)
        return await self.refuse(sid, error, self.request_id_of(args[0] if args else None))

    async def inference_resume(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Replay what the client missed of its stream (after the token `last_index`;
        everything if absent) and follow it to its end, on this connection. Never starts
        a generation."""
        request_id = self.request_id_of(payload)
        last_index = payload.get("last_index") if isinstance(payload, dict) else None
        try:
            if request_id is None:
                raise InvalidField("request_id", "field required")
            if last_index is not None and (type(last_index) is not int or last_index < -1):
                raise InvalidField("last_index", "must be an integer >= -1")
            after = -1 if last_index is None else last_index + 1
            await self.state.service.stream_log.check((self.owner(sid), request_id), after)
        except NothingMissing:
            return {"request_id": request_id, "resumed": False, "complete": True}
        except DomainError as error:
            return await self.refuse(sid, error, request_id)
        self.server.start_task(sid, self.follow, sid, None, request_id, after, None)
        return {"request_id": request_id, "resumed": True}

    async def follow(self, sid: str, session: Session | None, request_id: str, after: int,
                     creator: Generation | None) -> None:
        """Emit a stream read from the stream log; `creator`: this connection started the
        resumable generation and stops counting as its follower when it ends."""
        room = session_room(session) if session else None
        try:
            events = self.state.service.follow(self.owner(sid), request_id, after)
            async with aclosing(events) as items:
                async for _, event in items:
                    await self.emit(sid, room, EVENT_NAMES[type(event)], event.model_dump())
        except (NothingMissing, StreamNotFound):
            pass  # it expired between the check and the read: nothing more to send
        finally:
            if creator is not None:
                creator.watch(-1)

    async def stream(self, sid: str, generation: Generation) -> None:
        """Emit one generation's events to the client (and its session's room)."""
        room = session_room(generation.session) if generation.session else None
        try:
            closed_because = self.server.close_reason_of(sid)
            generation.cut_cause = lambda: (
                "slow_client" if closed_because() is CloseReason.SLOW_CLIENT else "disconnect"
            )
            async with aclosing(generation.events()) as events:
                async for event in events:
                    if not isinstance(event, Keepalive):
                        await self.emit(sid, room, EVENT_NAMES[type(event)], event.model_dump())
        finally:
            with trio.CancelScope(shield=True):
                await generation.close()  # no-op if events() ran its course

    async def emit(self, sid: str, room: str | None, name: str, payload: dict[str, Any]) -> None:
        await self.server.emit(f"inference_{name}", payload, to=sid)
        if room is not None:
            await self.server.emit(f"inference_{name}", payload, to=room, skip_sid=sid)

    async def inference_cancel(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        request_id = self.request_id_of(payload)
        if request_id is not None and await self.state.service.cancel(
            self.owner(sid), request_id, "cancel"
        ):
            return {"request_id": request_id, "cancelled": True}
        await trio.lowlevel.checkpoint()
        error = NotFound("no running generation of yours has this request_id",
                         code="request_not_found", param="request_id")
        return {"cancelled": False, **ack_error(error, request_id)}

    async def join_session(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        try:
            if not isinstance(session_id, str):
                raise InvalidField("session_id", "field required")
            session = await self.state.service.open_session(session_id, self.owner(sid))
        except DomainError as error:
            return {"session_id": session_id, "error": ack_error(error, None)["error"]}
        self.server.enter_room(sid, session_room(session))
        return {"session_id": session_id, "joined": True}

    async def leave_session(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Leave every room of that session id (whatever incarnation was joined)."""
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        await trio.lowlevel.checkpoint()
        if isinstance(session_id, str):
            prefix = f"session:{session_id}:"
            for room in self.server.rooms_of(sid):
                if room.startswith(prefix):
                    self.server.leave_room(sid, room)
        return {"session_id": session_id, "left": True}

    async def session_deleted(self, session: Session) -> None:
        """Empty the deleted session's room, on this replica and every other one.
        Cancelled: this replica's room is empty; the others may keep theirs (their
        members still hear nothing of a new session under the id: rooms are per
        incarnation)."""
        await self.server.close_room(session_room(session))

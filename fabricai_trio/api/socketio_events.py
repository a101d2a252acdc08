"""Socket.IO events for inference: the same generation path and payloads as SSE.

Client → server: `inference_prompt` (ack `{request_id}` or `{request_id, error}`),
`inference_cancel` `{request_id}`, `join_session` / `leave_session` `{session_id}`.
Server → client: `inference_queued`, `inference_token`, `inference_complete`,
`inference_error` (the SSE event payloads), also sent to the session's room.

Each generation runs as a task in the client's session nursery (`start_task`), so a
disconnect cancels it within one token. `inference_cancel` goes through the generation
service, like SSE's cancel route: it finds the caller's generation by request id on any
connection, transport or (with Redis) replica, and that generation ends with an
`inference_complete` whose `finish_reason` is `cancelled`.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

import trio

from ..core.errors import (
    DomainError,
    InvalidField,
    NotFound,
    Unauthenticated,
    ack_error,
    connect_refusal,
    error_event,
)
from ..core.events import EVENT_NAMES
from ..core.requests import parse_generation_request
from ..generation import Generation, Keepalive
from ..realtime import ClientGone, ConnectionRefused, RealtimeConfig, RedisPubSub, SocketIOServer
from ..realtime.asgi import Scope
from ..redis_channels import RedisChannels
from .state import AppState

log = logging.getLogger(__name__)

OWNER = "owner"


def session_room(session_id: str) -> str:
    return f"session:{session_id}"


def create_socketio(state: AppState, redis: RedisChannels | None) -> SocketIOServer:
    """The app's Socket.IO server with the inference events registered; with Redis,
    broadcasts fan out to the other replicas."""
    settings = state.settings
    pubsub = (
        RedisPubSub(redis, channel=f"{settings.redis_prefix}socketio") if redis else None
    )
    server = SocketIOServer(RealtimeConfig.from_settings(settings), pubsub=pubsub)
    InferenceEvents(server, state).register()
    return server


class InferenceEvents:
    """The handlers; one instance per app."""

    def __init__(self, server: SocketIOServer, state: AppState) -> None:
        self.server = server
        self.state = state

    def register(self) -> None:
        on = self.server.on
        on("connect")(self.connect)
        on("inference_prompt")(self.inference_prompt)
        on("inference_cancel")(self.inference_cancel)
        on("join_session")(self.join_session)
        on("leave_session")(self.leave_session)

    async def connect(self, sid: str, auth: dict[str, Any] | None, scope: Scope) -> None:
        """Authenticate the CONNECT `auth` payload (`{token}` or `{apiKey}`); refused
        with CONNECT_ERROR `{message, data}`."""
        await trio.lowlevel.checkpoint()
        try:
            owner = self.state.auth.authenticate_payload(auth).owner
        except Unauthenticated as error:
            raise ConnectionRefused(*connect_refusal(error)) from None
        self.server.session_data(sid)[OWNER] = owner

    def owner(self, sid: str) -> str:
        owner: str = self.server.session_data(sid)[OWNER]
        return owner

    async def inference_prompt(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        try:
            request = parse_generation_request(
                payload, max_tokens_limit=self.state.settings.max_tokens_limit
            )
            generation = await self.state.service.prepare(request, owner=self.owner(sid))
        except DomainError as error:
            await self.server.emit(
                "inference_error", error_event(error, request_id).model_dump(), to=sid
            )
            return ack_error(error, request_id)
        try:
            self.server.start_task(sid, self.stream, sid, generation)
        except ClientGone:
            await generation.close()
            raise
        return {"request_id": generation.request_id}

    async def stream(self, sid: str, generation: Generation) -> None:
        """Emit one generation's events to the client (and its session's room)."""
        room = session_room(generation.session.id) if generation.session else None
        try:
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
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        if isinstance(request_id, str) and await self.state.service.cancel(
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
            await self.state.service.open_session(session_id, self.owner(sid))
        except DomainError as error:
            return {"session_id": session_id, "error": ack_error(error, None)["error"]}
        self.server.enter_room(sid, session_room(session_id))
        return {"session_id": session_id, "joined": True}

    async def leave_session(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        await trio.lowlevel.checkpoint()
        if isinstance(session_id, str):
            self.server.leave_room(sid, session_room(session_id))
        return {"session_id": session_id, "left": True}

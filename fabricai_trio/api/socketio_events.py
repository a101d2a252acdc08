"""Socket.IO events for inference: the same generation path and payloads as SSE.

Client → server: `inference_prompt` (ack `{request_id}` or `{error}`), `inference_cancel`
`{request_id}`, `join_session` / `leave_session` `{session_id}`.
Server → client: `inference_queued`, `inference_token`, `inference_complete`,
`inference_error` (the SSE event payloads), also sent to the session's room.

Each generation runs as a task in the client's session nursery (`start_task`), so a
disconnect cancels it within one token; `inference_cancel` cancels just that one and
ends it with an `inference_complete` whose `finish_reason` is `cancelled`.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import trio

from ..generation import Generation, Keepalive
from ..realtime import ClientGone, ConnectionRefused, RealtimeConfig, RedisPubSub, SocketIOServer
from ..realtime.asgi import Scope
from .errors import ApiError
from .schemas import EVENT_NAMES, ErrorEvent, parse_generation_request

if TYPE_CHECKING:
    from ..app import AppState

log = logging.getLogger(__name__)

GENERATIONS = "generations"  # session_data key: request_id -> (Generation, CancelScope)
OWNER = "owner"


def session_room(session_id: str) -> str:
    return f"session:{session_id}"


def error_payload(request_id: str | None, error: ApiError) -> dict[str, Any]:
    """`inference_error` data: the SSE `error` event's shape."""
    return ErrorEvent(
        request_id=request_id or "", code=error.status, error=error.code, message=error.message
    ).model_dump()


def create_socketio(state: AppState) -> SocketIOServer:
    """The app's Socket.IO server with the inference events registered."""
    settings = state.settings
    pubsub = (
        RedisPubSub(settings.redis_url, channel=f"{settings.redis_prefix}socketio")
        if settings.redis_url
        else None
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
        data = self.server.session_data(sid)
        data[OWNER] = await self.identify(auth, scope)
        data[GENERATIONS] = {}

    async def identify(self, auth: dict[str, Any] | None, scope: Scope) -> str:
        """The connecting client's owner id, from the CONNECT auth payload
        (`{token}` or `{apiKey}`); refused with CONNECT_ERROR `{message, data}`."""
        await trio.lowlevel.checkpoint()
        try:
            return self.state.auth.authenticate_payload(auth).owner
        except ApiError as error:
            raise ConnectionRefused(error.message, error.body()["error"]) from None

    async def inference_prompt(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        data = self.server.session_data(sid)
        try:
            request = parse_generation_request(
                payload, max_tokens_limit=self.state.settings.max_tokens_limit
            )
            if request.request_id in data[GENERATIONS]:
                raise ApiError(409, "duplicate_request_id",
                               "a generation with this request_id is running", "request_id")
            generation = await self.state.service.prepare(request, owner=data[OWNER])
        except ApiError as error:
            await self.server.emit("inference_error", error_payload(request_id, error), to=sid)
            return {"request_id": request_id, "error": error.body()["error"]}
        scope = trio.CancelScope()
        data[GENERATIONS][generation.request_id] = (generation, scope)
        try:
            self.server.start_task(sid, self.stream, sid, generation, scope)
        except ClientGone:
            data[GENERATIONS].pop(generation.request_id, None)
            await generation.close()
            raise
        return {"request_id": generation.request_id}

    async def stream(self, sid: str, generation: Generation, scope: trio.CancelScope) -> None:
        """Emit one generation's events to the client (and its session's room)."""
        room = session_room(generation.session.id) if generation.session else None
        try:
            with scope:
                async with aclosing(generation.events()) as events:
                    async for event in events:
                        if not isinstance(event, Keepalive):
                            await self.emit(sid, room, EVENT_NAMES[type(event)], event.model_dump())
            if scope.cancelled_caught:
                final = generation.complete_event()
                await self.emit(sid, room, "complete", final.model_dump())
        finally:
            self.server.session_data(sid)[GENERATIONS].pop(generation.request_id, None)
            with trio.CancelScope(shield=True):
                await generation.close()  # no-op if events() ran its course

    async def emit(self, sid: str, room: str | None, name: str, payload: dict[str, Any]) -> None:
        await self.server.emit(f"inference_{name}", payload, to=sid)
        if room is not None:
            await self.server.emit(f"inference_{name}", payload, to=room, skip_sid=sid)

    async def inference_cancel(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        running = self.server.session_data(sid)[GENERATIONS].get(request_id)
        if running is None:
            await trio.lowlevel.checkpoint()
            error = ApiError(404, "request_not_found", "no running generation with this "
                             "request_id on this connection", "request_id")
            return {"request_id": request_id, "cancelled": False, "error": error.body()["error"]}
        generation, scope = running
        generation.cancel_cause = "cancel"
        scope.cancel()
        await trio.lowlevel.checkpoint()
        return {"request_id": request_id, "cancelled": True}

    async def join_session(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        try:
            if not isinstance(session_id, str):
                raise ApiError(422, "invalid_field", "session_id: field required", "session_id")
            owner = self.server.session_data(sid)[OWNER]
            await self.state.service.open_session(session_id, owner)
        except ApiError as error:
            return {"session_id": session_id, "error": error.body()["error"]}
        self.server.enter_room(sid, session_room(session_id))
        return {"session_id": session_id, "joined": True}

    async def leave_session(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        session_id = payload.get("session_id") if isinstance(payload, dict) else None
        await trio.lowlevel.checkpoint()
        if isinstance(session_id, str):
            self.server.leave_room(sid, session_room(session_id))
        return {"session_id": session_id, "left": True}

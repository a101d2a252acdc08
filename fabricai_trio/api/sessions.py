"""HTTP routes of conversation sessions: create, list, read, read messages, delete.

Thin like the SSE routes. Ownership (`UnknownSession`: another identity's session
looks exactly like a missing one), limits and the store timeout
(`SessionStoreUnavailable`) come from the `GenerationService`, so a session is found,
refused and timed out the same way here as in a generation request.
The caller is `current_owner()`: when auth lands, these routes follow it unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Response, jsonify, request

from ..core.errors import SessionIdTaken, UnknownSession
from ..sessions import SessionExists
from .routes import current_owner, read_json_body
from .schemas import (
    SessionCreateRequest,
    SessionList,
    SessionMessage,
    SessionMessages,
    SessionObject,
    parse_body,
)
from .state import state

blueprint = Blueprint("sessions", __name__)


def _json(model: BaseModel, status: int = 200) -> Response:
    response = jsonify(model.model_dump(mode="json"))
    response.status_code = status
    return response


async def _optional_json_body() -> Any:
    """The JSON body, or `{}` when there is none (a bare `POST /v1/sessions`)."""
    if not await request.get_data(cache=True):
        return {}
    return await read_json_body()


@blueprint.post("/v1/sessions")
async def create_session() -> Response:
    body = parse_body(SessionCreateRequest, await _optional_json_body())
    service = state().service
    try:
        session = await service.store_call(
            service.store.create(
                current_owner(), system_prompt=body.system_prompt, session_id=body.session_id
            )
        )
    except SessionExists:
        raise SessionIdTaken() from None
    response = _json(SessionObject.model_validate(session.info()), 201)
    response.headers["Location"] = f"/v1/sessions/{session.id}"
    return response


@blueprint.get("/v1/sessions")
async def list_sessions() -> Response:
    service = state().service
    infos = await service.store_call(service.store.list_sessions(current_owner()))
    return _json(SessionList(data=[SessionObject.model_validate(i) for i in infos]))


@blueprint.get("/v1/sessions/<session_id>")
async def get_session(session_id: str) -> Response:
    session = await state().service.open_session(session_id, current_owner())
    return _json(SessionObject.model_validate(session.info()))


@blueprint.get("/v1/sessions/<session_id>/messages")
async def get_messages(session_id: str) -> Response:
    session = await state().service.open_session(session_id, current_owner())
    messages = [SessionMessage.model_validate(m) for m in session.messages]
    return _json(SessionMessages(session_id=session.id, data=messages))


@blueprint.delete("/v1/sessions/<session_id>")
async def delete_session(session_id: str) -> Response:
    """204 once gone. A generation running on it finishes; its turn is then not stored
    (not even in a session created again under the same id), and the session's
    Socket.IO room is emptied on every replica."""
    app_state = state()
    service = app_state.service
    session = await service.open_session(session_id, current_owner())
    deleted = await service.store_call(
        service.store.delete(session.id, incarnation=session.incarnation)
    )
    if not deleted:
        raise UnknownSession()  # deleted meanwhile
    await app_state.session_deleted(session)
    response = Response(b"", status=204)
    del response.headers["Content-Type"]  # no body, so no type
    return response

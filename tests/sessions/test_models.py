"""The session models: frozen, validated, and their JSON form round-trips."""

from __future__ import annotations

import pydantic
import pytest

from fabricai_trio.sessions import Message, Session, SessionInfo


def test_message_defaults_and_validation() -> None:
    message = Message(role="user", content="hi")
    assert message.finish_reason is None and message.request_id is None
    assert message.created_at > 1_600_000_000
    for bad in (
        {"role": "robot", "content": "x"},
        {"role": "user", "content": "x", "finish_reason": "timeout"},
        {"role": "user", "content": "x", "prompt_tokens": -1},
        {"role": "user", "content": "x", "unknown": 1},
    ):
        with pytest.raises(pydantic.ValidationError):
            Message(**bad)


def test_models_are_frozen() -> None:
    message = Message(role="user", content="hi")
    with pytest.raises(pydantic.ValidationError):
        message.content = "changed"  # type: ignore[misc]
    session = Session(id="s", owner="o", created_at=1.0, updated_at=2.0, messages=(message,))
    assert isinstance(session.messages, tuple)


def test_json_round_trip() -> None:
    message = Message(
        role="assistant",
        content='multi\nline "quoted" \x00 ✓',
        finish_reason="cancelled",
        prompt_tokens=5,
        completion_tokens=7,
        created_at=1700000000.123456,
        request_id="req-1",
    )
    assert Message.from_json(message.to_json()) == message
    session = Session(id="s", owner="o", created_at=1.5, updated_at=2.5, messages=(message,))
    assert Session.from_json(session.to_json()) == session
    info = session.info()
    assert info == SessionInfo(id="s", owner="o", created_at=1.5, updated_at=2.5, message_count=1)
    assert SessionInfo.from_json(info.to_json().encode()) == info

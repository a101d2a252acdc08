"""Property tests: whatever a client sends, the parsers answer with a value or with their
documented error, never anything else (an unexpected exception is a 500 on HTTP and a
dead session task on Socket.IO).

Inputs are JSON-shaped values (deep, wide, huge integers, odd floats and strings), field
names of the real request models with values of any type, and raw Engine.IO/Socket.IO
text and bytes. Hypothesis shrinks a failure to the smallest input that shows it.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabricai_trio.api.openai.protocol import parse_chat_request, parse_completion_request
from fabricai_trio.core.errors import DomainError
from fabricai_trio.core.requests import GenerationRequest, parse_generation_request
from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.eio_session import EngineIOSession, Transport
from fabricai_trio.realtime.errors import RemoteProtocolError
from fabricai_trio.realtime.sio_protocol import SocketIOParser

EXAMPLES = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | json_values,
         "content": st.text(max_size=40) | json_values},
    ) | json_values,
    max_size=4,
)


def request_bodies(field_names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts over the model's own field names (plus strangers) with values of any type."""
    keys = st.sampled_from([*field_names, "unknown_field"])
    values = json_values | messages | st.integers(min_value=-5, max_value=5000)
    return st.dictionaries(keys, values, max_size=8)


GENERATION_FIELDS = list(GenerationRequest.model_fields)
OPENAI_FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "stop", "stream", "stream_options", "seed", "n", "user", "session_id",
    "logprobs", "tools", "response_format", "presence_penalty", "frequency_penalty",
]


@EXAMPLES
@given(st.one_of(json_values, request_bodies(GENERATION_FIELDS)))
def test_generation_request_is_parsed_or_refused_by_field(data: Any) -> None:
    try:
        request = parse_generation_request(data, max_tokens_limit=512, resume_grace_max=60)
    except DomainError as error:
        assert error.kind and error.code
    else:
        assert isinstance(request, GenerationRequest)


@EXAMPLES
@given(st.one_of(json_values, request_bodies(OPENAI_FIELDS)))
def test_openai_requests_are_parsed_or_refused_by_field(data: Any) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        try:
            parse(data)
        except DomainError as error:
            assert error.kind and error.code


def socketio_texts() -> st.SearchStrategy[str]:
    """Socket.IO packet texts: a type digit, maybe attachments, namespace, ack id, JSON."""
    deep = st.integers(min_value=1, max_value=50_000).map(lambda n: "[" * n + "]" * n)
    huge = st.integers(min_value=4_000, max_value=6_000).map(lambda n: f'["x",{"9" * n}]')
    payload = json_values.map(json.dumps) | st.text(max_size=30) | deep | huge
    return st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda kind, attachments, namespace, ack, body: f"{kind}{attachments}{namespace}"
                                                            f"{ack}{body}",
            st.sampled_from("0123456789"),
            st.sampled_from(["", "1-", "3-", "99-", "-"]),
            st.sampled_from(["", "/", "/chat,", "/,"]),
            st.sampled_from(["", "1", "12", "999999999999999999999"]),
            payload,
        ),
    )


@EXAMPLES
@given(st.lists(st.one_of(socketio_texts(), st.binary(max_size=20)), min_size=1, max_size=6))
def test_socketio_parser_returns_events_or_a_protocol_error(frames: list[str | bytes]) -> None:
    parser = SocketIOParser(max_attachments=4)
    for frame in frames:
        try:
            parser.receive(frame)
        except RemoteProtocolError:
            return  # the session closes here: later frames are never fed


def polling_bodies() -> st.SearchStrategy[bytes]:
    """Polling POST bodies: Engine.IO packets joined by the record separator, or noise."""
    packet = st.builds(lambda kind, body: f"{kind}{body}", st.sampled_from("0123456789b"),
                       socketio_texts())
    joined = st.lists(packet, min_size=1, max_size=8).map(lambda ps: "\x1e".join(ps).encode())
    return joined | st.binary(max_size=80)


@EXAMPLES
@given(polling_bodies())
def test_engineio_post_body_is_taken_or_refused(body: bytes) -> None:
    session = EngineIOSession(sid="sid", transport=Transport.POLLING,
                              config=RealtimeConfig.reference())
    session.handshake(0.0)
    try:
        session.begin_post(0.0, len(body))
        session.receive_post_data(body)
        session.end_of_post(0.0)
    except RemoteProtocolError:
        pass
    while session.next_event() is not None:  # whatever was taken can be delivered
        pass


@EXAMPLES
@given(st.lists(st.one_of(socketio_texts().map(lambda t: "4" + t), st.text(max_size=20),
                          st.binary(max_size=20)), min_size=1, max_size=6))
def test_engineio_websocket_messages_are_taken_or_refused(frames: list[str | bytes]) -> None:
    session = EngineIOSession(sid="sid", transport=Transport.WEBSOCKET,
                              config=RealtimeConfig.reference())
    token = session.attach_websocket(0.0)
    session.handshake(0.0)
    for frame in frames:
        try:
            session.receive_ws_message(token, frame, 0.0)
        except RemoteProtocolError:
            return
        while session.next_event() is not None:
            pass

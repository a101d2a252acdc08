"""Unit tests of issue 17's pieces, without sockets: the bounded JSON parser, the
Socket.IO parser's rejected packets, the failed-authentication throttle (a fake clock),
owner ids, the `Host` allowlist, the method label, and the auth settings checks."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabricai_trio.api.host_check import HostAllowlist, host_name
from fabricai_trio.auth import Authenticator, AuthThrottle, jwt_owner, key_owner, owner_tag
from fabricai_trio.core import jsonparse
from fabricai_trio.core.errors import AuthThrottled, Unauthenticated, http_error
from fabricai_trio.metrics import method_label
from fabricai_trio.realtime.errors import RemoteProtocolError
from fabricai_trio.realtime.sio_protocol import (
    BINARY_EVENT,
    CONNECT,
    EVENT,
    EventReceived,
    PacketRejected,
    SocketIOParser,
)
from fabricai_trio.settings import ConfigError, Settings, load_settings

# --- core.jsonparse ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("[" * 100_000, "nest deeper than 32"),
    ("[" * 33 + "]" * 33, "nest deeper than 32"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nest deeper than 32"),
    ("1" * 5000, "more than 32 digits"),
    ("[-" + "9" * 33 + "]", "more than 32 digits"),
    ("[NaN]", "NaN is not a JSON value"),
    ("{nope", "Expecting property name"),
    (b'{"a": "\xff"}', "not UTF-8"),
])
def test_hostile_json_is_refused_by_name(text: str | bytes, problem: str) -> None:
    with pytest.raises(jsonparse.JsonRejected, match=problem):
        jsonparse.loads(text)


def test_ordinary_json_is_parsed() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**18,
            "temperature": 0.5, "stop": ["a"], "deep": [[[[1]]]]}
    assert jsonparse.loads(json.dumps(body)) == body
    assert jsonparse.loads("[" * 32 + "]" * 32) is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=50)
@given(json_values)
def test_round_trip_within_the_bounds(value: Any) -> None:
    assert jsonparse.loads(json.dumps(value)) == value


@settings(max_examples=50)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(jsonparse.JsonRejected):
        jsonparse.loads(data)


# --- the Socket.IO parser -----------------------------------------------------------------


def test_a_packet_beyond_the_bounds_is_rejected_not_fatal() -> None:
    parser = SocketIOParser(max_attachments=2)
    rejected = parser.receive('2/chat,7["inference_prompt",' + "[" * 10_000 + "]" * 10_000 + "]")
    assert rejected == PacketRejected(namespace="/chat", packet_type=EVENT, ack_id=7,
                                      reason="arrays and objects nest deeper than 32 levels")
    connect = parser.receive('0{"token": ' + "9" * 5000 + "}")
    assert isinstance(connect, PacketRejected) and connect.packet_type == CONNECT
    # The parser goes on.
    assert parser.receive('2["ok",1]') == EventReceived(namespace="/", event="ok", args=[1],
                                                        ack_id=None)
    # A rejected binary event's attachments are skipped, then the parser goes on.
    binary = parser.receive('51-["up",' + "[" * 40 + '{"_placeholder":true,"num":0}'
                            + "]" * 40 + "]")
    assert isinstance(binary, PacketRejected) and binary.packet_type == BINARY_EVENT
    assert parser.receive(b"\x00\x01") is None
    assert parser.receive('2["ok",2]') == EventReceived(namespace="/", event="ok", args=[2],
                                                        ack_id=None)
    with pytest.raises(RemoteProtocolError):  # malformed is still a protocol error
        parser.receive('2["unterminated"')


# --- the failed-authentication throttle --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_allows_the_limit_per_window_then_refuses() -> None:
    clock = Clock()
    throttle = AuthThrottle(limit=3, window_seconds=60, clock=clock)
    for _ in range(3):
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
    with pytest.raises(AuthThrottled) as refused:
        throttle.check("10.0.0.1")
    assert refused.value.retry_after == 20  # one failure drains in 60/3 s
    rendered = http_error(refused.value)
    assert (rendered.status, rendered.headers["Retry-After"]) == (429, "20")
    throttle.check("10.0.0.2")  # another address is not affected
    throttle.check(None)  # no address known: never throttled
    clock.now += 20
    throttle.check("10.0.0.1")  # drained by one


def test_throttle_memory_is_bounded() -> None:
    throttle = AuthThrottle(limit=1, window_seconds=60, max_clients=100, clock=Clock())
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) == 100
    with pytest.raises(AuthThrottled):
        throttle.check("10.0.39.15")  # the most recent ones are kept


def test_authenticator_counts_wrong_credentials_not_missing_ones() -> None:
    clock = Clock()
    auth = Authenticator(api_keys=["good"], owner_secret=b"s" * 32,
                         throttle=AuthThrottle(limit=2, window_seconds=60, clock=clock))
    for _ in range(5):  # a browser's first, credential-less try is no guess
        with pytest.raises(Unauthenticated):
            auth.authenticate({}, client="a")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            auth.authenticate({"X-Api-Key": "bad"}, client="a")
    with pytest.raises(AuthThrottled):  # refused before the key is checked
        auth.authenticate({"X-Api-Key": "good"}, client="a")
    assert auth.authenticate({"X-Api-Key": "good"}, client="b").kind == "api_key"


# --- owner ids ---------------------------------------------------------------------------


@settings(max_examples=50)
@given(st.text(max_size=20), st.text(min_size=1, max_size=20),
       st.text(max_size=20), st.text(min_size=1, max_size=20))
def test_jwt_owner_ids_never_collide(iss1: str, sub1: str, iss2: str, sub2: str) -> None:
    if (iss1, sub1) != (iss2, sub2):
        assert jwt_owner(iss1, sub1) != jwt_owner(iss2, sub2)
    assert jwt_owner(iss1, sub1).startswith("jwt:")


def test_key_owner_ids_are_keyed_and_logs_get_a_tag() -> None:
    owner = key_owner("k", b"a" * 32)
    assert owner.startswith("key:") and len(owner) == 36
    assert owner != key_owner("k", b"b" * 32) and owner == key_owner("k", b"a" * 32)
    tag = owner_tag(owner)
    assert tag.startswith("key:") and len(tag) == 12 and tag[4:] not in owner
    assert owner_tag("anonymous") == "anonymous"
    assert owner_tag(jwt_owner("idp", "alice@example.com")).startswith("jwt:")


# --- Host allowlist, method label --------------------------------------------------------


@pytest.mark.parametrize(("header", "name"), [
    ("Example.COM:8000", "example.com"), ("[::1]:80", "::1"), ("localhost.", "localhost"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_host_allowlist() -> None:
    loopback = HostAllowlist(None)
    for good in ("localhost:8000", "127.0.0.1", "127.1.2.3:1", "[::1]:8000", "a.localhost"):
        assert loopback.allows(good), good
    for bad in ("evil.example", "localhost.evil", "10.0.0.1", "", None, "0.0.0.0"):
        assert not loopback.allows(bad), bad
    listed = HostAllowlist(["api.example.com", "*.corp.example", "10.0.0.5"])
    assert listed.allows("api.example.com:443") and listed.allows("x.corp.example")
    assert listed.allows("10.0.0.5:8000")
    assert not listed.allows("corp.example") and not listed.allows("localhost")
    assert HostAllowlist(["*"]).allows(None)
    assert loopback.allows_scope({"path": "/health", "headers": [(b"host", b"evil")]})
    assert not loopback.allows_scope({"path": "/v1/status", "headers": [(b"host", b"evil")]})
    assert not loopback.allows_scope({"path": "/v1/status", "headers": []})
    # The same answers when remembered; the memory is bounded whatever the Host values.
    for _ in range(2):
        assert loopback.allows("localhost:8000") and not loopback.allows("evil.example")
    for i in range(2 * HostAllowlist.MEMO_SIZE):
        assert not loopback.allows(f"h{i}.example")
    assert len(loopback._memo) == HostAllowlist.MEMO_SIZE
    assert loopback.allows("127.0.0.9") and not loopback.allows("h9999.example")


def test_allowed_hosts_default_follows_authentication() -> None:
    config = Settings(session_store="memory")  # type: ignore[call-arg]
    assert not HostAllowlist.from_settings(config, auth_enabled=False).any
    assert HostAllowlist.from_settings(config, auth_enabled=True).any
    custom = Settings(session_store="memory", allowed_hosts="A.example, *")  # type: ignore[call-arg]
    assert custom.allowed_host_patterns == ["a.example", "*"]


def test_method_label_is_a_fixed_set() -> None:
    assert method_label("GET") == "GET" and method_label("DELETE") == "DELETE"
    assert method_label("MADEUP") == method_label("get") == "OTHER"


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "reason"), [
    ({"API_KEYS": ","}, "API_KEYS is set but holds no key"),
    ({"JWT_SECRET": "x" * 31}, "JWT_SECRET must be at least 32 bytes"),
    ({"HOST": "0.0.0.0"}, "AUTH_MODE=off"),
    ({"HOST": "192.168.1.2"}, "is not a loopback address"),
    ({"AUTH_MODE": "off", "JWT_SECRET": "x" * 32}, "AUTH_MODE=off but JWT_SECRET set"),
    ({"API_KEYS": "k", "SESSION_STORE": "sql", "DATABASE_URL": "sqlite://"},
     "OWNER_ID_SECRET is required"),
])
def test_auth_settings_fail_closed(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reason: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=reason):
        load_settings()


@pytest.mark.parametrize("env", [
    {"HOST": "0.0.0.0", "AUTH_MODE": "off"},
    {"HOST": "::1"},
    {"HOST": "0.0.0.0", "API_KEYS": "k"},
    {"API_KEYS": "k", "REDIS_URL": "redis://x", "OWNER_ID_SECRET": "s" * 32},
    {"HOST": "0.0.0.0", "JWT_SECRET": "x" * 32},
])
def test_explicit_choices_start(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    load_settings()

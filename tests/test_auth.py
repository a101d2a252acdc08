"""Authentication: the credential matrix over every route of a real server (API keys,
a keys file, HS256 JWTs), session ownership across identities, the JSON request log;
then the `Authenticator` alone (RS256, Socket.IO payloads) and settings, in process."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fabricai_trio.app import create_app
from fabricai_trio.auth import (
    Authenticator,
    AuthThrottle,
    Identity,
    jwt_owner,
    key_owner,
    owner_tag,
)
from fabricai_trio.core.errors import DomainError
from fabricai_trio.settings import ConfigError, Settings, load_settings

from .asgi_harness import serve
from .fakes import FakeEngine
from .live import ended_normally
from .server_process import ServerProcess

SECRET = "test-secret-that-is-at-least-32-bytes-long"
OWNER_SECRET = "owner-id-secret-of-at-least-32-bytes!"
AUDIENCE, ISSUER = "fabricai", "tests"
ALPHA, BETA, FILE_KEY = "alpha-key", "beta-key", "file-key"
MARKER = "zebra-unicorn-marker"


def token(
    sub: str = "user-42", *, key: str = SECRET, expires_in: float = 300, **claims: Any
) -> str:
    payload = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time() + expires_in),
               **claims}
    return jwt.encode(payload, key, algorithm="HS256")


def owner_of(key: str) -> str:
    """A key's owner id on the module's server (its OWNER_ID_SECRET)."""
    return key_owner(key, OWNER_SECRET.encode())


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture(scope="module")
def server(
    model_path: Path, server_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    env = {
        "LLM_MODEL": str(model_path),
        "CHAT_FORMAT": "gemma",
        "N_CTX": "1024",
        "API_KEYS": f"{ALPHA}, {BETA}",
        "API_KEYS_FILE": str(keys_file),
        "JWT_SECRET": SECRET,
        "JWT_AUDIENCE": AUDIENCE,
        "JWT_ISSUER": ISSUER,
        "LOG_FORMAT": "json",
        "OWNER_ID_SECRET": OWNER_SECRET,
        "AUTH_FAILURE_LIMIT": "0",  # the matrix fails on purpose, hundreds of times
    }
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def routes(http: httpx.Client) -> list[tuple[str, str, bool]]:
    """Every (method, path, public) of the server, from its OpenAPI document (which
    test_openapi checks against the url_map); path parameters filled with unknown ids."""
    document = http.get("/openapi.json", headers=bearer(ALPHA)).json()
    return [
        (method.upper(), re.sub(r"\{(\w+)\}", r"no-such-\1", path), op.get("security") == [])
        for path, methods in document["paths"].items()
        for method, op in methods.items()
    ]


BAD: dict[str, tuple[dict[str, str], str]] = {
    "no credentials": ({}, "missing_credentials"),
    "unknown key": ({"X-Api-Key": "not-a-key"}, "invalid_api_key"),
    "unknown bearer": (bearer("not-a-key"), "invalid_api_key"),
    "basic scheme": ({"Authorization": "Basic YTpi"}, "invalid_authorization"),
    "expired jwt": (bearer(token(expires_in=-60)), "token_expired"),
    "wrong audience": (bearer(token(aud="someone-else")), "invalid_token"),
    "wrong issuer": (bearer(token(iss="evil")), "invalid_token"),
    "wrong signature": (bearer(token(key="another-secret-that-is-32-bytes-long!!")),
                        "invalid_token"),
    "jwt without sub": (bearer(jwt.encode({"aud": AUDIENCE, "iss": ISSUER}, SECRET)),
                        "invalid_token"),
}


@pytest.mark.model
@pytest.mark.parametrize("case", list(BAD))
def test_bad_credentials_are_401_on_every_route(
    http: httpx.Client, routes: list[tuple[str, str, bool]], case: str
) -> None:
    headers, code = BAD[case]
    assert len(routes) >= 17
    assert {path for _, path, public in routes if public} == {
        "/health", "/livez", "/readyz", "/", "/playground/no-such-asset"}
    for method, path, public in routes:
        response = http.request(method, path, headers=headers, json={"prompt": "hi"})
        if public:  # needs no credentials, so bad ones do not matter
            expected = 404 if "no-such" in path else 200
            assert response.status_code == expected, (path, response.text)
            continue
        assert response.status_code == 401, (method, path, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["type"] == "authentication_error", error
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="fabricai-trio"')
        assert ('error="invalid_token"' in challenge) == (code != "missing_credentials")
        assert response.headers["x-request-id"]


GOOD: dict[str, Callable[[], dict[str, str]]] = {
    "bearer key": lambda: bearer(ALPHA),
    "x-api-key": lambda: {"X-Api-Key": BETA},
    "key from file": lambda: bearer(FILE_KEY),
    "jwt": lambda: bearer(token()),  # minted when the test runs, not at collection
}


@pytest.mark.model
@pytest.mark.parametrize("case", list(GOOD))
def test_good_credentials_pass_on_every_route(
    http: httpx.Client, routes: list[tuple[str, str, bool]], case: str
) -> None:
    headers = GOOD[case]()
    for method, path, _ in routes:
        # An empty body: routes answer with their own 4xx, never 401/403.
        response = http.request(method, path, headers=headers, json={})
        assert response.status_code not in (401, 403), (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)


@pytest.mark.model
def test_another_identitys_session_is_404(http: httpx.Client) -> None:
    created = http.post("/v1/sessions", headers=bearer(ALPHA), json={"system_prompt": "x"})
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["owner"] == owner_of(ALPHA) and ALPHA not in session["owner"]
    sid = session["id"]
    uses: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("POST", "/v1/inference_sse", {"prompt": "hi", "max_tokens": 1, "session_id": sid}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 1, "session_id": sid}),
    ]
    for other in (bearer(BETA), bearer(token("user-42"))):
        for method, path, body in uses:
            response = http.request(method, path, headers=other, json=body)
            # Another identity's session looks exactly like a missing one.
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "session_not_found"
        listed = http.get("/v1/sessions", headers=other).json()["data"]
        assert sid not in {s["id"] for s in listed}
    assert http.get(f"/v1/sessions/{sid}", headers={"X-Api-Key": ALPHA}).status_code == 200


@pytest.mark.model
def test_jwt_subject_owns_its_sessions(http: httpx.Client) -> None:
    created = http.post("/v1/sessions", headers=bearer(token("user-7")))
    assert created.status_code == 201 and created.json()["owner"] == "jwt:tests:user-7"
    sid = created.json()["id"]
    # Another token of the same subject is the same owner.
    again = http.get(f"/v1/sessions/{sid}", headers=bearer(token("user-7", expires_in=60)))
    assert again.status_code == 200
    assert http.get(f"/v1/sessions/{sid}", headers=bearer(ALPHA)).status_code == 404


@pytest.mark.model
def test_request_log_is_json_without_prompts_or_keys(
    http: httpx.Client, server: ServerProcess
) -> None:
    response = http.post("/v1/inference_sse", headers=bearer(ALPHA),
                         json={"prompt": f"Say {MARKER}", "max_tokens": 2})
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    http.get("/v1/status")  # a 401, logged too

    def request_lines(text: str) -> list[dict[str, Any]]:
        complete = text[: text.rfind("\n") + 1]  # a line being written is not read yet
        lines = [json.loads(line) for line in complete.splitlines() if line.startswith("{")]
        return [e for e in lines if e["logger"] == "fabricai_trio.requests"]

    deadline = time.monotonic() + 30  # a hang guard: until both lines are written
    while True:
        text = server.log()
        requests = request_lines(text)
        if any(e["request_id"] == rid for e in requests) and any(
            e["route"] == "/v1/status" and e["status"] == 401 for e in requests
        ):
            break
        assert time.monotonic() < deadline, "the request log lines never appeared"
        time.sleep(0.05)
    assert MARKER not in text
    for secret in (ALPHA, BETA, FILE_KEY, SECRET):
        assert secret not in text
    mine = next(e for e in requests if e["request_id"] == rid)
    assert mine["route"] == "/v1/inference_sse" and mine["status"] == 200
    assert mine["owner"] == owner_tag(owner_of(ALPHA)) != owner_of(ALPHA)
    assert owner_of(ALPHA) not in text
    assert ended_normally(mine["finish_reason"], mine["completion_tokens"], 2)
    assert mine["prompt_tokens"] > 0 and mine["ttft_ms"] > 0
    assert mine["duration_ms"] >= mine["ttft_ms"]
    assert any(e["route"] == "/v1/status" and e["status"] == 401 for e in requests)


# --- in process: the Authenticator alone, settings, the open /metrics switch ---


def rsa_keys() -> tuple[bytes, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public.decode()


def test_rs256_public_key_from_pem_or_file(tmp_path: Path) -> None:
    private, public = rsa_keys()
    claims = {"sub": "rs-user", "iss": ISSUER, "exp": int(time.time()) + 60}
    good = jwt.encode(claims, private, algorithm="RS256")
    hs = jwt.encode(claims, SECRET, algorithm="HS256")
    key_file = tmp_path / "public.pem"
    key_file.write_text(public)
    for configured in (public, str(key_file)):
        auth = Authenticator.from_settings(
            Settings(jwt_public_key=configured, jwt_issuer=ISSUER)  # type: ignore[call-arg]
        )
        identity = auth.authenticate({"authorization": f"Bearer {good}"})
        assert (identity.owner, identity.kind) == (jwt_owner(ISSUER, "rs-user"), "jwt")
        with pytest.raises(DomainError) as info:  # no algorithm confusion
            auth.authenticate({"Authorization": f"Bearer {hs}"})
        assert info.value.status_hint == 401


def test_socketio_payload_and_anonymous() -> None:
    auth = Authenticator(api_keys=[ALPHA], owner_secret=OWNER_SECRET.encode(), jwt_key=SECRET,
                         jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    assert auth.authenticate_payload({"apiKey": ALPHA}).owner == owner_of(ALPHA)
    assert auth.authenticate_payload({"token": ALPHA}).owner == owner_of(ALPHA)
    assert auth.authenticate_payload({"token": token("sio-user")}).owner == "jwt:tests:sio-user"
    for payload in (None, {}, {"token": 5}, {"apiKey": "nope"}):
        with pytest.raises(DomainError) as info:
            auth.authenticate_payload(payload)
        assert info.value.status_hint == 401
    assert owner_of(ALPHA) == owner_of(ALPHA) != owner_of(BETA)
    assert owner_of(ALPHA).startswith("key:") and len(owner_of(ALPHA)) == 36
    assert key_owner(ALPHA, b"x" * 32) != owner_of(ALPHA)  # the secret matters
    anonymous = Authenticator()
    assert not anonymous.enabled
    assert anonymous.authenticate({}).owner == "anonymous"
    assert anonymous.authenticate_payload(None).kind == "anonymous"


def test_identify_agrees_with_authenticate_and_counts_nothing() -> None:
    """The fast path's check (api/refusals.py): the identity `authenticate` gives, or
    None where it raises; never a failed attempt counted (only `authenticate` counts)."""
    throttle = AuthThrottle(limit=2, window_seconds=600)
    auth = Authenticator(api_keys=[ALPHA], owner_secret=OWNER_SECRET.encode(), jwt_key=SECRET,
                         jwt_audience=AUDIENCE, jwt_issuer=ISSUER, throttle=throttle)
    cases: list[dict[str, str]] = [
        {}, bearer(ALPHA), {"X-Api-Key": ALPHA}, bearer(token("u1")), bearer("nope"),
        {"Authorization": f"Basic {ALPHA}"}, {"Authorization": "Bearer "},
        {"x-api-key": "nope"}, bearer(token("u1", expires_in=-60)),
        {**bearer("nope"), "X-Api-Key": ALPHA},  # the bearer token is the one checked
    ]
    for headers in cases:
        identified = auth.identify(headers, client="10.0.0.1")
        assert len(throttle) == 0
        try:
            expected: Identity | None = auth.authenticate(headers, client="10.0.0.2")
        except DomainError:
            expected = None
        assert identified == expected, headers
        throttle._buckets.clear()
    for _ in range(2):  # a throttled address: None even with a good key, as authenticate
        with pytest.raises(DomainError):
            auth.authenticate(bearer("nope"), client="10.0.0.3")
    assert auth.identify(bearer(ALPHA), client="10.0.0.3") is None
    assert auth.identify(bearer(ALPHA), client="10.0.0.4") == Identity(owner_of(ALPHA),
                                                                         "api_key")
    assert Authenticator().identify({}) == Identity("anonymous", "anonymous")


def test_auth_settings_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("API_KEYS_FILE", str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        load_settings()
    monkeypatch.delenv("API_KEYS_FILE")
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("JWT_PUBLIC_KEY", rsa_keys()[1])
    with pytest.raises(ConfigError, match="not both"):
        load_settings()
    monkeypatch.delenv("JWT_SECRET")
    monkeypatch.setenv("JWT_PUBLIC_KEY", "/no/such/key.pem")
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY"):
        load_settings()


def app_settings(**overrides: Any) -> Settings:
    return Settings(session_store="memory", **overrides)


async def test_metrics_may_be_left_open() -> None:
    config = app_settings(api_keys=ALPHA, metrics_require_auth=False)
    app = create_app(config, engine=FakeEngine(config))
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/v1/status")).status_code == 401
        assert (await client.get("/v1/status", headers=bearer(ALPHA))).status_code == 200


@pytest.mark.parametrize(
    ("host", "keys", "mode", "warned"),
    [("0.0.0.0", None, "off", True), ("127.0.0.1", None, "auto", False),
     ("::1", None, "auto", False), ("localhost", None, "off", False),
     ("0.0.0.0", ALPHA, "auto", False)],
)
def test_open_server_on_a_public_address_warns(
    caplog: pytest.LogCaptureFixture, host: str, keys: str | None, mode: str, warned: bool
) -> None:
    config = app_settings(host=host, api_keys=keys, auth_mode=mode)
    with caplog.at_level(logging.WARNING, logger="fabricai_trio.auth"):
        create_app(config, engine=FakeEngine(config))
    assert any("not a loopback address" in r.message for r in caplog.records) == warned


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_are_logged_only_when_asked(
    caplog: pytest.LogCaptureFixture, log_prompts: bool
) -> None:
    config = app_settings(log_prompts=log_prompts)
    app = create_app(config, engine=FakeEngine(config))
    async with serve(app) as client:  # the whole lifespan: loaded, warmed up, ready
        with caplog.at_level(logging.INFO, logger="fabricai_trio.requests"):
            response = await client.post(
                "/v1/completions", json={"prompt": f"Say {MARKER}", "max_tokens": 2}
            )
    assert response.status == 200, response.text
    [record] = [r for r in caplog.records if r.name == "fabricai_trio.requests"
                and r.fields["route"] == "/v1/completions"]  # type: ignore[attr-defined]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["completion_tokens"] == 2 and fields["route"] == "/v1/completions"
    assert (MARKER in record.getMessage()) == log_prompts
    assert fields.get("prompt") == (f"Say {MARKER}" if log_prompts else None)

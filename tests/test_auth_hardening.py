"""Issue 17's authentication and hostile-input findings, each against a real server on
the real model over real sockets: fail-closed start-up, owner ids no credential of
another kind can name, JWT `exp` and leeway, throttled guessing (HTTP and Socket.IO
CONNECT), bounded JSON (HTTP bodies and Socket.IO packets: a 400 or an error event, and
the connection goes on), bounded metric labels, the `Host` allowlist, and `/health`
without the model path."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from fabricai_trio.app import create_app
from fabricai_trio.auth import jwt_owner, key_owner
from fabricai_trio.settings import Settings

from .asgi_harness import serve
from .fakes import FakeEngine
from .server_process import REPO, ServerProcess, model_env

ALPHA, BETA = "alpha-key-1", "beta-key-2"
JWT_SECRET = "jwt-secret-of-the-hardening-tests-32b"
OWNER_SECRET = "owner-secret-of-the-hardening-tests!"
RS = "\x1e"  # Engine.IO's polling packet separator


def token(sub: str, *, expires_in: float | None = 300, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, **claims}
    if expires_in is not None:
        payload["exp"] = int(time.time() + expires_in)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """Keys and HS256 JWTs (no JWT_ISSUER), 30 s of leeway, no failure limit."""
    env = model_env(model_path, API_KEYS=f"{ALPHA},{BETA}", JWT_SECRET=JWT_SECRET,
                    OWNER_ID_SECRET=OWNER_SECRET, JWT_LEEWAY_SECONDS="30",
                    AUTH_FAILURE_LIMIT="0")
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


# --- start-up: fail closed --------------------------------------------------------------


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k.upper() not in Settings.model_fields.keys() | {"HOST"}
             and k.lower() not in Settings.model_fields}
    return subprocess.run([sys.executable, "-m", "fabricai_trio", "serve"],
                          env={**clean, "PORT": "0", **env}, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("env", "reason"), [
    ({"API_KEYS": ""}, "API_KEYS is set but holds no key"),
    ({"API_KEYS": " , "}, "API_KEYS is set but holds no key"),
    ({"API_KEYS_FILE": "<comments>"}, "holds no key"),
    ({"JWT_SECRET": ""}, "JWT_SECRET must be at least 32 bytes"),
    ({"JWT_SECRET": "short"}, "JWT_SECRET must be at least 32 bytes"),
    ({"OWNER_ID_SECRET": "x" * 31, "API_KEYS": "k"}, "OWNER_ID_SECRET must be at least"),
    ({"HOST": "0.0.0.0"}, "AUTH_MODE=off"),
    ({"AUTH_MODE": "off", "API_KEYS": "k"}, "AUTH_MODE=off but API_KEYS set"),
    ({"API_KEYS": "k", "REDIS_URL": "redis://127.0.0.1:1/0"}, "OWNER_ID_SECRET is required"),
    ({"API_KEYS_FILE": "<unknown class>"}, "names the priority class 'urgent'"),
    ({"API_KEYS_FILE": "<text after a key>"}, "line 2: after the key, only one"),
], ids=["empty keys", "blank keys", "comments-only file", "empty jwt secret",
        "short jwt secret", "short owner secret", "open on 0.0.0.0", "off with keys",
        "shared store without owner secret", "unknown class in the keys file",
        "text after a key"])
def test_start_up_refuses_what_would_fail_open(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    files = {"<comments>": "# no keys yet\n\n   # still none\n",
             "<unknown class>": "sk-good priority=high\nsk-typo priority=urgent\n",
             "<text after a key>": "sk-good\nsk-secret-two # a comment\n"}
    if env.get("API_KEYS_FILE") in files:
        keys = tmp_path / "keys.txt"
        keys.write_text(files[env["API_KEYS_FILE"]])
        env = {**env, "API_KEYS_FILE": str(keys)}
    result = run_serve({"HOST": "127.0.0.1", **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert "sk-typo" not in result.stderr and "sk-secret" not in result.stderr


# --- owner ids ---------------------------------------------------------------------------


def test_a_jwt_cannot_name_a_keys_owner(http: httpx.Client) -> None:
    created = http.post("/v1/sessions", headers=bearer(ALPHA), json={"system_prompt": "s"})
    assert created.status_code == 201, created.text
    owner, sid = created.json()["owner"], created.json()["id"]
    assert owner == key_owner(ALPHA, OWNER_SECRET.encode())
    assert hashlib.sha256(ALPHA.encode()).hexdigest()[:16] not in owner  # not a bare hash
    for forged in (token(owner), token(owner, iss=""), token(owner.removeprefix("key:"),
                                                              iss="key")):
        response = http.get(f"/v1/sessions/{sid}", headers=bearer(forged))
        assert response.status_code == 404, response.text  # like a missing session
        listed = http.get("/v1/sessions", headers=bearer(forged)).json()["data"]
        assert sid not in {s["id"] for s in listed}
    mine = http.post("/v1/sessions", headers=bearer(token(owner, iss="idp")))
    assert mine.json()["owner"] == jwt_owner("idp", owner) == f"jwt:idp:{owner}"
    assert http.get(f"/v1/sessions/{sid}", headers=bearer(ALPHA)).status_code == 200


def test_jwt_exp_is_required_within_a_small_leeway(http: httpx.Client) -> None:
    no_exp = http.get("/v1/sessions", headers=bearer(token("u1", expires_in=None)))
    assert no_exp.status_code == 401
    assert no_exp.json()["error"]["code"] == "invalid_token" and "exp" in no_exp.text
    within = http.get("/v1/sessions", headers=bearer(token("u1", expires_in=-5)))
    assert within.status_code == 200, within.text  # 5 s late, 30 s of leeway
    late = http.get("/v1/sessions", headers=bearer(token("u1", expires_in=-120)))
    assert late.status_code == 401 and late.json()["error"]["code"] == "token_expired"


# --- metrics: a fixed set of methods -----------------------------------------------------


def test_made_up_methods_add_no_series(http: httpx.Client) -> None:
    for i in range(20):
        response = http.request(f"MADEUP{i}", "/v1/status")
        assert response.status_code in (401, 405)
    text = http.get("/metrics", headers=bearer(ALPHA)).text
    assert "MADEUP" not in text
    assert 'method="OTHER"' in text
    methods = {line.split('method="')[1].split('"')[0]
               for line in text.splitlines() if line.startswith("fabricai_http_requests_total")}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}


# --- bounded JSON ------------------------------------------------------------------------


def test_hostile_json_is_400_on_the_openai_routes_too(http: httpx.Client) -> None:
    for body, what in ((b"[" * 50_000, "nest deeper"),
                       (b'{"max_tokens": ' + b"7" * 5000 + b"}", "digits")):
        response = http.post("/v1/chat/completions", content=body, headers={
            **bearer(ALPHA), "content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_json" and what in error["message"]
    ok = http.post("/v1/chat/completions", headers=bearer(ALPHA), json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


class Polling:
    """A raw Engine.IO v4 polling session: Socket.IO packets in, packets out."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        opened = client.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
        assert opened.status_code == 200 and opened.text.startswith("0"), opened.text
        self.params = {"EIO": "4", "transport": "polling",
                       "sid": json.loads(opened.text[1:])["sid"]}

    def send(self, *packets: str) -> None:
        response = self.client.post("/socket.io/", params=self.params,
                                    content=RS.join("4" + p for p in packets))
        assert response.status_code == 200, response.text

    def receive(self) -> list[str]:
        """The Socket.IO packets of one long-poll (pings answered, not returned)."""
        response = self.client.get("/socket.io/", params=self.params)
        assert response.status_code == 200, response.text
        packets = []
        for message in response.text.split(RS):
            if message == "2":
                self.client.post("/socket.io/", params=self.params, content="3")
            elif message.startswith("4"):
                packets.append(message[1:])
            else:
                assert message != "1", "the session was closed"
        return packets

    def until(self, done: Any, limit: int = 200) -> list[str]:
        seen: list[str] = []
        for _ in range(limit):  # a hang guard
            seen += self.receive()
            if done(seen):
                return seen
        raise AssertionError(f"never done: {seen}")


def test_hostile_json_on_socketio_is_an_error_event_and_the_session_goes_on(
    http: httpx.Client,
) -> None:
    session = Polling(http)
    # A CONNECT whose auth is too deep is refused; the session may CONNECT again.
    session.send("0" + json.dumps({"apiKey": ALPHA})[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000
                 + "}")
    [refused] = session.until(lambda seen: seen)
    assert refused.startswith("4") and "nest deeper" in refused
    session.send("0" + json.dumps({"apiKey": ALPHA}))
    [connected] = session.until(lambda seen: seen)
    assert connected.startswith("0{")
    session.send('21["inference_prompt",' + "[" * 50_000 + "]" * 50_000 + "]",
                 '22["inference_prompt",{"prompt":"hi","max_tokens":' + "9" * 5000 + "}]")
    answers = session.until(lambda seen: sum(p.startswith("3") for p in seen) == 2)
    acks = {int(p[1]): json.loads(p[2:])[0] for p in answers if p.startswith("3")}
    assert acks[1]["error"]["code"] == acks[2]["error"]["code"] == "invalid_json"
    assert "nest deeper" in acks[1]["error"]["message"]
    assert "digits" in acks[2]["error"]["message"]
    events = [json.loads(p[1:]) for p in answers if p.startswith("2")]
    assert [e[0] for e in events] == ["inference_error", "inference_error"]
    assert {e[1]["status"] for e in events} == {400}
    # The same session still generates.
    session.send('23["inference_prompt",{"prompt":"Hi","max_tokens":2}]')
    rest = session.until(lambda seen: any("inference_complete" in p for p in seen))
    assert any(p.startswith("3") and '"request_id"' in p for p in rest)


# --- throttled guessing ------------------------------------------------------------------


def test_failed_authentication_is_throttled_per_address(
    model_path: Path, server_logs: Path
) -> None:
    """200 CONNECT guesses on one Socket.IO session: 5 are checked, the rest refused
    unchecked (429); then HTTP from the same address is refused too, even with a good
    key, until the bucket drains; other addresses are not affected (not tested: every
    test client is 127.0.0.1)."""
    env = model_env(model_path, API_KEYS=ALPHA, AUTH_FAILURE_LIMIT="5",
                    AUTH_FAILURE_WINDOW_SECONDS="600")
    with ServerProcess(env, log_dir=server_logs) as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as client:
        session = Polling(client)
        codes: list[str] = []
        for batch in range(4):
            session.send(*(f'0{{"token":"guess-{batch}-{i}"}}' for i in range(50)))
            refused = session.until(lambda seen: len(seen) == 50)
            codes += [json.loads(p[1:])["data"]["code"] for p in refused]
        assert codes[:5] == ["invalid_api_key"] * 5
        assert set(codes[5:]) == {"too_many_auth_failures"} and len(codes) == 200
        for headers in ({"X-Api-Key": "another-guess"}, {"X-Api-Key": ALPHA}):
            response = client.get("/v1/status", headers=headers)
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "too_many_auth_failures"
            assert int(response.headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200  # needs no credentials


# --- with authentication off: Host allowlist, probes ------------------------------------


@pytest.fixture(scope="module")
def open_server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """No credentials (AUTH_MODE=auto on loopback), ALLOWED_HOSTS left automatic."""
    with ServerProcess(model_env(model_path, ALLOWED_HOSTS=""), log_dir=server_logs) as proc:
        yield proc


def raw_get(port: int, path: str, host: str, *headers: str) -> bytes:
    """The head of the answer to a GET sent as raw bytes."""
    request = "\r\n".join([f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "", ""]
                          ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    return response


def test_only_loopback_hosts_are_served_without_authentication(
    open_server: ServerProcess,
) -> None:
    port = open_server.port
    with httpx.Client(timeout=30) as client:
        for host in ("evil.example", f"evil.example:{port}", "192.168.1.10", "localhost.evil"):
            response = client.get(f"{open_server.url}/v1/status", headers={"Host": host})
            assert response.status_code == 400, (host, response.text)
            assert response.json()["error"]["code"] == "host_not_allowed"
            polling = client.get(f"{open_server.url}/socket.io/",
                                 params={"EIO": "4", "transport": "polling"},
                                 headers={"Host": host})
            assert polling.status_code == 400
            health = client.get(f"{open_server.url}/health", headers={"Host": host})
            assert health.status_code == 200  # probes answer any Host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                     f"app.localhost:{port}"):
            response = client.get(f"{open_server.url}/v1/status", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
    upgrade = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    path = "/socket.io/?EIO=4&transport=websocket"
    refused = raw_get(port, path, "evil.example", *upgrade)
    assert refused.startswith(b"HTTP/1.1 403"), refused[:200]
    accepted = raw_get(port, path, f"localhost:{port}", *upgrade)
    assert accepted.startswith(b"HTTP/1.1 101"), accepted[:200]


def test_health_does_not_name_the_model(open_server: ServerProcess) -> None:
    health = httpx.get(f"{open_server.url}/health", timeout=30)
    assert health.status_code == 200
    assert "gguf" not in health.text and str(Path.home()) not in health.text


async def test_a_failed_load_is_not_described_on_the_probes() -> None:
    config = Settings(session_store="memory")  # type: ignore[call-arg]
    app = create_app(config, engine=FakeEngine(config))
    async with serve(app) as client:
        app.state.load_error = "cannot load /srv/private/models/secret.gguf: bad magic"
        app.state.enter("failed")
        for path in ("/health", "/readyz"):
            response = await client.get(path)
            assert response.status == 503
            assert "secret" not in response.text and "failed to load" in response.text
        app.state.enter("ready")

"""The compose `scale` profile's nginx configuration, run for real on loopback in front of
two real server processes that share one private Redis."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import socketio

from .redis_server import RedisServer
from .server_process import REPO, ServerProcess, free_port
from .sse_client import parse_lines

pytestmark = pytest.mark.model

NGINX_DIR = REPO / "deploy" / "nginx"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    assert found, "nginx is needed (scripts/test installs it)"
    return found


class Cluster(NamedTuple):
    url: str  # nginx
    replicas: list[ServerProcess]


@pytest.fixture(scope="module")
def cluster(model_path: Path, server_logs: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with RedisServer() as redis:
        env = {"LLM_MODEL": str(model_path), "REDIS_URL": redis.url, "N_CTX": "1024",
               "MAX_CONCURRENT_REQUESTS": "1", "SESSION_AUTOCREATE": "true"}
        with ServerProcess(env, log_dir=server_logs) as a, \
                ServerProcess(env, log_dir=server_logs) as b:
            prefix = tmp_path_factory.mktemp("nginx")
            shutil.copy(NGINX_DIR / "nginx.conf", prefix / "nginx.conf")
            (prefix / "upstream.conf").write_text(
                f"server 127.0.0.1:{a.port};\nserver 127.0.0.1:{b.port};\n"
            )
            port = free_port()
            (prefix / "listen.conf").write_text(f"listen 127.0.0.1:{port};\n")
            log = (prefix / "nginx.log").open("wb")
            proc = subprocess.Popen(
                [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                 "-g", "daemon off;"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert proc.poll() is None, (prefix / "nginx.log").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                yield Cluster(url, [a, b])
            finally:
                proc.terminate()
                proc.wait(10)
                log.close()


def test_sse_streams_through_nginx_unbuffered(cluster: Cluster) -> None:
    url = cluster.url
    arrivals: list[float] = []
    lines: list[str] = []
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{url}/v1/inference_sse",
        json={"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("event: token"):
                arrivals.append(time.monotonic())
    events = list(parse_lines(iter(lines)))
    assert events[-1].event == "complete"
    assert len(arrivals) >= 20
    # Tokens arrive as they are decoded, not in one buffered burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.2
    spread = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(spread) < (arrivals[-1] - arrivals[0]) * 0.5


def test_socketio_polling_then_upgrade_through_nginx(cluster: Cluster) -> None:
    url = cluster.url
    client = socketio.Client(reconnection=False)
    done = threading.Event()
    seen: list[str] = []
    client.on("inference_token", lambda data: seen.append(data["text"]))
    client.on("inference_complete", lambda data: done.set())
    client.connect(url, transports=["polling", "websocket"], wait_timeout=10)
    try:
        ack = client.call("inference_prompt", {"prompt": "Hello", "max_tokens": 6}, timeout=30)
        assert "request_id" in ack and "error" not in ack
        assert done.wait(30) and seen
        deadline = time.monotonic() + 5
        while client.transport() != "websocket":
            assert time.monotonic() < deadline, "no upgrade through nginx"
            time.sleep(0.05)
    finally:
        client.disconnect()


def test_session_continues_on_the_other_replica(cluster: Cluster) -> None:
    url, replicas = cluster.url, [replica.url for replica in cluster.replicas]
    with httpx.Client(timeout=60) as client:
        first = client.post(f"{url}/v1/inference_sse", json={
            "prompt": "My name is Ada.", "session_id": "through-nginx", "max_tokens": 4})
        assert first.status_code == 200 and "event: complete" in first.text
        for replica in replicas:  # whichever served turn 1, both see the session
            turn = client.post(f"{replica}/v1/inference_sse", json={
                "prompt": "What is my name?", "session_id": "through-nginx", "max_tokens": 4})
            assert turn.status_code == 200 and "event: complete" in turn.text
        messages = client.get(f"{replicas[0]}/v1/sessions/through-nginx/messages").json()
        assert [m["role"] for m in messages["data"]] == ["user", "assistant"] * 3


def served_by(cluster: Cluster, request_id: str) -> int:
    """Which replica's log holds the request (each response carries its X-Request-Id;
    the log line is written as the request ends, so it is polled for: a hang guard)."""
    deadline = time.monotonic() + 10
    while True:
        found = [i for i, replica in enumerate(cluster.replicas)
                 if f'request_id="{request_id}"' in replica.log()]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (request_id, found)
            return found[0]
        time.sleep(0.05)


def test_a_session_sticks_to_one_replica_and_sessions_spread(cluster: Cluster) -> None:
    """Consistent hash on the session id, wherever the request carries it (body, header,
    query, path); requests without one are spread; Socket.IO stays on ip_hash."""
    sessions = [f"sticky-{i}" for i in range(16)]
    placement: dict[str, set[int]] = {}
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        for sid in sessions:
            created = client.post("/v1/sessions", json={"session_id": sid})
            assert created.status_code == 201, created.text
            ids = [created.headers["x-request-id"]]
            turn = client.post("/v1/inference_sse",
                               json={"prompt": "Hi", "max_tokens": 2, "session_id": sid})
            chat = client.post("/v1/chat/completions", headers={"X-Session-Id": sid}, json={
                "max_tokens": 2, "session_id": sid,
                "messages": [{"role": "user", "content": "Hi"}]})
            query = client.get("/v1/inference_sse",
                               params={"prompt": "Hi", "max_tokens": "2", "session_id": sid})
            path = client.get(f"/v1/sessions/{sid}/messages")
            for response in (turn, chat, query, path):
                assert response.status_code == 200, response.text
                ids.append(response.headers["x-request-id"])
            placement[sid] = {served_by(cluster, rid) for rid in ids}
        stateless = set()
        for _ in range(16):
            response = client.get("/v1/models")
            stateless.add(served_by(cluster, response.headers["x-request-id"]))
    assert all(len(replicas) == 1 for replicas in placement.values()), placement
    assert {next(iter(r)) for r in placement.values()} == {0, 1}, placement
    assert stateless == {0, 1}

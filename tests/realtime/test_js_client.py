"""The npm `socket.io-client` (4.8.x, pinned in tests/js/package-lock.json) under Node,
against the reference server on a real Hypercorn port."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from .servers import hypercorn_server, recording_reference_apps

JS_DIR = Path(__file__).resolve().parent.parent / "js"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """`npm ci` once per run (when node_modules is missing); skip without Node or npm."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the socket.io-client test")
    if not (JS_DIR / "node_modules" / "socket.io-client" / "package.json").exists():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed (offline?): {done.stderr.strip()[-300:]}")
    return JS_DIR / "client.mjs"


@pytest.mark.parametrize("transports", ["polling", "websocket", "polling,websocket"])
async def test_socketio_client_js(node_client: Path, transports: str) -> None:
    apps, _, disconnects = recording_reference_apps()
    async with hypercorn_server(
        {"/socket.io/": apps.socketio.asgi_app}, apps.engineio, apps.socketio
    ) as (host, port):
        with trio.fail_after(30):
            done = await trio.run_process(
                ["node", str(node_client), f"http://{host}:{port}", transports],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        got = json.loads(done.stdout)
        assert got["auth"] == {"token": "123"}
        assert got["customAuth"] == {"token": "123"}
        assert got["ack"] == [1, "2", {"3": [True]}]
        assert got["binaryAck"] == [{"bytes": [1, 2, 3]}, "x"]
        assert got["back"] == [[{"bytes": [4, 5]}, {"k": "v"}]] + [[i] for i in range(50)]
        assert got["transport"] == transports.split(",")[-1]
        assert got["connected"] is False
        with trio.fail_after(10):  # a hang guard: the server saw the client leave both namespaces
            await disconnects.wait_for(2)

"""Socket.IO (websocket) vs SSE token delivery, and the memory of idle Socket.IO clients.

    .venv/bin/python bench/socketio_vs_sse.py [--tokens 128] [--rounds 4] [--idle 1000]

One server (one slot, the embedded model). Rounds alternate SSE and Socket.IO over
websocket for the same greedy generation; tok/s is measured by the client from the first
token to the last. Then `--idle` raw websocket clients complete the Engine.IO and
Socket.IO handshakes and stay connected, and the server's RSS growth is reported per
client. Target: Socket.IO >= 0.97x SSE tok/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import socketio
import trio
import wsproto
import wsproto.events as ws

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings
from tests.server_process import ServerProcess

BODY = {"prompt": "Once upon a time", "temperature": 0}


def sse_round(client: httpx.Client, tokens: int) -> float:
    times: list[float] = []
    with client.stream("POST", "/v1/inference_sse", json={**BODY, "max_tokens": tokens}) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def sio_round(client: socketio.Client, tokens: int) -> float:
    times: list[float] = []
    done = threading.Event()
    client.on("inference_token", lambda _data: times.append(time.perf_counter()))
    client.on("inference_complete", lambda _data: done.set())
    client.call("inference_prompt", {**BODY, "max_tokens": tokens}, timeout=60)
    assert done.wait(120)
    return (len(times) - 1) / (times[-1] - times[0])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Counter:
    """Counts connected clients; `all_in` is set when `target` have connected."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.all_in = trio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count == self.target:
            self.all_in.set()


async def idle_client(port: int, connected: Counter, hold: trio.Event) -> None:
    """A Socket.IO client over a raw websocket: handshake, CONNECT, then wait."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(conn.send(ws.Request(
        host=f"127.0.0.1:{port}", target="/socket.io/?EIO=4&transport=websocket")))
    seen_open = seen_connect = False
    while not seen_connect:
        conn.receive_data(await stream.receive_some(65536))
        for event in conn.events():
            if isinstance(event, ws.TextMessage):
                if event.data.startswith("0") and not seen_open:
                    seen_open = True
                    await stream.send_all(conn.send(ws.Message(data="40")))
                elif event.data.startswith("40"):
                    seen_connect = True
    connected.add()
    async with stream:
        await hold.wait()


async def idle_memory(port: int, pid: int, clients: int) -> dict[str, float]:
    before = rss_kib(pid)
    connected = Counter(clients)
    hold = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(idle_client, port, connected, hold)
        with trio.fail_after(120):
            await connected.all_in.wait()
        await trio.sleep(1)
        after = rss_kib(pid)
        hold.set()
    return {"idle_clients": clients, "rss_growth_mib": round((after - before) / 1024, 2),
            "kib_per_client": round((after - before) / clients, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    model = embedded_model_path(Settings().model_cache_dir)
    env = {"LLM_MODEL": str(model), "MAX_CONCURRENT_REQUESTS": "1", "N_CTX": "1024",
           "LOG_LEVEL": "WARNING"}
    sse: list[float] = []
    sio: list[float] = []
    with tempfile.TemporaryDirectory() as logs, ServerProcess(env, log_dir=Path(logs)) as srv:
        assert srv.proc is not None
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            client = socketio.Client(reconnection=False)
            client.connect(srv.url, transports=["websocket"])
            sse_round(http, 8)
            sio_round(client, 8)
            for _ in range(args.rounds):
                sse.append(sse_round(http, args.tokens))
                sio.append(sio_round(client, args.tokens))
            client.disconnect()
        memory = trio.run(idle_memory, srv.port, srv.proc.pid, args.idle)
    result = {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "sse_tok_s": round(statistics.median(sse), 2),
        "socketio_ws_tok_s": round(statistics.median(sio), 2),
        "ratio": round(statistics.median(sio) / statistics.median(sse), 3),
        **memory,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Redis fan-out: a real redis-server on a free port, two servers, one broadcast."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import trio
import trio.testing

from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.pubsub import BroadcastMessage
from fabricai_trio.realtime.redis_pubsub import RedisPubSub, decode_message, encode_message
from fabricai_trio.realtime.sio_server import SocketIOServer
from fabricai_trio.redis_channels import RedisChannels

from .test_sio_server import open_client

REF = RealtimeConfig.reference()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_message_codec_round_trip() -> None:
    message = BroadcastMessage(
        origin="a",
        namespace="/",
        event="e",
        args=(1, b"\x00\x01", {"k": [b"\x02", "s"]}, None),
        to=("room",),
        skip_sids=("x",),
    )
    assert decode_message(encode_message(message)) == message
    closing = BroadcastMessage(origin="a", namespace="/", event="", args=(), to=("r",),
                               action="close_room")
    assert decode_message(encode_message(closing)) == closing


async def test_broadcast_reaches_clients_of_another_server(redis_url: str) -> None:
    redis_a = RedisChannels(redis_url, poll_interval_s=0.05)
    redis_b = RedisChannels(redis_url, poll_interval_s=0.05)
    a = SocketIOServer(REF, pubsub=RedisPubSub(redis_a, channel="test-fanout"))
    b = SocketIOServer(REF, pubsub=RedisPubSub(redis_b, channel="test-fanout"))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)  # returns once subscribed
        await nursery.start(b.run)
        ca = await open_client(a.asgi_app, nursery)
        cb = await open_client(b.asgi_app, nursery)
        await ca.connect()
        sid_b = await cb.connect()
        b.enter_room(sid_b, "watchers")
        await a.emit("token", "hello", b"\x01\x02", to="watchers")
        assert await cb.recv() == '51-["token","hello",{"_placeholder":true,"num":0}]'
        assert await cb.recv() == b"\x01\x02"
        await a.emit("all", 1)
        assert await ca.recv() == '2["all",1]'
        assert await cb.recv() == '2["all",1]'
        await trio.sleep(0.2)
        assert ca.pending() == []  # no echo of A's own publish
        nursery.cancel_scope.cancel()
    await redis_a.aclose()
    await redis_b.aclose()


async def test_redis_outage_does_not_break_emit() -> None:
    redis = RedisChannels(f"redis://127.0.0.1:{free_port()}/0", retry_interval_s=0.05)
    server = SocketIOServer(REF, pubsub=RedisPubSub(redis))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        c = await open_client(server.asgi_app, nursery)
        await c.connect()
        await server.emit("still", "works")  # local delivery; the publish failure is logged
        assert await c.recv() == '2["still","works"]'
        nursery.cancel_scope.cancel()


async def test_a_paused_redis_never_slows_emit() -> None:
    """Redis paused (SIGSTOP: connections hang): emits go on at full speed, the
    fan-out queue drops what it cannot hold, and the publisher's calls time out."""
    from ..redis_server import RedisServer

    with RedisServer() as server:
        redis_channels = RedisChannels(server.url, timeout_s=1.0, retry_interval_s=0.05)
        pubsub = RedisPubSub(redis_channels, channel="paused", queue_size=16)
        sio = SocketIOServer(REF, pubsub=pubsub)
        async with trio.open_nursery() as nursery:
            await nursery.start(sio.run)
            c = await open_client(sio.asgi_app, nursery)
            sid = await c.connect()
            sio.enter_room(sid, "watchers")
            server.pause()
            try:
                for i in range(200):  # a room broadcast publishes every time
                    with trio.fail_after(5):  # a hang guard: an emit only queues
                        await sio.emit("token", i, to="watchers")
                for i in range(200):
                    assert await c.recv() == f'2["token",{i}]'
                assert pubsub.dropped >= 200 - 2 * 16 - 1  # all but the queue and one batch
            finally:
                server.resume()
            nursery.cancel_scope.cancel()
        await redis_channels.aclose()

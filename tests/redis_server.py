"""A private, throwaway redis-server for tests: a free port, a temp dir, no persistence.

It never touches the machine's Redis (port 6379 is refused). It can be stopped, killed,
paused (SIGSTOP: connections hang, calls time out) and restarted on the same port, to
test outages. Plain sync code, usable from any test runner or script:

    with RedisServer() as server:
        url = server.url            # redis://127.0.0.1:<port>/0
        server.pause(); server.resume()
        server.stop(save=True); server.start()   # data survives (SHUTDOWN SAVE)
        server.kill(); server.start()            # data is gone
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "RedisServerError", "find_free_port", "redis_server_binary"]

_PING = b"*1\r\n$4\r\nPING\r\n"
_SHUTDOWN_SAVE = b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n"


class RedisServerError(RuntimeError):
    """redis-server could not be started or did not answer."""


def redis_server_binary() -> str | None:
    """The redis-server executable, or None (tests then skip)."""
    return os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")


def find_free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


def _roundtrip(port: int, payload: bytes, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        return sock.recv(64)


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, data dir in its own temp dir."""

    def __init__(self, port: int | None = None, *, executable: str | None = None) -> None:
        binary = executable or redis_server_binary()
        if binary is None:
            raise RedisServerError("redis-server not found (set REDIS_SERVER_BIN)")
        if port == 6379:
            raise RedisServerError("refusing the machine's Redis port 6379")
        self.executable = binary
        self.port = port or find_free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fabricai-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or start again, same port and dir) and wait until it answers PING."""
        if self.running:
            return
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self._proc = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--protected-mode",
                    "yes",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self._paused = False
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self._proc.poll() is not None:
                raise RedisServerError(f"redis-server exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(f"redis-server did not answer: {self.log_tail()}")
            time.sleep(0.02)

    def ping(self, timeout: float = 0.5) -> bool:
        """True if the server answers PING now (False while paused or stopped)."""
        try:
            return _roundtrip(self.port, _PING, timeout).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, save: bool = False, timeout: float = 10.0) -> None:
        """Stop the server. `save=True` writes a dump first, so `start()` reloads the data;
        otherwise the data is gone (no persistence configured)."""
        if self._proc is None:
            return
        self.resume()
        if self.running:
            if save:
                with contextlib.suppress(OSError):
                    _roundtrip(self.port, _SHUTDOWN_SAVE, timeout)
            else:
                self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: like a crash. The port refuses connections until `start()`."""
        if self._proc is None:
            return
        if self.running:
            self._proc.kill()
        self._proc.wait()
        self._proc = None
        self._paused = False

    def restart(self, *, save: bool = False) -> None:
        self.stop(save=save)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        if self.running and not self._paused:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.running and self._paused:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

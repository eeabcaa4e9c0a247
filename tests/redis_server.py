"""A real, throwaway ``redis-server`` for tests: a free loopback port, a temporary directory,
no persistence.

Without the binary, tests that need it skip, unless ``CHATSSE_REQUIRE_BINARIES=1`` (CI) makes
a missing binary a failure, so CI never goes green by skipping the Redis tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

MISSING = "redis-server not installed (apt-get install redis-server)"


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips (or fails, under CI) the calling test without it."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CHATSSE_REQUIRE_BINARIES") == "1":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return binary


@dataclass(frozen=True)
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start(binary: str, directory: Path, deadline: float) -> RedisServer | None:
    """One attempt; None if the server exited (another process took the port meanwhile)."""
    port = _free_port()
    log = directory / f"redis-{port}.log"
    with log.open("wb") as out:
        # fmt: off
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
        ]
        # fmt: on
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            process.wait()
            return None
        if _answers_ping(port):
            return RedisServer(port, process)
        time.sleep(0.02)
    _stop(process)
    raise RuntimeError(f"redis-server did not answer PING; its log:\n{log.read_text(errors='replace')}")


@contextmanager
def redis_server(*, timeout: float = 10.0) -> Iterator[RedisServer]:
    """Start ``redis-server``, wait (at most ``timeout`` seconds) until it answers PING, and
    stop it (terminate, then kill) when the block ends."""
    binary = redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="chatsse-redis-") as tmp:
        deadline = time.monotonic() + timeout
        server = None
        for _ in range(3):
            server = _start(binary, Path(tmp), deadline)
            if server is not None:
                break
        if server is None:
            logs = "\n".join(p.read_text(errors="replace") for p in sorted(Path(tmp).glob("*.log")))
            raise RuntimeError(f"redis-server would not start; its logs:\n{logs}")
        try:
            yield server
        finally:
            _stop(server.process)

"""Servers as child processes: one uvicorn process, and start-up failures."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from redis_server import redis_server_binary
from support import chat

from chatsse.processes import (
    GunicornServer,
    RedisServer,
    ServerProcessError,
    UvicornServer,
    child_pids,
    free_port,
)

ENV = {"CHATSSE_SIM_TTFT_MS": "1", "CHATSSE_SIM_TOKEN_INTERVAL_MS": "1", "CHATSSE_LOG_LEVEL": "warning"}


def test_uvicorn_server_serves_from_one_process() -> None:
    with UvicornServer(env=ENV) as server:
        assert server.worker_pids() == [server.pid]
        assert httpx.get(f"{server.url}/health").json()["this_worker"]["pid"] == server.pid
        with httpx.Client(base_url=server.url) as client:
            assert chat(client, "hello").events[-1].event == "completed"
        process = server.process
    assert process is not None
    assert process.poll() is not None  # stopped on leaving the block


def test_gunicorn_workers_are_the_masters_children(tmp_path: Path) -> None:
    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=ENV) as server:
        workers = server.worker_pids()
        assert len(workers) == 2
        assert workers == child_pids(server.pid)
        assert server.pid not in workers


def test_a_failing_start_raises_with_the_log() -> None:
    server = UvicornServer(env={**ENV, "CHATSSE_MAX_HISTORY_LENGTH": "zero"}, startup_timeout=20)
    with pytest.raises(ServerProcessError, match="CHATSSE_MAX_HISTORY_LENGTH"):
        server.start()
    server.close()


def _redis(port: int, *command: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        parts = "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
        connection.sendall(f"*{len(command)}\r\n{parts}".encode())
        return connection.recv(256)


def test_a_redis_server_started_again_on_its_port_and_directory_has_its_data(tmp_path: Path) -> None:
    """What the chaos run's Redis restart relies on: a clean stop writes the append-only file."""
    with RedisServer(tmp_path / "redis", binary=redis_server_binary()) as redis:
        assert _redis(redis.port or 0, "SET", "kept", "yes") == b"+OK\r\n"
        port = redis.port
        assert redis.stop() == 0
        redis.start()
        assert redis.port == port
        assert redis.store_url == f"redis://127.0.0.1:{port}/0"
        assert _redis(port or 0, "GET", "kept") == b"$3\r\nyes\r\n"
        with pytest.raises(ServerProcessError, match="already started"):
            redis.start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

"""Every wait has a deadline (chatsse/deadlines.py): how the bounds are derived, and each one
enforced on a real server: a Redis paused with SIGSTOP, a SQLite file another process holds
locked, a client that stops reading, an engine that stops sending."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Serve
from redis_server import RedisServer, redis_server
from support import chat, metric_value, wait_for

from chatsse.deadlines import LOCK_MARGIN, derive
from chatsse.engine import CompletionReason
from chatsse.models import Message
from chatsse.settings import Settings

# --- derive -----------------------------------------------------------------------------------


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"store_timeout": 0.5, "write_timeout": 0.5, "request_timeout": 2, "shutdown_grace_period": 0},
        {"store_timeout": 30, "write_timeout": 120, "request_timeout": 3600, "shutdown_grace_period": 60},
        {"sse_keepalive_interval": 0.05, "engine_first_token_timeout": 0.2, "engine_idle_timeout": 0.1},
    ],
)
def test_the_bounds_fit_inside_each_other(values: dict[str, Any]) -> None:
    s = settings(**values)
    d = derive(s)
    # The watchdog checks often enough for every deadline and for keepalive comments.
    assert 0.01 <= d.tick <= 1.0
    assert d.tick <= min(d.reply, d.first_token, d.token_gap, d.write) / 4 or d.tick == 0.01
    assert d.tick <= s.sse_keepalive_interval / 2 or d.tick == 0.01
    # A lock outlives the longest turn: begin, the whole reply (and the watchdog's tick), finish.
    assert d.lock_ttl >= d.store + d.reply + d.tick + d.store + LOCK_MARGIN
    # After the grace period: storing the partial reply and writing the last event fit in
    # uvicorn's graceful timeout, which fits in gunicorn's, which fits in its heartbeat.
    assert d.server_shutdown >= s.shutdown_grace_period + d.tick + d.store + d.write
    assert d.gunicorn_graceful > d.server_shutdown
    assert d.gunicorn_timeout > d.gunicorn_graceful


def test_the_gunicorn_plan_and_the_servers_use_the_same_bounds() -> None:
    from chatsse.app import create_app
    from chatsse.inprocess import InProcessServer
    from chatsse.serving import plan

    s = settings(shutdown_grace_period=3, store_timeout=2, write_timeout=4)
    d = derive(s)
    gunicorn = plan(s)
    assert (gunicorn.graceful_timeout, gunicorn.timeout) == (d.gunicorn_graceful, d.gunicorn_timeout)
    assert InProcessServer(create_app(s)).graceful_timeout == d.server_shutdown


# --- a store that does not answer --------------------------------------------------------------

STORE_TIMEOUT = 0.5
SLOW = {"sim_ttft_ms": 0, "sim_token_interval_ms": 40, "sim_reply_tokens_min": 25, "sim_reply_tokens_max": 25}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: pausing it must not touch any other test."""
    with redis_server() as server:
        try:
            yield server
        finally:
            os.kill(server.process.pid, signal.SIGCONT)


def _after_the_first_token(response: httpx.Response) -> Iterator[str]:
    """The stream's lines, read up to its first message event: the rest of them, still to come."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("event: message"):
            break
    return lines


def _last_data(lines: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads([line for line in lines if line.startswith("data: ")][-1][6:])
    return data


def _open_streams(url: str) -> int:
    return int(httpx.get(f"{url}/health").json()["this_worker"]["open_streams"])


def test_a_paused_redis_gives_503_within_the_store_timeout(serve: Serve, redis: RedisServer) -> None:
    server = serve(store=redis.url, store_timeout=STORE_TIMEOUT)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = chat(client, "before the pause")
        assert first.events[-1].event == "completed"
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            refused = client.post(
                "/chat", json={"message": "while paused", "conversation_id": first.conversation_id}
            )
            took = time.monotonic() - started
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "storage_unavailable"
            assert (
                "Redis" in refused.json()["error"]["message"] or "redis" in refused.json()["error"]["message"]
            )
            assert refused.headers["retry-after"] == "1"
            assert took < STORE_TIMEOUT + 1.5  # the deadline, not Redis's pause
            assert _open_streams(server.url) == 0  # the slot was released
            assert client.get(f"/conversations/{first.conversation_id}").status_code == 503
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)

        # Redis is back: the refused turn was undone in the background, so the conversation is
        # neither busy nor holding the refused message.
        def answered() -> bool:
            return chat(client, "after the pause", first.conversation_id).status == 200

        assert wait_for(answered, 15, 0.2)
        stored = client.get(f"/conversations/{first.conversation_id}").json()["messages"]
        assert [m["content"] for m in stored if m["role"] == "user"] == [
            "before the pause",
            "after the pause",
        ]
        assert [m["role"] for m in stored] == ["user", "assistant"] * 2


def test_a_redis_paused_mid_stream_ends_it_with_storage_error_and_stores_the_reply_later(
    serve: Serve, redis: RedisServer
) -> None:
    server = serve(store=redis.url, store_timeout=STORE_TIMEOUT, **SLOW)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", "/chat", json={"message": "a reply to store"}) as response:
            lines = _after_the_first_token(response)
            os.kill(redis.process.pid, signal.SIGSTOP)
            paused = time.monotonic()
            try:
                rest = list(lines)
                ended = time.monotonic()
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
        assert "event: error" in rest
        error = _last_data(rest)
        assert error["type"] == "storage_error"
        assert error["message"].startswith("the reply is not stored")
        # The reply took ~1 s after the pause; then one store deadline.
        assert ended - paused < 25 * 0.04 + STORE_TIMEOUT + 1.5
        assert wait_for(lambda: _open_streams(server.url) == 0, 2)
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "chatsse_streams_total", outcome="storage_error") == 1

        # Redis is back: the manager stores the reply the client saw and releases the lock.
        def stored() -> list[dict[str, Any]]:
            response = client.get("/conversations")
            if response.status_code != 200 or not response.json()["conversations"]:
                return []
            cid = response.json()["conversations"][0]["id"]
            messages: list[dict[str, Any]] = client.get(f"/conversations/{cid}").json()["messages"]
            return messages

        assert wait_for(lambda: len(stored()) == 2, 15, 0.2)
        assert stored()[1]["finish_reason"] == "stop"


_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


class Locker:
    """Another process holding the SQLite file's write lock until released."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def test_a_sqlite_file_locked_by_another_process_gives_503_within_the_store_timeout(
    serve: Serve, tmp_path: Path
) -> None:
    path = tmp_path / "chat.db"
    server = serve(store=f"sqlite:///{path}", store_timeout=STORE_TIMEOUT)
    locker = Locker(path)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            started = time.monotonic()
            refused = client.post("/chat", json={"message": "locked out"})
            took = time.monotonic() - started
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "storage_unavailable"
            assert took < STORE_TIMEOUT + 1.5
            assert _open_streams(server.url) == 0
            assert client.get("/conversations").status_code == 200  # readers are not blocked (WAL)
    finally:
        locker.release()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert chat(client, "unlocked").events[-1].event == "completed"
        assert client.get("/conversations").json()["total"] == 1  # the refused turn left nothing


def test_a_sqlite_file_locked_mid_stream_ends_it_with_storage_error(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    server = serve(store=f"sqlite:///{path}", store_timeout=STORE_TIMEOUT, **SLOW)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", "/chat", json={"message": "to store"}) as response:
            lines = _after_the_first_token(response)
            locker = Locker(path)
            try:
                rest = list(lines)
            finally:
                locker.release()
        error = _last_data(rest)
        assert error["type"] == "storage_error"
        assert "sqlite store" in error["message"]
        assert wait_for(lambda: _open_streams(server.url) == 0, 2)
        # The lock is gone: the reply is stored in the background, and the conversation is free.
        cid = client.get("/conversations").json()["conversations"][0]["id"]
        assert wait_for(lambda: len(client.get(f"/conversations/{cid}").json()["messages"]) == 2, 10, 0.2)
        assert chat(client, "next turn", cid).events[-1].event == "completed"


# --- a client that stops reading ---------------------------------------------------------------


class BigTokenEngine:
    """Replies of ``tokens`` tokens of 16 KiB each, as fast as they can be written, ``batch``
    tokens at a time (an engine catching up hands over every token it has ready at once)."""

    name = "big-tokens"

    def __init__(self, tokens: int = 2000, *, batch: int = 1) -> None:
        self.tokens = tokens
        self.batch = batch

    def generate(self, messages: Sequence[Message], *, max_tokens: int, options: Any = None) -> Any:
        return _Tokens(["x" * 16384] * min(self.tokens, max_tokens), batch=self.batch)

    async def aclose(self) -> None:
        return None


class _Tokens:
    def __init__(self, tokens: list[str], *, stall_after: int | None = None, batch: int = 1) -> None:
        self.tokens = tokens
        self.stall_after = stall_after
        self.batch = batch
        self.prompt_tokens = 1
        self.completion_tokens = 0
        self.finish_reason: CompletionReason | None = None
        self.closed = False

    def __aiter__(self) -> _Tokens:
        return self

    async def start(self) -> None:
        return None

    async def __anext__(self) -> list[str]:
        if self.completion_tokens == self.stall_after:
            await asyncio.Event().wait()  # an engine that never sends its next token
        if self.completion_tokens == len(self.tokens):
            self.finish_reason = "stop"
            raise StopAsyncIteration
        first = self.completion_tokens
        self.completion_tokens = min(first + self.batch, len(self.tokens))
        await asyncio.sleep(0)
        return self.tokens[first : self.completion_tokens]

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("batch", [1, 2000], ids=["token-by-token", "all-at-once"])
def test_a_reader_that_stops_reading_is_cut_off_within_the_write_timeout(serve: Serve, batch: int) -> None:
    """Also when the engine hands over the whole reply at once: once the connection is cut,
    the rest of the batch is not "sent" into it, and the reply is not stored as complete."""
    write_timeout = 0.6
    server = serve(engine=BigTokenEngine(batch=batch), write_timeout=write_timeout, max_reply_tokens=2000)
    body = b'{"message": "send a lot"}'
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port or 0))
    try:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # The client reads nothing more: buffers fill, a write blocks, the watchdog closes the
        # connection and frees the slot.
        assert wait_for(lambda: _open_streams(server.url) == 0, write_timeout + 5)
        assert time.monotonic() - started < write_timeout + 5
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "chatsse_streams_total", outcome="write_timeout") == 1
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # the server closed the connection
            while sock.recv(1 << 20):
                pass
    finally:
        sock.close()
    listing = httpx.get(f"{server.url}/conversations").json()["conversations"]
    messages = httpx.get(f"{server.url}/conversations/{listing[0]['id']}").json()["messages"]
    assert messages[-1]["finish_reason"] == "interrupted"
    assert 0 < len(messages[-1]["content"]) < 2000 * 16384  # what was sent before the cut


# --- an engine that stops sending --------------------------------------------------------------


class StallingEngine:
    def __init__(self, stall_after: int) -> None:
        self.stall_after = stall_after
        self.generations: list[_Tokens] = []
        self.name = "stalling"

    def generate(self, messages: Sequence[Message], *, max_tokens: int, options: Any = None) -> _Tokens:
        generation = _Tokens([" token"] * 10, stall_after=self.stall_after)
        self.generations.append(generation)
        return generation

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("stall_after", "setting"), [(0, "engine_first_token_timeout"), (3, "engine_idle_timeout")]
)
def test_an_engine_that_stops_sending_ends_with_engine_timeout(
    serve: Serve, stall_after: int, setting: str
) -> None:
    engine = StallingEngine(stall_after)
    server = serve(engine=engine, **{setting: 0.4})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.monotonic()
        result = chat(client, "are you there?")
        took = time.monotonic() - started
        assert result.events[-1].event == "error"
        error = result.data("error")
        assert error["type"] == "engine_timeout"
        assert "0.4 s" in error["message"]
        assert len(result.deltas) == stall_after
        assert 0.4 <= took < 0.4 + 1.0  # the deadline and one tick, no more
        assert engine.generations[0].closed  # the engine was told to stop
        stored = client.get(f"/conversations/{result.conversation_id}").json()["messages"]
        assert stored[-1]["finish_reason"] == "timeout"
        assert stored[-1]["content"] == "".join(result.deltas)
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "chatsse_streams_total", outcome="engine_timeout") == 1
        assert _open_streams(server.url) == 0

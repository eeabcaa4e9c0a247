"""chatsse under gunicorn with several real worker processes: shared conversation state,
metrics over all workers, graceful shutdown and crash safety."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from redis_server import RedisServer, redis_server
from support import chat, metric_value, wait_for

from chatsse.engine import count_prompt_tokens
from chatsse.models import Message
from chatsse.processes import GunicornServer, ServerProcessError
from chatsse.serving import GC_THRESHOLDS

FAST_ENV = {
    "CHATSSE_SIM_TTFT_MS": "1",
    "CHATSSE_SIM_PREFILL_MS_PER_TOKEN": "0",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "1",
    "CHATSSE_SIM_JITTER": "0",
    "CHATSSE_LOG_LEVEL": "warning",
}
SLOW_ENV = {**FAST_ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "50"}
MAX_HISTORY = 6
USERS, TURNS = 20, 4  # the fourth turn's prompt is trimmed to MAX_HISTORY


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def _store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'conversations.db'}"
    redis: RedisServer = request.getfixturevalue("redis")
    import redis as redis_client

    redis_client.Redis.from_url(redis.url).flushdb()
    return redis.url


async def _user_session(client: httpx.AsyncClient, user: int, turns: int) -> list[str]:
    """One user's conversation; checks every turn's prompt against the history it built."""
    history: list[Message] = []
    conversation_id = None
    problems = []
    for turn in range(turns):
        text = f"user {user} turn {turn}: what about topic{user}x{turn}?"
        history.append(Message(f"u{turn}", "user", text, 0.0))
        body = {"message": text, "conversation_id": conversation_id}
        deltas, completed = [], {}
        async with aconnect_sse(client, "POST", "/chat", json=body) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                return [f"user {user} turn {turn}: HTTP {source.response.status_code} {source.response.text}"]
            async for event in source.aiter_sse():
                data = json.loads(event.data)
                if event.event == "connected":
                    conversation_id = data["conversation_id"]
                elif event.event == "message":
                    deltas.append(data["delta"])
                elif event.event == "completed":
                    completed = data
        reply = "".join(deltas)
        expected_prompt = count_prompt_tokens(history[-MAX_HISTORY:])
        if completed.get("content") != reply:
            problems.append(f"user {user} turn {turn}: completed content differs from deltas")
        if completed.get("usage", {}).get("prompt_tokens") != expected_prompt:
            usage = completed.get("usage")
            problems.append(
                f"user {user} turn {turn}: usage {usage}, expected {expected_prompt} prompt tokens"
            )
        history.append(Message(f"a{turn}", "assistant", reply, 0.0))
    stored = (await client.get(f"/conversations/{conversation_id}")).json()["messages"]
    if [m["content"] for m in stored] != [m.content for m in history]:
        problems.append(f"user {user}: stored history differs from the conversation")
    return problems


async def _run_users(url: str, users: int, turns: int) -> list[str]:
    limits = httpx.Limits(max_connections=users)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        results = await asyncio.gather(*(_user_session(client, u, turns) for u in range(users)))
    return [p for problems in results for p in problems]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_multi_turn_chats_across_four_workers(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store_url(kind, tmp_path, request)
    env = {**FAST_ENV, "CHATSSE_MAX_HISTORY_LENGTH": str(MAX_HISTORY)}
    with GunicornServer(workers=4, store=store, env=env) as server:
        problems = asyncio.run(_run_users(server.url, users=USERS, turns=TURNS))
        assert problems == []

        # Several workers served: fresh connections reach different processes.
        pids = {httpx.get(f"{server.url}/health").json()["this_worker"]["pid"] for _ in range(40)}
        assert len(pids) >= 2
        assert pids <= set(server.worker_pids())

        # Every worker's counts are in every scrape.
        for _ in range(3):
            text = httpx.get(f"{server.url}/metrics").text
            served = metric_value(text, "chatsse_http_requests_total", route="/chat", status="200")
            assert served == USERS * TURNS
            outcomes = sum(metric_value(text, "chatsse_streams_total", outcome=o) for o in ("stop", "length"))
            assert outcomes == USERS * TURNS
            assert metric_value(text, "chatsse_open_streams") == 0
        stats = httpx.get(f"{server.url}/stats").json()
        assert stats["all_workers"]["requests_by_status"]["200"] >= USERS * TURNS + 40
        assert stats["all_workers"]["conversations"] == USERS
        assert stats["store"] == kind
        # Each worker tuned its garbage collector when it started.
        assert stats["this_worker"]["gc"]["thresholds"] == list(GC_THRESHOLDS)
        assert stats["this_worker"]["gc"]["frozen_objects"] > 1000  # the modules and the app


def test_memory_store_with_several_workers_is_refused_at_start() -> None:
    server = GunicornServer(workers=4, store="memory", env=FAST_ENV, startup_timeout=20)
    with pytest.raises(ServerProcessError) as failure:
        server.start()
    server.close()
    message = str(failure.value)
    assert "CHATSSE_STORE=memory" in message
    assert "sqlite:///" in message


def test_several_workers_default_to_the_sqlite_store(tmp_path: Path) -> None:
    with GunicornServer(workers=2, env=FAST_ENV, cwd=tmp_path) as server:
        assert httpx.get(f"{server.url}/health").json()["store"] == "sqlite"
    assert (tmp_path / ".chatsse" / "conversations.db").exists()


class StreamReader(threading.Thread):
    """Reads one /chat stream to its end in a thread, remembering events and failures."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.local_port: int | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=20) as client,
                client.stream("POST", "/chat", json=self.body) as response,
            ):
                sock = response.extensions["network_stream"].get_extra_info("socket")
                self.local_port = sock.getsockname()[1]
                buffer = ""
                for text in response.iter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        fields = dict(
                            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
                        )
                        if "event" in fields:
                            self.events.append((fields["event"], json.loads(fields["data"])))
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    @property
    def deltas(self) -> str:
        return "".join(d["delta"] for name, d in self.events if name == "message")

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.events if n == name)


def test_sigterm_ends_open_streams_with_shutdown_event_within_grace(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'c.db'}"
    env = {**SLOW_ENV, "CHATSSE_SHUTDOWN_GRACE_PERIOD": "1", "CHATSSE_SIM_REPLY_TOKENS_MIN": "400",
           "CHATSSE_SIM_REPLY_TOKENS_MAX": "400"}  # fmt: skip
    server = GunicornServer(workers=2, store=store, env=env).start()
    try:
        readers = [StreamReader(server.url, {"message": f"long reply {i}"}) for i in range(4)]
        for r in readers:
            r.start()
        assert wait_for(lambda: all(r.count("message") >= 3 for r in readers), 10)
        sent_at = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=30)
        stopped_in = time.monotonic() - sent_at
    finally:
        server.close()
    for r in readers:
        r.join(10)
        assert r.error is None
        assert r.events[-1][0] == "error"
        assert r.events[-1][1]["type"] == "shutdown"
        assert r.ended_at is not None
        assert 0.9 <= r.ended_at - sent_at < 6  # after the 1 s grace, before gunicorn's kill
    assert code == 0
    assert stopped_in < 6  # graceful_timeout is grace + 5 s: no hard kill was needed

    # The partial replies are stored, marked as cut by the shutdown.
    with GunicornServer(workers=1, store=store, env=FAST_ENV) as again:
        for r in readers:
            conversation_id = r.events[0][1]["conversation_id"]
            stored = httpx.get(f"{again.url}/conversations/{conversation_id}").json()["messages"]
            assert stored[-1]["finish_reason"] == "shutdown"
            assert stored[-1]["content"] == r.deltas


def _client_ports_by_worker(pids: list[int], port: int) -> dict[int, set[int]]:
    """For each worker, the client ports of its established connections on the server's port."""
    inode_owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode_owner[target[8:-1]] = pid
    ports: dict[int, set[int]] = {pid: set() for pid in pids}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inode_owner:
                ports[inode_owner[inode]].add(int(remote.rsplit(":", 1)[1], 16))
    return ports


def test_kill_9_of_a_worker_loses_no_completed_turn(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'c.db'}"
    env = {**SLOW_ENV, "CHATSSE_SIM_REPLY_TOKENS_MIN": "120", "CHATSSE_SIM_REPLY_TOKENS_MAX": "120"}
    fast_env = {**env, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "1"}
    with (
        GunicornServer(workers=4, store=store, env=fast_env) as fast,
        httpx.Client(base_url=fast.url) as client,
    ):
        replies = (chat(client, f"c{i}") for i in range(16))
        first_turns = {r.conversation_id: "".join(r.deltas) for r in replies}

    with GunicornServer(workers=4, store=store, env=env) as server:
        assert wait_for(lambda: len(server.worker_pids()) == 4, 20)
        workers = server.worker_pids()

        def placement() -> dict[int, list[StreamReader]]:
            ports = _client_ports_by_worker(workers, server.port)
            return {pid: [r for r in readers if r.local_port in ports[pid]] for pid in workers}

        readers = [
            StreamReader(server.url, {"message": "second turn", "conversation_id": c}) for c in first_turns
        ]
        for r in readers:
            r.start()
        assert wait_for(lambda: all(r.count("message") >= 2 for r in readers), 15)
        # The kernel may hand every connection to one worker: add streams until two workers have some.
        while sum(1 for on in placement().values() if on) < 2 and len(readers) < 64:
            more = [StreamReader(server.url, {"message": "a new conversation"}) for _ in range(8)]
            for r in more:
                r.start()
            readers.extend(more)
            assert wait_for(lambda: all(r.count("message") >= 2 for r in readers), 15)
        where = placement()
        assert sum(1 for on in where.values() if on) >= 2, {pid: len(on) for pid, on in where.items()}
        victim = max(where, key=lambda pid: len(where[pid]))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for r in readers:
            r.join(30)
            assert not r.is_alive()

        # Every stream still open on the killed worker ends with a clean connection error, not a hang...
        broken = [r for r in where[victim] if r.error is not None]
        assert broken
        for r in where[victim]:
            if r.error is None:
                assert r.ended_at is not None
                assert r.ended_at <= killed_at  # it had finished before the kill
            else:
                assert isinstance(r.error, httpx.RemoteProtocolError | httpx.ReadError), r.error
        # ...and every stream on the other workers streams on to its end.
        finished = [r for r in readers if r not in broken]
        assert len(finished) > len(where[victim]) - len(broken)
        for r in finished:
            assert r.error is None, r.error
            assert r.events[-1][0] == "completed"

        # gunicorn replaces the worker.
        assert wait_for(lambda: len(server.worker_pids()) == 4 and victim not in server.worker_pids(), 20)
        with httpx.Client(base_url=server.url) as client:
            assert chat(client, "after the crash").events[-1].event == "completed"
            for conversation_id, reply in first_turns.items():
                stored = client.get(f"/conversations/{conversation_id}").json()["messages"]
                assert stored[1]["content"] == reply
            for r in finished:
                conversation_id = r.events[0][1]["conversation_id"]
                stored = client.get(f"/conversations/{conversation_id}").json()["messages"]
                assert stored[-1]["content"] == r.deltas
                assert stored[-1]["finish_reason"] == "stop"


def test_json_log_format_covers_gunicorn_and_uvicorn_lines(tmp_path: Path) -> None:
    env = {**FAST_ENV, "CHATSSE_LOG_FORMAT": "json", "CHATSSE_LOG_LEVEL": "info"}
    server = GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env).start()
    try:
        httpx.get(f"{server.url}/health")
        server.stop()
        lines = [line for line in server.logs().splitlines() if line.strip()]
    finally:
        server.close()
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [p["event"] for p in parsed]
    assert any(e.startswith("Starting gunicorn") for e in events)  # gunicorn's own
    assert any(e.startswith("Started server process") for e in events)  # uvicorn's, in a worker
    assert {p["path"] for p in parsed if p["event"] == "request"} == {"/health"}  # chatsse's


def test_metrics_live_in_a_directory_of_chatsses_own_inside_the_operators(tmp_path: Path) -> None:
    """An operator's PROMETHEUS_MULTIPROC_DIR (here with a file of theirs in it) is never
    emptied or removed: chatsse uses a fresh directory inside it, and removes only that."""
    operator = tmp_path / "metrics"
    operator.mkdir()
    (operator / "theirs.txt").write_text("keep me")
    env = {**FAST_ENV, "PROMETHEUS_MULTIPROC_DIR": str(operator)}
    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        with httpx.Client(base_url=server.url) as client:
            assert chat(client, "counted").events[-1].event == "completed"
            text = client.get("/metrics").text
        assert metric_value(text, "chatsse_streams_total", outcome="stop") == 1
        (ours,) = [p for p in operator.iterdir() if p.is_dir()]
        assert ours.name.startswith("chatsse-metrics-")
        assert any(ours.glob("*.db"))  # the workers write their values there
        assert not list(operator.glob("*.db"))
    assert (operator / "theirs.txt").read_text() == "keep me"
    assert sorted(p.name for p in operator.iterdir()) == ["theirs.txt"]


def test_without_an_operators_directory_metrics_go_to_a_fresh_temporary_one(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"  # the server's temporary directory, its own: other tests run servers too
    temp.mkdir()
    env = {**FAST_ENV, "TMPDIR": str(temp)}
    with GunicornServer(workers=1, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        made = set(temp.glob("chatsse-metrics-*"))
        assert len(made) == 1
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert not made.pop().exists()


def test_a_store_chosen_in_dot_env_is_used_with_several_workers(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CHATSSE_STORE=sqlite:///chosen/in-dot-env.db\n")
    with GunicornServer(workers=2, env=FAST_ENV, cwd=tmp_path) as server:
        assert httpx.get(f"{server.url}/health").json()["store"] == "sqlite"
        with httpx.Client(base_url=server.url) as client:
            assert chat(client, "where am I stored?").events[-1].event == "completed"
    assert (tmp_path / "chosen" / "in-dot-env.db").exists()
    assert not (tmp_path / ".chatsse").exists()


def test_choose_store_reads_settings_not_the_environment(tmp_path: Path) -> None:
    from chatsse.serving import choose_store
    from chatsse.settings import Settings, SettingsError

    env_file = tmp_path / ".env"
    env_file.write_text("CHATSSE_STORE=redis://cache:6379/2\n")
    assert choose_store(Settings(_env_file=env_file, workers=4)) == "redis://cache:6379/2"  # type: ignore[call-arg]
    assert choose_store(Settings(_env_file=None, workers=4)) == "sqlite:///.chatsse/conversations.db"  # type: ignore[call-arg]
    assert choose_store(Settings(_env_file=None, workers=1)) == "memory"  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match="CHATSSE_STORE=memory"):
        choose_store(Settings(_env_file=None, workers=2, store="memory"))  # type: ignore[call-arg]

"""Servers as child processes: one uvicorn process, and start-up failures."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from support import chat

from chatsse.processes import GunicornServer, ServerProcessError, UvicornServer, child_pids, free_port

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


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

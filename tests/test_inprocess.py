"""Servers started inside the test process: several at once, one after another."""

from __future__ import annotations

import socket

import httpx
import pytest
from support import chat

from chatsse import Settings, create_app
from chatsse.inprocess import InProcessServer, ServerStartError


def _app() -> object:
    return create_app(Settings(_env_file=None, sim_ttft_ms=0, sim_token_interval_ms=0, log_level="warning"))  # type: ignore[call-arg]


def test_two_servers_at_once_and_a_third_after_they_stop() -> None:
    with InProcessServer(_app()) as a, InProcessServer(_app()) as b:  # type: ignore[arg-type]
        assert a.port != b.port
        for server in (a, b):
            with httpx.Client(base_url=server.url) as client:
                assert chat(client, "hi").data("completed")["finish_reason"] == "stop"
    with InProcessServer(_app()) as c, httpx.Client(base_url=c.url) as client:  # type: ignore[arg-type]
        assert chat(client, "again").data("completed")["finish_reason"] == "stop"


def test_port_clash_raises_instead_of_hanging() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError, match="cannot bind"):
            InProcessServer(_app(), port=port).start()  # type: ignore[arg-type]


def test_failing_startup_raises() -> None:
    async def broken(scope: dict[str, object], receive: object, send: object) -> None:
        raise RuntimeError("start-up fails")

    with pytest.raises(ServerStartError):
        InProcessServer(broken).start(timeout=5)  # type: ignore[arg-type]


def test_stopped_server_refuses_connections() -> None:
    server = InProcessServer(_app()).start()  # type: ignore[arg-type]
    url = server.url
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")

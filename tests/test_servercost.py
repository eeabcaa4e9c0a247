"""What a server costs, measured over real sockets: the reference servers and chatsse, each a
uvicorn child process (chatsse.referenceservers), measured by chatsse.servercost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatsse.referenceservers import REFERENCE_APPS, ReferenceServer, reply_env
from chatsse.servercost import cpu_per_event_steady, cpu_per_request, cpu_seconds

STREAMS = 20
WINDOW = 0.3
# Each reply outlasts the measurement: streams opening, a fifth of the window, a second for
# chatsse's task gauge, the window, and a margin.
TOKENS = int((1.2 * WINDOW + 4) * 20)
# The asyncio tasks each open stream holds: uvicorn's request task, plus sse-starlette's task
# group of four, or chatsse's body writer and disconnect listener.
TASKS_PER_STREAM = {"bare-asgi": 1, "sse-starlette": 5, "chatsse": 3}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ReferenceServer]]:
    # No resume window: a stream whose client left ends at once, so chatsse stops at once too.
    env = {"CHATSSE_RESUME_WINDOW": "0"}
    started = {
        app: ReferenceServer(app, env={**reply_env(app, tokens=TOKENS, interval_ms=50), **env})
        for app in REFERENCE_APPS
    }
    try:
        with ThreadPoolExecutor(len(started)) as pool:  # each start waits for its child
            list(pool.map(ReferenceServer.start, started.values()))
        yield started
    finally:
        for server in started.values():
            server.close()


@pytest.mark.parametrize("app", list(REFERENCE_APPS))
def test_steady_streams_cost_cpu_per_event_and_hold_their_tasks(
    app: str, servers: dict[str, ReferenceServer]
) -> None:
    server = servers[app]
    row = asyncio.run(cpu_per_event_steady(server, streams=STREAMS, window=WINDOW, count_tasks=server.tasks))
    assert row["streams"] == STREAMS
    # 20 streams at 20 tokens a second for WINDOW seconds: every stream sends through it.
    assert row["events"] >= STREAMS * 20 * WINDOW * 0.5
    assert row["server_us_per_event"] > 0
    assert round(row["tasks_per_stream"]) == TASKS_PER_STREAM[app]


@pytest.mark.parametrize("app", list(REFERENCE_APPS))
def test_short_requests_are_counted_with_their_events(app: str, servers: dict[str, ReferenceServer]) -> None:
    row = asyncio.run(cpu_per_request(servers[app], requests=20, tokens=1, concurrency=4))
    assert row["errors"] == {}
    assert row["requests"] == 20
    assert row["events_per_request"] == 3  # connected, one token, completed
    assert row["server_us_per_request"] > 0


def test_the_servers_own_cpu_clock_moves_with_its_work(servers: dict[str, ReferenceServer]) -> None:
    server = servers["bare-asgi"]
    before = cpu_seconds(server.pid)
    asyncio.run(cpu_per_request(server, requests=20, tokens=1, concurrency=4))
    assert cpu_seconds(server.pid) > before


def test_the_parents_reply_settings_do_not_reach_a_reference_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_REPLY_TOKENS", "7")
    monkeypatch.setenv("CHATSSE_SIM_TTFT_MS", "999")
    env = ReferenceServer("sse-starlette", env={"BENCH_TTFT_MS": "0"}).environment()
    assert "BENCH_REPLY_TOKENS" not in env
    assert "CHATSSE_SIM_TTFT_MS" not in env
    assert env["BENCH_TTFT_MS"] == "0"


def test_an_unknown_app_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown app"):
        ReferenceServer("flask")

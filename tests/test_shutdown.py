"""Graceful shutdown of in-process servers: streams end with a shutdown event, and one
server's shutdown never ends another server's streams."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import Serve
from support import chat
from wire import parse_events

SLOW = {
    "sim_ttft_ms": 0,
    "sim_token_interval_ms": 50,
    "sim_reply_tokens_min": 400,
    "sim_reply_tokens_max": 400,
}


def _read_stream(url: str, body: dict[str, object], out: dict[str, object]) -> None:
    """Read one /chat stream to its end, keeping the raw bytes and when it ended; ``out["open"]``
    (a ``threading.Event``) is set once its first bytes have come: the stream has begun."""
    opened = out.setdefault("open", threading.Event())
    assert isinstance(opened, threading.Event)
    with httpx.Client(base_url=url, timeout=30) as client, client.stream("POST", "/chat", json=body) as r:
        raw = b""
        for chunk in r.iter_bytes():
            raw += chunk
            opened.set()
    out["raw"] = raw
    out["ended"] = time.monotonic()


def _reading(url: str, body: dict[str, object], out: dict[str, object]) -> threading.Thread:
    """A thread reading one stream (``_read_stream``), returned once the stream has begun."""
    out["open"] = threading.Event()
    thread = threading.Thread(target=_read_stream, args=(url, body, out))
    thread.start()
    opened = out["open"]
    assert isinstance(opened, threading.Event)
    assert opened.wait(10), "the stream never began"
    return thread


def test_stop_ends_open_streams_with_a_shutdown_event_after_the_grace_period(serve: Serve) -> None:
    server = serve(shutdown_grace_period=0.5, **SLOW)
    results: list[dict[str, object]] = [{} for _ in range(3)]
    threads = [_reading(server.url, {"message": f"long {i}"}, results[i]) for i in range(3)]
    stopping = time.monotonic()
    server.stop()
    for t in threads:
        t.join(10)
    for result in results:
        events = parse_events(result["raw"])  # type: ignore[arg-type]
        assert events[0][0] == "connected"
        assert events[-1][0] == "error"
        assert events[-1][1]["type"] == "shutdown"
        assert "completed" not in [name for name, _ in events]
        ended = result["ended"]
        assert isinstance(ended, float)
        assert ended - stopping >= 0.4  # the grace period was given


def test_a_stream_that_finishes_within_the_grace_period_completes(serve: Serve) -> None:
    # 2.5 s of reply, longer than uvicorn would wait by default: the server's graceful
    # timeout follows the app's grace period.
    server = serve(
        shutdown_grace_period=5,
        sim_ttft_ms=0,
        sim_token_interval_ms=25,
        sim_reply_tokens_min=100,
        sim_reply_tokens_max=100,
        max_reply_tokens=100,
    )
    result: dict[str, object] = {}
    thread = _reading(server.url, {"message": "short"}, result)
    server.stop()
    thread.join(10)
    events = parse_events(result["raw"])  # type: ignore[arg-type]
    assert events[-1][0] == "completed"


def test_new_chats_are_refused_while_draining(serve: Serve) -> None:
    server = serve(shutdown_grace_period=2, **SLOW)
    server.drain()  # what stop() does first
    with httpx.Client(base_url=server.url) as client:
        refused = client.post("/chat", json={"message": "too late"})
        assert client.get("/health").status_code == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "shutting_down"


def test_a_server_started_after_another_stopped_streams_normally(serve: Serve) -> None:
    first = serve(shutdown_grace_period=0.2, **SLOW)
    result: dict[str, object] = {}
    thread = _reading(first.url, {"message": "x"}, result)
    first.stop()
    thread.join(10)
    assert parse_events(result["raw"])[-1][1]["type"] == "shutdown"  # type: ignore[arg-type]

    second = serve(sim_ttft_ms=0, sim_token_interval_ms=30, sim_reply_tokens_min=30, sim_reply_tokens_max=30)
    with httpx.Client(base_url=second.url) as client:
        reply = chat(client, "are you still streaming?")
    assert reply.events[-1].event == "completed"
    assert len(reply.deltas) >= 30


def test_draining_one_server_leaves_another_in_the_same_process_streaming(serve: Serve) -> None:
    """Shutdown is per app: one server's drain never touches another server's streams."""
    first = serve(shutdown_grace_period=0.1, **SLOW)
    second = serve(
        sim_ttft_ms=0, sim_token_interval_ms=20,
        sim_reply_tokens_min=40, sim_reply_tokens_max=40, max_reply_tokens=40,
    )  # fmt: skip
    results: list[dict[str, object]] = [{}, {}]
    threads = [
        _reading(first.url, {"message": "a"}, results[0]),
        _reading(second.url, {"message": "b"}, results[1]),
    ]
    first.drain()
    for t in threads:
        t.join(10)
    assert parse_events(results[0]["raw"])[-1][1]["type"] == "shutdown"  # type: ignore[arg-type]
    second_events = parse_events(results[1]["raw"])  # type: ignore[arg-type]
    assert second_events[-1][0] == "completed"
    assert sum(1 for name, _ in second_events if name == "message") == 40

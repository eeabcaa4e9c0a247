"""The notebooks' helpers, against a real server."""

from __future__ import annotations

import io

import anyio
import pytest
from conftest import Serve

from chatsse.workbook import Conversation, pick, quick_mode, raw_chunks, show_chunks, stream_turn


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_stream_turn_prints_tokens_as_they_arrive_and_returns_the_reply(serve: Serve) -> None:
    server = serve()
    out = io.StringIO()
    turn = await stream_turn(server.url, "hello there", out=out)
    completed = turn.events[-1]
    assert completed[1] == "completed"
    assert turn.text == completed[2]["content"]
    assert out.getvalue() == turn.text + "\n"
    assert turn.ttft is not None
    assert 0 < turn.ttft <= turn.total
    assert len(turn.token_times) == turn.usage["completion_tokens"]
    assert turn.finish_reason == "stop"


@pytest.mark.anyio
async def test_stream_turn_reports_http_errors(serve: Serve) -> None:
    server = serve()
    out = io.StringIO()
    turn = await stream_turn(server.url, "hi", "no-such-conversation", out=out)
    assert turn.status == 404
    assert turn.error is not None
    assert turn.error["type"] == "conversation_not_found"
    assert "HTTP 404" in out.getvalue()


@pytest.mark.anyio
async def test_conversation_keeps_its_id_across_turns(serve: Serve) -> None:
    server = serve()
    chat = Conversation(server.url, show=False)
    first = await chat.say("one")
    second = await chat.say("two")
    assert first.conversation_id == second.conversation_id == chat.conversation_id
    history = await chat.history()
    assert [m["content"] for m in history] == ["one", first.text, "two", second.text]


@pytest.mark.anyio
async def test_raw_chunks_are_the_bytes_on_the_wire(serve: Serve) -> None:
    server = serve(sim_token_interval_ms=5)
    chunks = await raw_chunks(server.url, "raw please", max_tokens=3)
    body = b"".join(chunk for _, chunk in chunks)
    assert body.startswith(b"id: ")
    assert body.count(b"event: message\n") == 3
    assert body.rstrip().endswith(b"}")
    times = [at for at, _ in chunks]
    assert times == sorted(times)
    out = io.StringIO()
    show_chunks(chunks, limit=2, out=out)
    assert f"... {len(chunks) - 2} more chunks" in out.getvalue()


def test_quick_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATSSE_QUICK", raising=False)
    assert not quick_mode()
    assert pick(100, 5) == 100
    monkeypatch.setenv("CHATSSE_QUICK", "1")
    assert quick_mode()
    assert pick(100, 5) == 5
    monkeypatch.setenv("CHATSSE_QUICK", "0")
    assert not quick_mode()


def test_helpers_work_without_a_running_loop(serve: Serve) -> None:
    server = serve()
    turn = anyio.run(lambda: stream_turn(server.url, "from a script", show=False))
    assert turn.finish_reason == "stop"

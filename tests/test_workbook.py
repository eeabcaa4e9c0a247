"""The notebooks' helpers, against a real server."""

from __future__ import annotations

import ast
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Serve
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, RichOutput, capture_output
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import start_new_kernel
from traitlets.config import Config

from chatsse.chaos import client_ports
from chatsse.processes import GunicornServer
from chatsse.workbook import (
    LIVE_UPDATES_PER_SECOND,
    Conversation,
    live_frontend,
    pick,
    quick_mode,
    raw_chunks,
    show_chunks,
    stream_turn,
    worker_turn,
)


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
async def test_keepalive_comments_between_events_are_not_events(serve: Serve) -> None:
    # A slow first token: keepalive comments follow the connected event (which has an id).
    server = serve(sse_keepalive_interval=0.1, sim_ttft_ms=400)
    turn = await stream_turn(server.url, "take your time", show=False)
    assert turn.finish_reason == "stop"
    assert [name for _, name, _ in turn.events][:2] == ["connected", "message"]


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


@pytest.fixture
def display_capture() -> Iterator[CapturedIO]:
    """IPython's display publisher, captured: what a notebook frontend would be sent."""
    config = Config()
    config.HistoryManager.enabled = False
    InteractiveShell.instance(config=config)
    try:
        with capture_output(stdout=False, stderr=False, display=True) as captured:
            yield captured
    finally:
        InteractiveShell.clear_instance()


def _markdown(output: RichOutput) -> str:
    markdown: str = output.data["text/markdown"]
    return markdown


@pytest.mark.anyio
async def test_a_live_reply_is_one_display_redrawn_in_place_and_throttled(
    serve: Serve, display_capture: CapturedIO
) -> None:
    server = serve(
        sim_ttft_ms=20, sim_token_interval_ms=1, sim_reply_tokens_min=300, sim_reply_tokens_max=300
    )
    turn = await stream_turn(server.url, "render me", live=True, max_tokens=300)
    first, *updates = display_capture.outputs
    display_id = first.transient["display_id"]
    assert not first.update
    assert updates
    assert all(u.update and u.transient["display_id"] == display_id for u in updates)
    last = _markdown(updates[-1])
    assert last.startswith(turn.text)  # the whole reply, as Markdown, then the status line
    tokens = len(turn.token_times)
    assert tokens == 300
    assert f"TTFT {turn.ttft * 1000:.0f} ms" in last
    assert f"{len(turn.events)} events" in last
    assert "tokens/s" in last
    assert "done in" in last
    # Redraws: the open stream, the first token, then at most one per 1/20 s, and the end.
    assert len(display_capture.outputs) <= 3 + turn.total * LIVE_UPDATES_PER_SECOND


@pytest.mark.anyio
async def test_a_live_conversation_shows_the_message_above_the_reply_and_errors_in_place(
    serve: Serve, display_capture: CapturedIO
) -> None:
    server = serve()
    chat = Conversation(server.url, live=True)
    turn = await chat.say("first line\nsecond line", max_tokens=5)
    last = _markdown(display_capture.outputs[-1])
    assert last.startswith(f"> first line\n> second line\n\n{turn.text}")
    missing = await stream_turn(server.url, "hi", "no-such-conversation", live=True)
    assert missing.status == 404
    assert "**HTTP 404**" in _markdown(display_capture.outputs[-1])


def test_live_frontend_is_false_outside_a_kernel() -> None:
    assert not live_frontend()


def _run_in_kernel(client: BlockingKernelClient, code: str, *, allow_stdin: bool) -> list[dict[str, Any]]:
    """Execute ``code``; the iopub messages it caused, in order."""
    msg_id = client.execute(code, allow_stdin=allow_stdin)
    messages = []
    while True:
        message = client.get_iopub_msg(timeout=60)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            break
        messages.append(message)
    reply = client.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def test_a_kernel_renders_live_for_a_watching_frontend_and_prints_for_a_headless_runner(serve: Serve) -> None:
    server = serve()
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        code = "from chatsse.workbook import stream_turn\n"
        code += f"turn = await stream_turn({server.url!r}, 'hi', max_tokens=12)\nturn.text"
        headless = _run_in_kernel(client, code, allow_stdin=False)  # as nbclient sends a cell
        kinds = [m["msg_type"] for m in headless]
        assert "display_data" not in kinds
        assert "update_display_data" not in kinds
        printed = [m["content"]["text"] for m in headless if m["msg_type"] == "stream"]
        (result,) = [
            m["content"]["data"]["text/plain"] for m in headless if m["msg_type"] == "execute_result"
        ]
        assert "".join(printed) == f"{ast.literal_eval(result)}\n"  # the reply, written once whole
        assert len(printed) <= 2  # not one output per token
        watched = _run_in_kernel(client, code, allow_stdin=True)  # as JupyterLab sends a cell
        kinds = [m["msg_type"] for m in watched]
        assert "stream" not in kinds
        assert kinds.count("display_data") == 1
        assert "update_display_data" in kinds
        last = [m for m in watched if m["msg_type"] == "update_display_data"][-1]
        assert "TTFT" in last["content"]["data"]["text/markdown"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.mark.anyio
async def test_worker_turn_names_the_worker_that_holds_the_turns_connection(tmp_path: Path) -> None:
    env = {"CHATSSE_SIM_TTFT_MS": "1", "CHATSSE_SIM_TOKEN_INTERVAL_MS": "20", "CHATSSE_LOG_LEVEL": "warning"}
    answered: list[int] = []

    async def turn(url: str) -> None:
        pid, chat = await worker_turn(url, "which worker?", max_tokens=40)
        assert chat.finish_reason == "length"
        answered.append(pid)

    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        workers = server.worker_pids()
        assert server.port is not None
        for _ in range(3):
            answered.clear()
            async with anyio.create_task_group() as streams:
                streams.start_soon(turn, server.url)
                await anyio.sleep(0.3)  # mid-stream (40 tokens 20 ms apart): ask /proc, independently
                holding = [pid for pid, ports in client_ports(workers, server.port).items() if ports]
            assert holding == answered

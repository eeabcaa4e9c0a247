"""A client's view of a stream (chatsse/streamclient.py), on real servers: a connection that
knows its worker, a stream dropped and resumed, a stop from another connection, a stored reply
waited for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from conftest import Serve

from chatsse import Settings, create_app
from chatsse.engine import tokenize
from chatsse.errors import ChatsseError
from chatsse.inprocess import InProcessServer
from chatsse.processes import GunicornServer
from chatsse.streamclient import Arrival, StreamView, WorkerConnection, WorkerNotFound, stored_reply

pytestmark = pytest.mark.anyio

PACED = {"sim_ttft_ms": 10, "sim_token_interval_ms": 10, "sim_jitter": 0, "sim_reply_tokens_min": 60,
         "sim_reply_tokens_max": 60}  # fmt: skip


async def test_a_dropped_stream_resumed_joins_into_the_stored_reply(serve: Serve) -> None:
    server = serve(resume_window=10, **PACED)
    producer = await WorkerConnection.open(server.url)
    first = await producer.chat("Where does a dropped stream go?", drop_after_tokens=5)
    assert first.ending == "dropped"
    assert len(first.tokens) == 5
    assert producer.closed  # leaving a stream unread closes its connection
    with pytest.raises(ChatsseError, match="closed"):
        await producer.chat("again")
    resumer = await WorkerConnection.open(server.url)
    second = await resumer.resume(first)
    await resumer.aclose()
    assert second.events[0].position == 6  # the event after the last one seen
    assert second.ending == "completed"
    stored = await stored_reply(server.url, first.conversation_id)
    assert first.text + second.text == stored["content"]
    assert stored["finish_reason"] == "stop"


async def test_a_reply_nobody_resumes_is_stored_interrupted_and_waited_for(serve: Serve) -> None:
    # A short write timeout makes the watchdog look every 0.1 s (chatsse/deadlines.py), so the
    # window ends long before the reply would.
    server = serve(resume_window=0.2, write_timeout=0.4, **{**PACED, "sim_token_interval_ms": 20})
    leaver = await WorkerConnection.open(server.url)
    gone = await leaver.chat("Is anyone there?", drop_after_tokens=3)
    stored = await stored_reply(server.url, gone.conversation_id)  # stored after the client left
    assert stored["finish_reason"] == "interrupted"
    assert stored["content"].startswith(gone.text)
    assert len(tokenize(stored["content"])) < 60  # cut when the window ended, not generated to its end


async def test_a_stop_from_another_connection_ends_every_reader_alike(serve: Serve) -> None:
    server = serve(resume_window=10, **{**PACED, "sim_token_interval_ms": 30})
    owner = await WorkerConnection.open(server.url)
    owning = asyncio.create_task(owner.chat("Stop me."))
    live = await owner.read_tokens(5)
    assert not live.done
    assert len(live.tokens) == 5
    follower = await WorkerConnection.open(server.url)
    following = asyncio.create_task(follower.resume(live, from_start=True))
    await follower.read_tokens(10)
    stopper = await WorkerConnection.open(server.url)
    answer = (await stopper.post(live.stop_path)).json()
    own, followed = await owning, await following
    for connection in (owner, follower, stopper):
        await connection.aclose()
    assert answer["stopped"] is True
    assert own.finish_reason == followed.finish_reason == "stopped"
    assert own.text == followed.text == answer["content"]
    assert len(own.tokens) < 60


async def test_opening_a_connection_that_avoids_the_only_worker_gives_up(serve: Serve) -> None:
    server = serve()
    only = await WorkerConnection.open(server.url)
    await only.aclose()
    with pytest.raises(WorkerNotFound):
        await WorkerConnection.open(server.url, avoid={only.pid}, attempts=3)


async def test_a_request_that_would_go_on_a_new_connection_is_refused() -> None:
    with InProcessServer(create_app(Settings(log_level="warning")), timeout_keep_alive=1) as server:
        connection = await WorkerConnection.open(server.url)
        await asyncio.sleep(2)  # the server closes the idle connection; httpx would open another
        with pytest.raises(ChatsseError, match="new connection"):
            await connection.chat("hello")
        await connection.aclose()


def test_a_connection_names_the_worker_that_streams_and_another_worker_resumes(tmp_path: Path) -> None:
    """Under gunicorn: the one worker with an open stream is the one the connection named; a
    connection that avoids it reaches another worker, which resumes the stream."""
    env = {"CHATSSE_SIM_TTFT_MS": "10", "CHATSSE_SIM_TOKEN_INTERVAL_MS": "20", "CHATSSE_SIM_JITTER": "0",
           "CHATSSE_SIM_REPLY_TOKENS_MIN": "60", "CHATSSE_SIM_REPLY_TOKENS_MAX": "60",
           "CHATSSE_LOG_LEVEL": "warning"}  # fmt: skip

    async def check(url: str) -> None:
        producer = await WorkerConnection.open(url)
        streaming = asyncio.create_task(producer.chat("Which worker am I on?"))
        await producer.read_tokens(1)
        busy = set()
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(20):  # new connections land on both workers
                this = (await client.get("/health", headers={"Connection": "close"})).json()["this_worker"]
                if this["open_streams"]:
                    busy.add(this["pid"])
        assert busy == {producer.pid}
        await streaming
        await producer.aclose()

        dropper = await WorkerConnection.open(url)
        first = await dropper.chat("Take me elsewhere.", drop_after_tokens=5)
        resumer = await WorkerConnection.open(url, avoid={dropper.pid})
        second = await resumer.resume(first)
        await resumer.aclose()
        assert resumer.pid != dropper.pid
        assert second.worker_pid == resumer.pid
        assert first.worker_pid == dropper.pid
        assert first.text + second.text == (await stored_reply(url, first.conversation_id))["content"]

    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        asyncio.run(check(server.url))


async def test_reading_tokens_of_a_stream_that_ends_first_returns_it_ended(serve: Serve) -> None:
    server = serve()
    connection = await WorkerConnection.open(server.url)
    reading = asyncio.create_task(connection.chat("A short one.", max_tokens=3))
    view = await connection.read_tokens(1000)
    assert view.done
    assert len(view.tokens) == 3
    assert view is await reading
    await connection.aclose()


def _view(times: list[float]) -> StreamView:
    events = [Arrival(t, i, "message", f"m:{i + 1}", {"delta": "x"}) for i, t in enumerate(times)]
    return StreamView(status=200, started=0.0, events=events)


def test_bursts_group_tokens_that_arrive_together() -> None:
    view = _view([0.100, 0.101, 0.102, 0.200, 0.300, 0.3049])
    assert view.bursts() == [(0.100, 3), (0.200, 1), (0.300, 2)]
    assert view.bursts(within=0.2) == [(0.100, 6)]
    assert view.text == "x" * 6
    assert [e.position for e in view.tokens] == [1, 2, 3, 4, 5, 6]

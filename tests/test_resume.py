"""Resuming a POST /chat stream from its replay log (GET <resume_url> with Last-Event-ID),
through real servers: in one process, and across the workers of a real gunicorn on SQLite
and on Redis, with a producer killed by SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Serve
from httpx_sse import ServerSentEvent, connect_sse
from redis_server import RedisServer, redis_server
from support import chat, wait_for

from chatsse import Settings, protocol
from chatsse.processes import GunicornServer

SLOW = {"sim_ttft_ms": 0, "sim_token_interval_ms": 20, "sim_reply_tokens_min": 60, "sim_reply_tokens_max": 60}


def resume(
    client: httpx.Client, url: str, last_event_id: str | None = None, **params: str
) -> list[ServerSentEvent]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(client, "GET", url, headers=headers, params=params) as source:
        assert source.response.status_code == 200, source.response.read()
        return list(source.iter_sse())


def triples(events: list[ServerSentEvent]) -> list[tuple[str, str, str]]:
    return [(e.id, e.event, e.data) for e in events]


def deltas(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["delta"] for e in events if e.event == "message")


def tokens(events: list[ServerSentEvent]) -> int:
    return sum(e.event == "message" for e in events)


def test_a_finished_stream_replays_the_same_events_from_any_point(serve: Serve) -> None:
    server = serve()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = chat(client, "tell me about resuming")
        url = first.data("connected")["resume_url"]
        assert triples(resume(client, url)) == triples(first.events)  # no Last-Event-ID: all of it
        for cut in (0, 1, len(first.events) // 2, len(first.events) - 2):
            again = resume(client, url, first.events[cut].id)
            assert triples(again) == triples(first.events[cut + 1 :])
        assert resume(client, url, first.events[-1].id) == []  # after the end: nothing, and it closes
        by_query = resume(client, url, last_event_id=first.events[3].id)
        assert triples(by_query) == triples(first.events[4:])


def test_a_second_reader_follows_a_reply_that_is_still_streaming(serve: Serve) -> None:
    server = serve(**SLOW)  # 60 tokens, 20 ms apart
    seen: dict[str, Any] = {}
    got_connected = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=server.url, timeout=20) as client:
            body = {"message": "a long reply please"}
            with connect_sse(client, "POST", "/chat", json=body) as source:
                events = []
                for event in source.iter_sse():
                    events.append(event)
                    if event.event == "connected":
                        seen["connected"] = json.loads(event.data)
                        got_connected.set()
                seen["events"] = events

    producer = threading.Thread(target=stream)
    producer.start()
    assert got_connected.wait(10)
    time.sleep(0.3)  # well into the reply
    with httpx.Client(base_url=server.url, timeout=20) as client:
        followed = resume(client, seen["connected"]["resume_url"], f"{seen['connected']['message_id']}:3")
    producer.join(20)
    original = seen["events"]
    assert triples(followed) == triples(original[4:])
    assert followed[-1].event == "completed"


def leave_early(
    client: httpx.Client, count: int = 8, message: str = "I will leave early"
) -> list[ServerSentEvent]:
    """Stream a reply and close the connection after ``count`` events."""
    events = []
    with connect_sse(client, "POST", "/chat", json={"message": message}) as source:
        for event in source.iter_sse():
            events.append(event)
            if len(events) == count:
                break
    return events


def stored_reply(client: httpx.Client, events: list[ServerSentEvent], within: float = 10) -> dict[str, Any]:
    conversation = f"/conversations/{json.loads(events[0].data)['conversation_id']}"
    assert wait_for(lambda: len(client.get(conversation).json()["messages"]) == 2, within)
    reply: dict[str, Any] = client.get(conversation).json()["messages"][1]
    return reply


def test_with_no_resume_window_a_client_that_leaves_stops_the_reply_at_once(serve: Serve) -> None:
    server = serve(**SLOW, resume_window=0)  # 60 tokens, 1.2 s
    with httpx.Client(base_url=server.url, timeout=20) as client:
        began = time.monotonic()
        events = leave_early(client)
        stored = stored_reply(client, events, within=5)
        took = time.monotonic() - began
        time.sleep(0.3)  # the log's last write
        rest = resume(client, json.loads(events[0].data)["resume_url"], events[-1].id)
    assert stored["finish_reason"] == "interrupted"
    assert deltas(events) + deltas(rest) == stored["content"]
    assert tokens(events) + tokens(rest) < 20  # cut where the client left, not generated on
    assert took < 1.0  # stored at the disconnect, before the reply could have finished
    assert rest[-1].event == "error"
    assert json.loads(rest[-1].data)["type"] == "interrupted"


def test_a_reply_whose_client_left_goes_on_for_the_window_then_is_interrupted(serve: Serve) -> None:
    server = serve(**SLOW, resume_window=0.4)  # 60 tokens 20 ms apart: 1.2 s, longer than the window
    with httpx.Client(base_url=server.url, timeout=20) as client:
        events = leave_early(client)
        stored = stored_reply(client, events)
        time.sleep(0.3)
        rest = resume(client, json.loads(events[0].data)["resume_url"], events[-1].id)
    assert stored["finish_reason"] == "interrupted"
    assert deltas(events) + deltas(rest) == stored["content"]
    assert 5 < tokens(rest) < 50  # about 0.4 s more of tokens (20 ms each), not the whole reply
    assert json.loads(rest[-1].data)["type"] == "interrupted"


def test_a_client_that_comes_back_within_the_window_gets_the_whole_reply(serve: Serve) -> None:
    server = serve(**SLOW, resume_window=0.3)
    with httpx.Client(base_url=server.url, timeout=20) as client:
        events = leave_early(client)
        time.sleep(0.1)  # offline for a moment
        # The resumed stream reads the log while the reply goes on, for longer than the
        # window: its reads keep the reply generating.
        rest = resume(client, json.loads(events[0].data)["resume_url"], events[-1].id)
        stored = stored_reply(client, events)
    assert rest[-1].event == "completed", rest[-1].data
    completed = json.loads(rest[-1].data)
    assert stored["finish_reason"] == completed["finish_reason"] == "stop"
    assert deltas(events) + deltas(rest) == stored["content"] == completed["content"]
    assert tokens(events) + tokens(rest) == completed["usage"]["completion_tokens"] >= 60  # all of it


def stream_in_thread(
    url: str, message: str
) -> tuple[threading.Thread, list[ServerSentEvent], threading.Event]:
    """Stream a reply from a thread; the list fills with its events, the event is set at the first."""
    events: list[ServerSentEvent] = []
    started = threading.Event()

    def run() -> None:
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            connect_sse(client, "POST", "/chat", json={"message": message}) as source,
        ):
            for event in source.iter_sse():
                events.append(event)
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, events, started


def stop_url(connected: dict[str, Any]) -> str:
    return connected["resume_url"].removesuffix("/events") + "/stop"


def test_stop_ends_the_reply_for_every_reader_and_stores_it_as_stopped(serve: Serve) -> None:
    server = serve(**SLOW)
    thread, events, started = stream_in_thread(server.url, "stop me")
    assert started.wait(10)
    with httpx.Client(base_url=server.url, timeout=20) as client:
        connected = json.loads(events[0].data)
        follower: list[ServerSentEvent] = []
        reader = threading.Thread(target=lambda: follower.extend(resume(client, connected["resume_url"])))
        reader.start()
        time.sleep(0.4)  # some tokens in
        answer = client.post(stop_url(connected))
        thread.join(10)
        reader.join(10)
        stored = stored_reply(client, events)
        again = client.post(stop_url(connected))  # it has ended: nothing to stop
        unknown = client.post(stop_url(connected).replace(connected["message_id"], "msg_nope"))
    assert answer.status_code == 200
    body = answer.json()
    assert body["stopped"] is True
    assert body["finish_reason"] == stored["finish_reason"] == "stopped"
    assert body["content"] == stored["content"] == deltas(events)
    assert 0 < tokens(events) < 60
    for stream in (events, follower):
        assert stream[-1].event == "completed"
        assert json.loads(stream[-1].data)["finish_reason"] == "stopped"
        assert deltas(stream) == stored["content"]
    assert again.status_code == 200
    assert again.json()["stopped"] is False
    assert again.json()["finish_reason"] == "stopped"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "replay_not_found"


def test_unknown_foreign_and_expired_streams_are_404_and_410(serve: Serve) -> None:
    server = serve(replay_ttl=0.3)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        one = chat(client, "one")
        two = chat(client, "two")
        url = one.data("connected")["resume_url"]
        other_id = two.events[2].id
        for bad, status, error_type in (
            ({"Last-Event-ID": other_id}, 404, "replay_not_found"),
            ({"Last-Event-ID": "not an id"}, 404, "replay_not_found"),
        ):
            response = client.get(url, headers=bad)
            assert (response.status_code, response.json()["error"]["type"]) == (status, error_type)
        foreign = two.data("connected")["resume_url"].replace(two.conversation_id, one.conversation_id)
        assert client.get(foreign).status_code == 404  # a reply of another conversation
        assert client.get(url.replace(one.data("connected")["message_id"], "msg_nope")).status_code == 404
        time.sleep(0.5)  # past CHATSSE_REPLAY_TTL
        expired = client.get(url)
        assert expired.status_code == 410
        assert expired.json()["error"]["type"] == "replay_expired"
        assert client.get("/health").status_code == 200


def test_a_reply_stored_before_its_log_is_written_is_resumed_not_called_expired(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy store can delay a log's first write past the end of a short reply: the resume
    waits for the log (regression: it answered 410 replay_expired)."""
    from chatsse.replay.memory import MemoryReplayLog

    append = MemoryReplayLog.append_many

    async def late(self: MemoryReplayLog, writes: Any) -> Any:
        if any(write.start == 0 for write in writes):
            await asyncio.sleep(1.5)
        return await append(self, writes)

    monkeypatch.setattr(MemoryReplayLog, "append_many", late)
    server = serve(sim_reply_tokens_min=5, sim_reply_tokens_max=5)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = chat(client, "quick")
        assert first.named("completed")  # stored, its log not written yet
        events = resume(client, first.data("connected")["resume_url"])
    assert triples(events) == triples(first.events)


def test_a_streaming_reply_whose_log_is_late_is_resumed_not_called_unknown(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same delay while the reply still streams: the resume waits for the log
    (regression: 404 replay_not_found, seen in a soak run)."""
    from chatsse.replay.memory import MemoryReplayLog

    append = MemoryReplayLog.append_many

    async def late(self: MemoryReplayLog, writes: Any) -> Any:
        if any(write.start == 0 for write in writes):
            await asyncio.sleep(1.5)
        return await append(self, writes)

    monkeypatch.setattr(MemoryReplayLog, "append_many", late)
    server = serve(**SLOW)  # 60 tokens, 20 ms apart: still streaming when the resume comes
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        connect_sse(client, "POST", "/chat", json={"message": "slow"}) as source,
    ):
        events = source.iter_sse()
        connected = next(events)
        resumed = resume(client, connected.json()["resume_url"])
        rest = [connected, *events]
    assert triples(resumed) == triples(rest)


# --- across the workers of a real gunicorn ---

ENV = {
    "CHATSSE_SIM_TTFT_MS": "0",
    "CHATSSE_SIM_TOKEN_INTERVAL_MS": "5",
    "CHATSSE_SIM_JITTER": "0",
    "CHATSSE_SIM_REPLY_TOKENS_MIN": "40",
    "CHATSSE_SIM_REPLY_TOKENS_MAX": "40",
    "CHATSSE_LOG_LEVEL": "warning",
}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    redis: RedisServer = request.getfixturevalue("redis")
    return redis.url


def _fresh(url: str) -> httpx.Client:
    """A client whose every request opens a new connection, so any worker may answer it."""
    return httpx.Client(base_url=url, timeout=20, limits=httpx.Limits(max_keepalive_connections=0))


def _drop_and_resume(url: str, reply: int, cut: int) -> str | None:
    """One reply read up to event ``cut``, dropped, and resumed on a fresh connection: what is
    wrong with it, or None."""
    with _fresh(url) as client:
        events = []
        with connect_sse(client, "POST", "/chat", json={"message": f"reply {reply}"}) as source:
            for event in source.iter_sse():
                events.append(event)
                if len(events) == cut + 1:
                    break
        connected = json.loads(events[0].data)
        conversation = f"/conversations/{connected['conversation_id']}"
        if not wait_for(lambda: len(client.get(conversation).json()["messages"]) == 2, 10):
            return f"reply {reply}: never stored"
        rest: list[ServerSentEvent] = []
        deadline = time.monotonic() + 10
        while not rest or rest[-1].event not in ("completed", "error"):  # the log's last write may lag
            rest = resume(client, connected["resume_url"], events[-1].id)
            if time.monotonic() > deadline:
                break
        stored = client.get(conversation).json()["messages"][1]
        if deltas(events) + deltas(rest) != stored["content"]:
            return f"reply {reply}, cut at {cut}: the parts differ from the stored reply"
        ending = json.loads(rest[-1].data) if rest else {}
        if stored["finish_reason"] == "interrupted" and ending.get("type") != "interrupted":
            return f"reply {reply}: ended with {ending}"
    return None


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_resumes_on_any_worker_at_random_points_give_the_stored_reply(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(7)
    cuts = [rng.randrange(1, 40) for _ in range(40)]
    with GunicornServer(workers=4, store=_store(kind, tmp_path, request), env=ENV) as server:
        # Eight clients at a time, each reply on fresh connections: any worker may produce it,
        # any other resume it.
        with ThreadPoolExecutor(8) as pool:
            found = pool.map(lambda args: _drop_and_resume(server.url, *args), enumerate(cuts))
            problems = [problem for problem in found if problem is not None]
        with _fresh(server.url) as client:
            pids = {client.get("/health").json()["this_worker"]["pid"] for _ in range(40)}
        assert len(pids) >= 2  # fresh connections reached several workers
        failures = [line for line in server.logs().splitlines() if "replay_" in line]
    assert problems == [], failures


# How far the log of a 50 ms-a-token reply may lag what its client saw: it is written every flush
# interval (0.5 s: 10 tokens), and a write the machine's load delayed may lag twice that.
LAG = 2 * round(Settings(_env_file=None).replay_flush_interval * 1000 / 50)  # type: ignore[call-arg]


def test_a_resume_after_its_producer_is_killed_returns_what_was_logged_then_stream_lost(
    tmp_path: Path,
) -> None:
    env = {**ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "50", "CHATSSE_SIM_REPLY_TOKENS_MIN": "400",
           "CHATSSE_SIM_REPLY_TOKENS_MAX": "400"}  # fmt: skip
    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        seen: list[ServerSentEvent] = []
        started = threading.Event()

        def stream() -> None:
            try:
                with (
                    _fresh(server.url) as client,
                    connect_sse(client, "POST", "/chat", json={"message": "x"}) as s,
                ):
                    for event in s.iter_sse():
                        seen.append(event)
                        started.set()
            except httpx.HTTPError:
                pass  # its worker is killed under it

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(10)
        with _fresh(server.url) as client:
            producer = None
            deadline = time.monotonic() + 10
            while producer is None and time.monotonic() < deadline:  # which worker holds the stream?
                worker = client.get("/health").json()["this_worker"]
                if worker["open_streams"] == 1:
                    producer = worker["pid"]
            assert producer is not None
            assert wait_for(lambda: sum(e.event == "message" for e in seen) > 3 * LAG, 20)
            os.kill(producer, signal.SIGKILL)
            reader.join(10)
            connected = json.loads(seen[0].data)
            began = time.monotonic()
            rest = []
            for _ in range(20):  # until the surviving worker answers (gunicorn restarts the other)
                try:
                    rest = resume(client, connected["resume_url"], seen[0].id)
                    break
                except (httpx.HTTPError, AssertionError):
                    time.sleep(0.2)
            took = time.monotonic() - began
    assert rest, "the resume never answered"
    assert rest[-1].event == "error"
    assert json.loads(rest[-1].data)["type"] == "stream_lost"
    messages = [e for e in rest if e.event == "message"]
    assert len(messages) >= len([e for e in seen if e.event == "message"]) - LAG  # what was logged
    assert took < 15  # a clear end, no hang


def test_without_replay_logs_nothing_is_written_and_resuming_is_404(serve: Serve) -> None:
    server = serve(replay_log=False)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = chat(client, "not kept")
        assert first.events[-1].event == "completed"
        response = client.get(first.data("connected")["resume_url"])
    assert response.status_code == 404
    assert "CHATSSE_REPLAY_LOG" in response.json()["error"]["message"]


STOPS = 4


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_stop_sent_to_another_server_ends_the_reply_for_every_reader(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two gunicorns (two workers each) on one store: every reply streams from one and is
    stopped through the other, so the stop always crosses processes."""
    store = _store(kind, tmp_path, request)
    env = {**ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "20", "CHATSSE_SIM_REPLY_TOKENS_MIN": "200",
           "CHATSSE_SIM_REPLY_TOKENS_MAX": "200"}  # fmt: skip
    latencies = []
    with (
        GunicornServer(workers=2, store=store, env=env) as producing,
        GunicornServer(workers=2, store=store, env=env) as stopping,
        _fresh(stopping.url) as client,
    ):
        for reply in range(STOPS):
            thread, events, started = stream_in_thread(producing.url, f"stop {reply}")
            assert started.wait(10)
            connected = json.loads(events[0].data)
            follower: list[ServerSentEvent] = []
            reader = threading.Thread(
                target=lambda c=connected, f=follower: f.extend(resume(client, c["resume_url"]))
            )
            reader.start()
            time.sleep(0.3)
            sent = time.monotonic()
            answer = client.post(stop_url(connected))
            thread.join(10)
            reader.join(10)
            assert not thread.is_alive()
            assert not reader.is_alive()
            latencies.append(time.monotonic() - sent)
            assert answer.status_code == 200, answer.text
            assert answer.json()["stopped"] is True
            stored = stored_reply(client, events)
            assert stored["finish_reason"] == "stopped"
            for stream in (events, follower):
                assert stream[-1].event == "completed"
                assert json.loads(stream[-1].data)["finish_reason"] == "stopped"
                assert deltas(stream) == stored["content"]
    slowest = max(latencies) * 1000
    print(f"{kind}: stop answered and both readers ended within {slowest:.0f} ms (max of {STOPS})")


def test_a_responses_resume_after_its_producer_is_killed_fails_after_the_clients_last_event(
    tmp_path: Path,
) -> None:
    """The producer's log lags its client by up to a flush interval; when the producer dies, the
    resumed stream's ``response.failed`` must still follow the client's last sequence number
    (found by the chaos run: it repeated an earlier one)."""
    env = {**ENV, "CHATSSE_SIM_TOKEN_INTERVAL_MS": "50", "CHATSSE_SIM_REPLY_TOKENS_MIN": "400",
           "CHATSSE_SIM_REPLY_TOKENS_MAX": "400"}  # fmt: skip
    body = {"model": "simulated", "input": "a long one", "stream": True}
    with GunicornServer(workers=2, store=f"sqlite:///{tmp_path / 'c.db'}", env=env) as server:
        seen: list[dict[str, Any]] = []

        def stream() -> None:
            try:
                with (
                    _fresh(server.url) as client,
                    connect_sse(client, "POST", "/v1/responses", json=body) as s,
                ):
                    seen.extend(json.loads(event.data) for event in s.iter_sse())
            except httpx.HTTPError:
                pass  # its worker is killed under it

        reader = threading.Thread(target=stream)
        reader.start()
        assert wait_for(lambda: len(seen) > 5, 10)
        with _fresh(server.url) as client:
            producer = None
            deadline = time.monotonic() + 10
            while producer is None and time.monotonic() < deadline:
                worker = client.get("/health").json()["this_worker"]
                if worker["open_streams"] == 1:
                    producer = worker["pid"]
            assert producer is not None
            time.sleep(1.2)  # between two flushes of the log (every 0.5 s)
            os.kill(producer, signal.SIGKILL)
            reader.join(10)
            last = seen[-1]["sequence_number"]
            params = {"stream": "true", "starting_after": str(last)}
            rest: list[ServerSentEvent] = []
            for _ in range(20):  # until the surviving worker answers
                try:
                    url = f"/v1/responses/{seen[0]['response']['id']}"
                    with connect_sse(client, "GET", url, params=params) as source:
                        rest = list(source.iter_sse())
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
    assert rest, "the resume never answered"
    numbers = [json.loads(event.data)["sequence_number"] for event in rest]
    assert numbers == list(range(last + 1, last + 1 + len(numbers)))
    failed = json.loads(rest[-1].data)
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"]["code"] == "stream_lost"


@pytest.mark.parametrize("outage", [1.0, None], ids=["short", "long"])
def test_a_store_that_fails_under_a_resumed_stream_holds_it_up_then_ends_it_with_storage_error(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, outage: float | None
) -> None:
    """Found by the chaos run (Redis restarted under traffic): a read of the log that failed
    mid-stream escaped the response, and the resumed stream's connection closed with no last
    event. A short outage is now ridden out; a long one ends with ``storage_error``."""
    from chatsse.errors import StorageUnavailable
    from chatsse.replay.memory import MemoryReplayLog

    server = serve(**SLOW)  # 60 tokens, 20 ms apart
    real = MemoryReplayLog.read
    failing: dict[str, float] = {}

    async def read(self: MemoryReplayLog, reply_id: str, after: int = -1, *, limit: int = 1000) -> Any:
        began = failing.get("since")
        if began is not None and (outage is None or time.monotonic() - began < outage):
            raise StorageUnavailable("the store is down (test)")
        return await real(self, reply_id, after, limit=limit)

    monkeypatch.setattr(MemoryReplayLog, "read", read)
    thread, events, started = stream_in_thread(server.url, "resume me through an outage")
    assert started.wait(10)
    connected = json.loads(events[0].data)
    followed: list[ServerSentEvent] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        headers = {"Last-Event-ID": events[0].id}
        with connect_sse(client, "GET", connected["resume_url"], headers=headers) as source:
            for event in source.iter_sse():
                followed.append(event)
                if len(followed) == 3:
                    failing["since"] = time.monotonic()
    thread.join(10)
    last = followed[-1]
    if outage is not None:
        assert last.event == "completed"
        assert deltas(events[:1] + followed) == json.loads(last.data)["content"]
    else:
        assert last.event == "error"
        assert json.loads(last.data)["type"] == "storage_error"
        ids = [protocol.parse_event_id(e.id)[1] for e in followed]
        assert ids == list(range(1, len(ids) + 1))  # the error follows the last event sent

"""POST /chat through a real uvicorn server on a free port, parsed with httpx-sse."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import Serve
from support import FailingEngine, RecordingEngine, chat, metric_value, wait_for

from chatsse.engine import TimingModel, count_prompt_tokens


def test_event_order_ids_and_retry(serve: Serve) -> None:
    server = serve(sse_retry_ms=1234)
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "What is an event stream?")
    assert result.status == 200
    names = [e.event for e in result.events]
    assert names[0] == "connected"
    assert names[-1] == "completed"
    assert set(names[1:-1]) == {"message"}
    assert len(names) > 3
    assert result.events[0].retry == 1234
    stream_id = result.data("connected")["message_id"]
    assert [e.id for e in result.events] == [f"{stream_id}:{i}" for i in range(len(names))]


def test_response_headers(client: httpx.Client) -> None:
    result = chat(client, "headers please")
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.headers["x-request-id"]


def test_deltas_equal_completed_and_stored_reply(client: httpx.Client) -> None:
    result = chat(client, 'Quotes " and \\ backslashes, "emoji" 🚀 and\nnew lines\r\nhere')
    completed = result.data("completed")
    text = "".join(result.deltas)
    assert text == completed["content"]
    assert completed["finish_reason"] == "stop"
    assert completed["usage"]["completion_tokens"] == len(result.deltas)
    assert completed["usage"]["total_tokens"] == (
        completed["usage"]["prompt_tokens"] + completed["usage"]["completion_tokens"]
    )
    stored = client.get(f"/conversations/{result.conversation_id}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["content"] == text
    assert stored["messages"][1]["id"] == completed["message_id"]
    assert stored["messages"][1]["finish_reason"] == "stop"
    assert stored["messages"][0]["id"] == result.data("connected")["user_message_id"]


def test_tokens_arrive_one_by_one_not_buffered(serve: Serve) -> None:
    # 20 tokens 40 ms apart: an unbuffered stream spreads them over ~0.76 s.
    server = serve(sim_ttft_ms=0, sim_token_interval_ms=40, sim_reply_tokens_min=20, sim_reply_tokens_max=20)
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "stream slowly", max_tokens=20)
    message_arrivals = [
        t for e, t in zip(result.events, result.arrivals, strict=True) if e.event == "message"
    ]
    assert len(message_arrivals) == 20
    assert message_arrivals[-1] - message_arrivals[0] >= 0.3


def test_five_turns_keep_full_history(serve: Serve) -> None:
    engine = RecordingEngine(TimingModel(0, 0, 0, 0))
    server = serve(engine=engine, max_history_length=100)
    conversation_id = None
    replies = []
    with httpx.Client(base_url=server.url) as client:
        for turn in range(5):
            result = chat(client, f"turn {turn}: tell me about topic{turn}", conversation_id)
            assert result.status == 200
            conversation_id = conversation_id or result.conversation_id
            assert result.conversation_id == conversation_id
            replies.append("".join(result.deltas))
            assert result.data("completed")["usage"]["prompt_tokens"] == count_prompt_tokens(
                engine.prompts[-1]
            )
        stored = client.get(f"/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] * 5
    assert [m["content"] for m in stored[1::2]] == replies
    for turn, prompt in enumerate(engine.prompts):
        assert [m.content for m in prompt] == [m["content"] for m in stored[: 2 * turn + 1]]
    assert "topic3" in replies[4]  # the simulated reply refers back to the previous turn


def test_prompt_is_trimmed_to_max_history(serve: Serve) -> None:
    engine = RecordingEngine(TimingModel(0, 0, 0, 0))
    server = serve(engine=engine, max_history_length=3)
    with httpx.Client(base_url=server.url) as client:
        first = chat(client, "one")
        for text in ("two", "three", "four"):
            chat(client, text, first.conversation_id)
        stored = client.get(f"/conversations/{first.conversation_id}").json()["messages"]
    assert len(stored) == 8  # the full history is kept
    last_prompt = engine.prompts[-1]
    assert [m.content for m in last_prompt] == [m["content"] for m in stored[4:7]]
    assert last_prompt[-1].content == "four"


def test_max_tokens_cuts_reply_with_length_reason(client: httpx.Client) -> None:
    result = chat(client, "a long answer please", max_tokens=5)
    completed = result.data("completed")
    assert len(result.deltas) == 5
    assert completed["finish_reason"] == "length"
    assert completed["usage"]["completion_tokens"] == 5


def test_unknown_conversation_is_404(client: httpx.Client) -> None:
    response = client.post("/chat", json={"message": "hi", "conversation_id": "does-not-exist"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "conversation_not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b'{"conversation_id": null}', "message"),
        (b'{"message": ""}', "message"),
        (b'{"message": 42}', "message"),
        (b'{"message": "hi", "conversation_id": "bad id!"}', "conversation_id"),
        (b'{"message": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"message": "hi", "unexpected": 1}', "unexpected"),
    ],
)
def test_invalid_request_is_422_with_json(client: httpx.Client, body: bytes, field: str) -> None:
    response = client.post("/chat", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert any(field in map(str, d["loc"]) for d in error["details"])


def test_message_over_size_limit_is_413(serve: Serve) -> None:
    server = serve(max_message_size=100)
    with httpx.Client(base_url=server.url) as client:
        assert chat(client, "é" * 50).status == 200  # 100 bytes: at the limit
        response = client.post("/chat", json={"message": "é" * 51})
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "message_too_large"


def test_oversized_body_is_refused_before_it_is_read(serve: Serve) -> None:
    server = serve(max_message_size=100)
    with httpx.Client(base_url=server.url) as client:
        declared = client.post("/chat", content=b"x" * 10_000, headers={"content-type": "application/json"})
        assert declared.status_code == 413

        def chunks() -> object:
            for _ in range(100):
                yield b"x" * 1000

        chunked = client.post("/chat", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert chunked.json()["error"]["type"] == "request_too_large"


class _OpenStream:
    """A stream held open after its first event (the chunk iterator must stay referenced:
    dropping it closes the connection)."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)
        self.response = self.client.send(self.client.build_request("POST", "/chat", json=body), stream=True)
        assert self.response.status_code == 200
        self.chunks = self.response.iter_bytes()
        next(self.chunks)

    def close(self) -> None:
        self.response.close()
        self.client.close()


SLOW = {
    "sim_ttft_ms": 0,
    "sim_token_interval_ms": 50,
    "sim_reply_tokens_min": 200,
    "sim_reply_tokens_max": 200,
}


def test_over_connection_limit_is_503_with_retry_after(serve: Serve) -> None:
    server = serve(max_streams_per_worker=1, sse_retry_ms=2000, resume_window=0, **SLOW)
    held = _OpenStream(server.url, {"message": "hold the slot"})
    try:
        response = httpx.post(f"{server.url}/chat", json={"message": "one too many"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["type"] == "server_busy"
    finally:
        held.close()
    assert wait_for(lambda: httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 0, 2)
    with httpx.Client(base_url=server.url) as client:
        assert chat(client, "now there is room", max_tokens=2).status == 200


def test_concurrent_turn_on_same_conversation_is_409(serve: Serve) -> None:
    server = serve(resume_window=0, **SLOW)  # the held stream's turn ends when it is closed
    with httpx.Client(base_url=server.url) as client:
        first = chat(client, "start", max_tokens=2)
    conversation_id = first.conversation_id
    held = _OpenStream(server.url, {"message": "long turn", "conversation_id": conversation_id})
    try:
        response = httpx.post(
            f"{server.url}/chat", json={"message": "interleave?", "conversation_id": conversation_id}
        )
        assert response.status_code == 409
        assert response.json()["error"]["type"] == "conversation_busy"
        deleted = httpx.delete(f"{server.url}/conversations/{conversation_id}")
        assert deleted.status_code == 409
    finally:
        held.close()
    assert wait_for(lambda: httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 0, 2)
    stored = httpx.get(f"{server.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["start", "long turn"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]


def test_disconnect_cancels_generation_and_stores_partial_reply(serve: Serve) -> None:
    server = serve(resume_window=0, **SLOW)  # no window: a client that leaves stops the reply
    client = httpx.Client(base_url=server.url, timeout=10)
    request = client.build_request("POST", "/chat", json={"message": "I will hang up"})
    response = client.send(request, stream=True)
    received = b""
    for chunk in response.iter_bytes():
        received += chunk
        if received.count(b"event: message") >= 3:
            break
    response.close()
    client.close()
    assert wait_for(lambda: httpx.get(f"{server.url}/health").json()["this_worker"]["open_streams"] == 0, 1.0)
    assert server.app.lifecycle.open_streams == 0  # type: ignore[attr-defined]  # nothing left behind

    events = [block for block in received.decode().split("\n\n") if block]
    connected = json.loads(events[0].split("data: ", 1)[1])
    seen = "".join(json.loads(b.split("data: ", 1)[1])["delta"] for b in events[1:] if "event: message" in b)
    stored = httpx.get(f"{server.url}/conversations/{connected['conversation_id']}").json()["messages"]
    reply = stored[-1]
    assert reply["role"] == "assistant"
    assert reply["finish_reason"] == "interrupted"
    assert reply["content"].startswith(seen)
    assert len(reply["content"]) < 200 * 3  # cancelled long before the 200-token reply ended
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "chatsse_streams_total", outcome="client_disconnected") == 1


def test_engine_failure_mid_stream_ends_with_error_event(serve: Serve) -> None:
    server = serve(engine=FailingEngine(good_tokens=3))
    with httpx.Client(base_url=server.url) as client:
        result = chat(client, "this will break")
        assert [e.event for e in result.events] == ["connected", "message", "message", "message", "error"]
        error = result.data("error")
        assert error["type"] == "engine_error"
        assert "backend went away" in error["message"]
        stored = client.get(f"/conversations/{result.conversation_id}").json()["messages"]
    assert stored[-1]["finish_reason"] == "error"
    assert stored[-1]["content"] == "".join(result.deltas)


def test_request_timeout_ends_with_timeout_event(serve: Serve) -> None:
    server = serve(request_timeout=0.3, **SLOW)
    with httpx.Client(base_url=server.url) as client:
        started = time.monotonic()
        result = chat(client, "too slow")
        elapsed = time.monotonic() - started
        assert result.events[-1].event == "error"
        assert result.data("error")["type"] == "timeout"
        assert not result.named("completed")
        assert elapsed < 5  # ended by the deadline, not by the 10 s reply
        stored = client.get(f"/conversations/{result.conversation_id}").json()["messages"]
    assert stored[-1]["finish_reason"] == "timeout"
    assert stored[-1]["content"] == "".join(result.deltas)


def test_keepalive_comments_while_idle(serve: Serve) -> None:
    server = serve(sse_keepalive_interval=0.05, sim_ttft_ms=400, sim_token_interval_ms=0)
    with (
        httpx.Client(base_url=server.url) as client,
        client.stream("POST", "/chat", json={"message": "wait"}) as r,
    ):
        body = b"".join(r.iter_bytes())
    head = body.split(b"event: message", 1)[0]
    assert b"\n: keepalive\n\n" in head


def test_no_keepalive_comments_while_events_flow(serve: Serve) -> None:
    server = serve(
        sse_keepalive_interval=0.5, sim_ttft_ms=0, sim_token_interval_ms=10,
        sim_reply_tokens_min=150, sim_reply_tokens_max=150, max_reply_tokens=150,
    )  # fmt: skip
    with (
        httpx.Client(base_url=server.url) as client,
        client.stream("POST", "/chat", json={"message": "keep talking"}) as r,
    ):
        body = b"".join(r.iter_bytes())
    assert body.count(b"event: message") == 150  # 1.5 s of events, 10 ms apart...
    assert b": keepalive" not in body  # ...so no comment was needed


def test_conversation_expires_after_ttl(serve: Serve) -> None:
    server = serve(conversation_ttl=0.3)
    with httpx.Client(base_url=server.url) as client:
        first = chat(client, "remember me")
        assert client.get(f"/conversations/{first.conversation_id}").status_code == 200
        time.sleep(0.5)
        assert client.get(f"/conversations/{first.conversation_id}").status_code == 404
        assert chat(client, "still there?", first.conversation_id).status == 404


def test_conversation_cap_evicts_least_recently_active(serve: Serve) -> None:
    server = serve(max_conversations=2)
    with httpx.Client(base_url=server.url) as client:
        a = chat(client, "a").conversation_id
        b = chat(client, "b").conversation_id
        chat(client, "a again", a)  # a is now more recent than b
        c = chat(client, "c").conversation_id
        assert client.get(f"/conversations/{b}").status_code == 404
        assert client.get(f"/conversations/{a}").status_code == 200
        assert client.get(f"/conversations/{c}").status_code == 200
        assert client.get("/conversations").json()["total"] == 2


def test_full_conversation_is_refused_with_409(serve: Serve) -> None:
    server = serve(max_conversation_messages=4)
    with httpx.Client(base_url=server.url) as client:
        first = chat(client, "one")
        chat(client, "two", first.conversation_id)
        response = client.post("/chat", json={"message": "three", "conversation_id": first.conversation_id})
        assert response.status_code == 409
        assert response.json()["error"]["type"] == "conversation_full"
        assert client.get(f"/conversations/{first.conversation_id}").json()["message_count"] == 4


def test_parallel_streams_are_independent(serve: Serve) -> None:
    server = serve(sim_token_interval_ms=2)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        with httpx.Client(base_url=server.url) as client:
            results[i] = chat(client, f"parallel question {i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    ids = set()
    for r in results.values():
        assert hasattr(r, "data")
        completed = r.data("completed")  # type: ignore[attr-defined]
        assert "".join(r.deltas) == completed["content"]  # type: ignore[attr-defined]
        ids.add(completed["conversation_id"])
    assert len(ids) == 8


def test_raw_wire_format(server: object) -> None:
    """The exact bytes of one event, read from a plain socket."""
    url = server.url  # type: ignore[attr-defined]
    host, port = url.removeprefix("http://").split(":")
    body = b'{"message": "raw", "max_tokens": 1}'
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    text = raw.decode()
    assert "\r\n\r\n" in text
    # chunked transfer: find the first event in the body
    assert "\nevent: connected\nretry: 3000\ndata: {" in text
    assert '\nevent: message\ndata: {"delta":' in text

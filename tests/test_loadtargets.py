"""The load client's protocol readers, against real servers on loopback sockets."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import aiohttp
import httpx
import pytest
from conftest import Serve
from fake_openai import MODEL, PROMPT_TOKENS, FakeOpenAI
from starlette.applications import Starlette
from support import FailingEngine

from chatsse.inprocess import InProcessServer
from chatsse.loadmetrics import RequestRecord
from chatsse.loadtargets import (
    ChatsseTarget,
    Conversation,
    OpenAITarget,
    ResponsesTarget,
    Target,
    TargetError,
    endpoint_url,
)


def new_record() -> RequestRecord:
    now = perf_counter()
    return RequestRecord(request_id=0, user_id=0, turn=0, intended_start=now, sent=now)


async def _send_all(
    target: Target, messages: list[str], conversation: Conversation, time_limit: float
) -> list[RequestRecord]:
    records = []
    async with aiohttp.ClientSession() as http:
        await target.prepare(http)
        for message in messages:
            record = new_record()
            await target.request(http, conversation, message, record, time_limit=time_limit)
            records.append(record)
    return records


def send(
    target: Target,
    *messages: str,
    conversation: Conversation | None = None,
    time_limit: float = 10.0,
) -> list[RequestRecord]:
    """Send the messages as consecutive turns of one conversation."""
    return asyncio.run(_send_all(target, list(messages), conversation or Conversation(), time_limit))


@pytest.fixture
def fake_openai() -> Iterator[tuple[FakeOpenAI, InProcessServer]]:
    fake = FakeOpenAI()
    with InProcessServer(fake.app()) as server:
        yield fake, server


def asgi_stream(*chunks: bytes) -> Any:
    """A raw ASGI app answering every request with these body chunks as an event stream."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "default", "expected"),
    [
        ("http://h:1", "/chat", "http://h:1/chat"),
        ("http://h:1/", "/chat", "http://h:1/chat"),
        ("http://h:1/api/chat", "/chat", "http://h:1/api/chat"),
        ("http://h:1", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
        ("https://h/x/v1/", "/v1/chat/completions", "https://h/x/v1/chat/completions"),
        ("http://h:1/v1/chat/completions", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
        ("http://h:1", "/v1/responses", "http://h:1/v1/responses"),
        ("http://h:1/v1/", "/v1/responses", "http://h:1/v1/responses"),
        ("https://h/x/v1", "/v1/responses", "https://h/x/v1/responses"),
    ],
)
def test_endpoint_url(url: str, default: str, expected: str) -> None:
    assert endpoint_url(url, default) == expected


def test_endpoint_url_rejects_non_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        endpoint_url("127.0.0.1:8000", "/chat")


# --- chatsse ------------------------------------------------------------------------------


def test_chatsse_request_fills_every_field(serve: Serve) -> None:
    server = serve(sim_ttft_ms=20)
    conversation = Conversation()
    (record,) = send(
        ChatsseTarget(server.url, max_tokens=12, collect_text=True), "hello", conversation=conversation
    )
    assert record.ok, record
    assert record.status == 200
    assert record.tokens == 12 == len(record.token_times)
    assert record.events == 14  # connected + 12 messages + completed
    assert record.prompt_tokens is not None
    assert record.prompt_tokens > 0
    assert record.headers_at is not None
    assert record.first_token_at is not None
    assert record.end is not None
    assert record.sent <= record.headers_at <= record.first_token_at <= record.token_times[-1] <= record.end
    assert record.first_token_at == record.token_times[0]
    assert record.first_token_at - record.sent >= 0.02  # the simulated TTFT
    assert record.bytes_received > 14 * 20
    assert conversation.conversation_id is not None
    stored = httpx.get(f"{server.url}/conversations/{conversation.conversation_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == conversation.last_reply == record.text


def test_chatsse_without_collect_text_keeps_no_text(serve: Serve) -> None:
    conversation = Conversation()
    (record,) = send(ChatsseTarget(serve().url), "hello", conversation=conversation)
    assert record.ok
    assert conversation.last_reply is None
    assert record.text is None


def test_a_used_target_pickles_for_a_worker_process_without_its_session(serve: Serve) -> None:
    target = ChatsseTarget(serve().url, drop_fraction=0.5, seed=3)
    send(target, "hello")  # prepare() kept the run's session
    copy = pickle.loads(pickle.dumps(target))
    assert copy.url == target.url
    assert copy.drop_fraction == 0.5
    draws = []
    for index in (0, 1, 0):
        copy.for_process(index)
        draws.append([copy._cut() for _ in range(8)])
    assert draws[0] == draws[2]  # a process's drops follow the seed and its index
    assert draws[0] != draws[1]


def test_chatsse_turns_continue_the_conversation(serve: Serve) -> None:
    server = serve()
    conversation = Conversation()
    records = send(ChatsseTarget(server.url), "one", "two", "three", conversation=conversation)
    assert all(r.ok for r in records)
    stored = httpx.get(f"{server.url}/conversations/{conversation.conversation_id}").json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["one", "two", "three"]
    assert len(stored) == 6
    assert httpx.get(f"{server.url}/conversations").json()["total"] == 1


def test_chatsse_server_busy_is_http_503_and_cancelled_stream_is_cancelled(serve: Serve) -> None:
    server = serve(max_streams_per_worker=1, sim_ttft_ms=5000)
    target = ChatsseTarget(server.url)

    async def scenario() -> tuple[RequestRecord, RequestRecord]:
        async with aiohttp.ClientSession() as http:
            holder = new_record()
            hold = asyncio.create_task(target.request(http, Conversation(), "hold", holder))
            for _ in range(1000):  # until the holder's stream is open (10 s at most)
                if holder.headers_at is not None:
                    break
                await asyncio.sleep(0.01)
            refused = new_record()
            await target.request(http, Conversation(), "refused", refused, time_limit=10)
            hold.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hold
            return holder, refused

    holder, refused = asyncio.run(scenario())
    assert (refused.status, refused.error, refused.ok) == (503, "http_503", False)
    assert refused.end is not None
    assert refused.tokens == 0
    assert holder.error == "cancelled"
    assert holder.end is not None


def test_chatsse_engine_failure_is_a_stream_error(serve: Serve) -> None:
    (record,) = send(ChatsseTarget(serve(engine=FailingEngine(good_tokens=3)).url), "hi")
    assert record.error == "stream_error:engine_error"
    assert record.status == 200
    assert record.tokens == 3 == len(record.token_times)
    assert record.first_token_at == record.token_times[0]
    assert record.events == 5  # connected, 3 messages, error


def test_connection_refused_is_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (record,) = send(ChatsseTarget(f"http://127.0.0.1:{port}"), "hi")
    assert record.error == "connection"
    assert record.status is None
    assert record.headers_at is None
    assert record.end is not None


def test_time_limit_is_timeout(serve: Serve) -> None:
    (record,) = send(ChatsseTarget(serve(sim_ttft_ms=5000).url), "hi", time_limit=0.3)
    assert record.error == "timeout"
    assert record.status == 200
    assert record.end is not None
    assert record.end - record.sent >= 0.3


def test_stream_ending_without_completed_is_truncated() -> None:
    app = asgi_stream(
        b'event: connected\ndata: {"conversation_id": "c1"}\n\n', b"event: message\ndata: {}\n\n"
    )
    conversation = Conversation()
    with InProcessServer(app) as server:
        (record,) = send(ChatsseTarget(server.url), "hi", conversation=conversation)
    assert record.error == "truncated"
    assert (record.tokens, record.events) == (1, 2)
    assert conversation.conversation_id == "c1"


def test_malformed_event_data_is_protocol_error() -> None:
    with InProcessServer(asgi_stream(b"event: connected\ndata: not json\n\n")) as server:
        (record,) = send(ChatsseTarget(server.url), "hi")
    assert record.error == "protocol_error"


def test_collect_text_detects_content_mismatch() -> None:
    app = asgi_stream(
        b'event: message\ndata: {"delta": "a"}\n\n',
        b'event: completed\ndata: {"content": "ab", '
        b'"usage": {"completion_tokens": 1, "prompt_tokens": 2}}\n\n',
    )
    with InProcessServer(app) as server:
        (record,) = send(ChatsseTarget(server.url, collect_text=True), "hi")
        (unchecked,) = send(ChatsseTarget(server.url), "hi")
    assert record.error == "content_mismatch"
    assert unchecked.ok
    assert unchecked.prompt_tokens == 2


def test_events_split_across_chunks_and_several_per_chunk() -> None:
    events = b"".join(f'event: message\ndata: {{"delta": "t{i}"}}\n\n'.encode() for i in range(5))
    completed = b'event: completed\ndata: {"content": "t0t1t2t3t4", "usage": {"completion_tokens": 5}}\n\n'
    stream = events + completed
    app = asgi_stream(stream[:7], stream[7:60], stream[60:])
    conversation = Conversation()
    with InProcessServer(app) as server:
        (record,) = send(ChatsseTarget(server.url, collect_text=True), "hi", conversation=conversation)
    assert record.ok, record.error
    assert (record.tokens, record.events, len(record.token_times)) == (5, 6, 5)
    assert record.bytes_received == len(stream)
    assert conversation.last_reply == "t0t1t2t3t4"


def test_on_text_receives_each_delta(serve: Serve) -> None:
    deltas: list[str] = []
    target = ChatsseTarget(serve().url, max_tokens=6)

    async def one() -> RequestRecord:
        async with aiohttp.ClientSession() as http:
            record = new_record()
            await target.request(http, Conversation(), "hi", record, on_text=deltas.append)
            return record

    record = asyncio.run(one())
    assert record.ok
    assert len(deltas) == 6


# --- OpenAI -------------------------------------------------------------------------------


def test_openai_stream_with_usage(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    target = OpenAITarget(server.url, max_tokens=64)
    conversation = Conversation()
    (record,) = send(target, "hi", conversation=conversation)
    assert target.model == MODEL  # discovered from /v1/models
    assert record.ok, record.error
    assert (record.tokens, record.prompt_tokens) == (5, 7)
    assert len(record.token_times) == 5  # the role chunk is not a token
    assert record.events == 9  # role, 5 content, finish, usage, [DONE]
    assert conversation.last_reply == "turn 1 reply w0 w1 w2 w3"
    assert record.text is None  # kept in the record only with collect_text
    (kept,) = send(OpenAITarget(server.url, collect_text=True), "hi")
    assert kept.text == "turn 1 reply w0 w1 w2 w3"
    body = fake.bodies[0]
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["max_tokens"] == 64
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_openai_multi_turn_sends_the_history(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    records = send(OpenAITarget(server.url, model="m"), "first", "second")
    assert all(r.ok for r in records)
    assert fake.bodies[1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "turn 1 reply w0 w1 w2 w3"},
        {"role": "user", "content": "second"},
    ]


def test_openai_in_band_error() -> None:
    fake = FakeOpenAI(error_after=2)
    conversation = Conversation()
    with InProcessServer(fake.app()) as server:
        records = send(OpenAITarget(server.url, model="m"), "a", "b", conversation=conversation)
    assert [r.error for r in records] == ["stream_error:InternalServerError"] * 2
    assert records[0].tokens == 2
    assert conversation.history == []  # failed turns are not part of the history
    assert fake.bodies[1]["messages"] == [{"role": "user", "content": "b"}]


def test_openai_without_done_is_truncated_and_status_is_checked() -> None:
    with InProcessServer(FakeOpenAI(truncate=True).app()) as server:
        (truncated,) = send(OpenAITarget(server.url, model="m"), "a")
    with InProcessServer(FakeOpenAI(status=400).app()) as server:
        (refused,) = send(OpenAITarget(server.url, model="m"), "a")
    assert truncated.error == "truncated"
    assert truncated.tokens == 5
    assert (refused.error, refused.status) == ("http_400", 400)


@pytest.mark.parametrize("target_class", [OpenAITarget, ResponsesTarget])
def test_model_discovery_failure_is_a_target_error(
    target_class: type[OpenAITarget | ResponsesTarget],
) -> None:
    with InProcessServer(Starlette()) as server, pytest.raises(TargetError, match="pass a model"):
        send(target_class(server.url), "a")  # every path is a 404, /v1/models too


# --- Responses API ------------------------------------------------------------------------

REPLY = "turn {} reply w0 w1 w2 w3"  # the fake's reply at turn n of a chain


def responses_sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    """Responses events with their type and sequence numbers from 0, as a server sends them."""
    out = []
    for number, (kind, data) in enumerate(events):
        payload = json.dumps({"type": kind, "sequence_number": number, **data})
        out.append(f"event: {kind}\ndata: {payload}\n\n")
    return "".join(out).encode()


def completed(output_tokens: int) -> tuple[str, dict[str, Any]]:
    usage = {"input_tokens": 3, "output_tokens": output_tokens, "total_tokens": 3 + output_tokens}
    return "response.completed", {"response": {"id": "resp_x", "status": "completed", "usage": usage}}


def test_responses_url_and_models_url() -> None:
    target = ResponsesTarget("http://h:1/v1", model="m")
    assert target.url == "http://h:1/v1/responses"
    assert target.models_url == "http://h:1/v1/models"
    assert OpenAITarget("http://h:1").models_url == "http://h:1/v1/models"


def test_responses_single_turn(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    fake.token_delay = 0.05
    fake.tokens_per_delta = 2  # the usage, not the delta count, is the token count
    target = ResponsesTarget(server.url, model="m", collect_text=True)
    conversation = Conversation()
    (record,) = send(target, "hi", conversation=conversation)
    assert record.ok, record.error
    assert (record.tokens, record.prompt_tokens) == (10, PROMPT_TOKENS)
    assert len(record.token_times) == 5  # one per output_text.delta, none for the 4 opening events
    assert record.events == 13  # 4 opening, 5 deltas, 3 done, completed
    assert record.first_token_at == record.token_times[0]
    assert record.ttft is not None
    assert record.ttft >= 0.05  # the first delta, not response.created
    assert record.headers_at is not None
    assert record.end is not None
    assert record.headers_at < record.first_token_at <= record.token_times[-1] <= record.end
    assert conversation.last_reply == REPLY.format(1)
    assert conversation.response_id in fake.chains
    assert conversation.history == []
    assert fake.bodies == [{"model": "m", "input": "hi", "stream": True, "store": True}]


def test_responses_turns_chain_previous_response_id(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    target = ResponsesTarget(server.url, model="m", collect_text=True)
    conversation = Conversation()
    records, ids, replies = [], [], []
    for message in ("one", "two", "three"):
        records += send(target, message, conversation=conversation)
        ids.append(conversation.response_id)
        replies.append(conversation.last_reply)
    assert all(r.ok for r in records), [r.error for r in records]
    assert len(set(ids)) == 3
    assert [body.get("previous_response_id") for body in fake.bodies] == [None, ids[0], ids[1]]
    assert [body["input"] for body in fake.bodies] == ["one", "two", "three"]
    assert replies == [REPLY.format(n) for n in (1, 2, 3)]  # the server followed the chain
    assert [r.prompt_tokens for r in records] == [PROMPT_TOKENS * n for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("failure", "error"),
    [("response.failed", "stream_error:server_error"), ("error", "stream_error:engine_died")],
)
def test_responses_failed_turn_does_not_advance_the_chain(failure: Any, error: str) -> None:
    fake = FakeOpenAI(error_after=2, failing_requests=frozenset({1}), failure=failure)
    conversation = Conversation()
    with InProcessServer(fake.app()) as server:
        target = ResponsesTarget(server.url, model="m", collect_text=True)
        records = send(target, "a", "b", "c", conversation=conversation)
    assert [r.error for r in records] == [None, error, None]
    assert len(records[1].token_times) == 2
    first = fake.bodies[1]["previous_response_id"]
    assert fake.bodies[2]["previous_response_id"] == first  # the failed response is skipped
    assert conversation.last_reply == REPLY.format(2)


def test_responses_truncated_and_refused() -> None:
    conversation = Conversation()
    with InProcessServer(FakeOpenAI(truncate=True).app()) as server:
        (truncated,) = send(ResponsesTarget(server.url, model="m"), "a", conversation=conversation)
    with InProcessServer(FakeOpenAI(status=400).app()) as server:
        (refused,) = send(ResponsesTarget(server.url, model="m"), "a")
    assert truncated.error == "truncated"
    assert (truncated.tokens, truncated.events, truncated.prompt_tokens) == (5, 9, None)
    assert conversation.response_id is None
    assert (refused.error, refused.status) == ("http_400", 400)


def test_responses_sequence_gap_is_protocol_error() -> None:
    for skipped in (0, 6):
        with InProcessServer(FakeOpenAI(skip_sequence_number=skipped).app()) as server:
            (record,) = send(ResponsesTarget(server.url, model="m"), "a")
        assert record.error == "protocol_error", skipped
    with InProcessServer(FakeOpenAI(skip_sequence_number=13).app()) as server:  # after the last event
        (record,) = send(ResponsesTarget(server.url, model="m"), "a")
    assert record.ok, record.error


def test_responses_unknown_previous_response_id_is_http_404(
    fake_openai: tuple[FakeOpenAI, InProcessServer],
) -> None:
    fake, server = fake_openai
    conversation = Conversation(response_id="resp_unknown")
    (record,) = send(ResponsesTarget(server.url, model="m"), "a", conversation=conversation)
    assert (record.error, record.status) == ("http_404", 404)
    assert fake.bodies[0]["previous_response_id"] == "resp_unknown"


def test_responses_max_tokens_is_max_output_tokens(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    target = ResponsesTarget(server.url, model="m", max_tokens=3, collect_text=True)
    conversation = Conversation()
    records = send(target, "a", "b", conversation=conversation)
    assert [body["max_output_tokens"] for body in fake.bodies] == [3, 3]
    assert all(r.ok for r in records), [r.error for r in records]  # incomplete is not an error
    assert [r.tokens for r in records] == [3, 3]
    assert fake.bodies[1]["previous_response_id"] is not None  # an incomplete response chains too
    assert conversation.last_reply == "turn 2 reply w0 w1"


def test_responses_model_discovery(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    fake, server = fake_openai
    target = ResponsesTarget(server.url + "/v1")
    (record,) = send(target, "hi")
    assert record.ok, record.error
    assert target.model == MODEL
    assert target.describe()["model"] == MODEL
    assert fake.bodies[0]["model"] == MODEL


def test_responses_content_mismatch_and_reasoning_tokens() -> None:
    stream = responses_sse(
        ("response.created", {"response": {"id": "resp_x"}}),
        ("response.reasoning_text.delta", {"delta": "hmm"}),
        ("response.output_text.delta", {"delta": "a"}),
        ("response.output_text.done", {"text": "ab"}),
        completed(2),
    )
    app = asgi_stream(stream[:30], stream[30:])  # an event split across chunks
    checked_conversation = Conversation()
    with InProcessServer(app) as server:
        (checked,) = send(
            ResponsesTarget(server.url, model="m", collect_text=True), "a", conversation=checked_conversation
        )
        conversation = Conversation()
        (unchecked,) = send(ResponsesTarget(server.url, model="m"), "a", conversation=conversation)
    assert checked.error == "content_mismatch"
    assert checked_conversation.response_id is None
    assert unchecked.ok, unchecked.error
    assert len(unchecked.token_times) == 2  # the reasoning delta is a generated token
    assert (unchecked.tokens, unchecked.prompt_tokens, unchecked.events) == (2, 3, 5)
    assert conversation.response_id == "resp_x"
    assert conversation.last_reply is None


def test_responses_on_text_receives_each_delta(fake_openai: tuple[FakeOpenAI, InProcessServer]) -> None:
    _, server = fake_openai
    deltas: list[str] = []
    target = ResponsesTarget(server.url, model="m")

    async def one() -> RequestRecord:
        async with aiohttp.ClientSession() as http:
            record = new_record()
            await target.request(http, Conversation(), "hi", record, on_text=deltas.append)
            return record

    record = asyncio.run(one())
    assert record.ok, record.error
    assert "".join(deltas) == REPLY.format(1)
    assert len(deltas) == 5


def test_all_three_targets_measure_chatsse_by_the_same_measure(serve: Serve) -> None:
    """The same multi-turn load over chatsse's three fronts: every turn completes, and since
    each protocol carries the same history (stored, resent, or chained), every turn's reply
    has the same number of tokens whichever way it was asked.

    Every conversation sends the same messages, so a turn's number fixes its prompt and its
    reply. Which conversations run is not fixed: a user that finishes its three turns first
    starts another while the 12 requests last, cutting a slower user's conversation short."""
    from chatsse.loadgen import LoadConfig, arun_load_test

    server = serve(sim_reply_tokens_min=20, sim_reply_tokens_max=60)
    config = LoadConfig(requests=12, concurrency=4, turns=3, messages=("How do SSE streams behave?",))
    replies: dict[str, set[tuple[int, int, int | None]]] = {}
    conversations: dict[str, int] = {}
    for target in (
        ChatsseTarget(server.url),
        OpenAITarget(f"{server.url}/v1"),  # the model is discovered: chatsse's GET /v1/models
        ResponsesTarget(f"{server.url}/v1"),
    ):
        result = asyncio.run(arun_load_test(target, config))
        summary = result.summary()
        assert summary.completed == 12, (target.protocol, summary.errors_by_type)
        assert all(r.ttft is not None for r in result.records)
        replies[target.protocol] = {(r.turn, r.tokens, r.prompt_tokens) for r in result.records}
        conversations[target.protocol] = len({r.user_id for r in result.records})
    # one reply size and one prompt size per turn, and a history that grows with each turn
    assert sorted(turn for turn, _, _ in replies["chatsse"]) == [0, 1, 2]
    prompts = [prompt for _, _, prompt in sorted(replies["chatsse"])]
    assert prompts == sorted(prompts)
    assert len(set(prompts)) == 3
    assert replies["openai"] == replies["chatsse"]
    assert replies["responses"] == replies["chatsse"]
    stored = httpx.get(f"{server.url}/conversations").json()
    # /chat's and the Responses conversations; chat completions kept none
    assert stored["total"] == conversations["chatsse"] + conversations["responses"]


DROPPING = {
    "sim_ttft_ms": 0,
    "sim_token_interval_ms": 5,
    "sim_reply_tokens_min": 40,
    "sim_reply_tokens_max": 40,
}


def test_dropped_streams_are_resumed_and_each_reply_is_checked_whole(serve: Serve) -> None:
    from chatsse.loadgen import LoadConfig, run_load_test

    server = serve(**DROPPING, resume_window=5)
    target = ChatsseTarget(server.url, max_tokens=30, drop_fraction=1.0, seed=3)
    result = run_load_test(target, LoadConfig(requests=12, concurrency=4, timeout=30))
    summary = result.summary()
    assert summary.errors_by_type == {}
    assert summary.completed == summary.resumed == 12  # every stream was dropped, and resumed
    assert all(len(r.resume_latencies) == 1 for r in result.records)
    assert summary.resume is not None
    assert summary.as_dict()["p99_resume_ms"] is not None
    stored = httpx.get(f"{server.url}/conversations").json()["conversations"]
    assert len(stored) == 12
    for record in result.records:  # the server's own reply: 30 tokens, each seen once
        assert len(record.token_times) == record.tokens == 30


def test_a_resume_that_cannot_finish_the_reply_is_an_error_not_a_success(serve: Serve) -> None:
    from chatsse.loadgen import LoadConfig, run_load_test

    server = serve(**DROPPING, resume_window=0)  # a drop stops the reply: the resume ends interrupted
    target = ChatsseTarget(server.url, max_tokens=30, drop_fraction=1.0, seed=3)
    result = run_load_test(target, LoadConfig(requests=4, concurrency=2, timeout=30))
    errors = result.summary().errors_by_type
    assert set(errors) <= {"stream_error:interrupted", "truncated"}
    assert sum(errors.values()) >= 3  # a cut at the 30th token may still see the whole reply

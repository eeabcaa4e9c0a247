"""POST /v1/responses with server-side state through a real server, read by the official SDK:
the stream's events, chains of previous_response_id, store false, retrieve and delete."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from conftest import SDK, Serve
from httpx_sse import connect_sse
from support import FailingEngine, RecordingEngine

from chatsse.engine import SimulatedEngine, TimingModel
from chatsse.models import Message

MODEL = "simulated"
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def stream_events(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw stream, read by httpx-sse: (event name, data) pairs."""
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        connect_sse(client, "POST", "/v1/responses", json={"model": MODEL, "stream": True, **body}) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        return [(e.event, json.loads(e.data)) for e in source.iter_sse()]


def test_the_stream_has_every_event_in_order_with_sequence_numbers(serve: Serve) -> None:
    events = stream_events(serve().url, {"input": "How do SSE streams behave?"})
    names = [name for name, _ in events]
    assert names[:4] == STREAM_ORDER
    assert names[-4:] == [*CLOSING, "response.completed"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["type"] for _, data in events] == names  # each event's name is its data's type
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    done = dict(events)
    assert done["response.output_text.done"]["text"] == deltas
    final = done["response.completed"]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == deltas
    assert final["id"] == done["response.created"]["response"]["id"]
    assert final["usage"]["output_tokens"] == len(names) - 8
    item_ids = {data.get("item_id") for name, data in events if "item_id" in data}
    assert item_ids == {final["output"][0]["id"]}


def test_three_chained_turns_continue_one_stored_conversation(serve: Serve, sdk: SDK) -> None:
    engine = RecordingEngine(TimingModel(0.001, 0, 0.0005, 0))
    server = serve(engine=engine)
    client = sdk(server.url)
    previous: str | None = None
    history: list[Message] = []
    ids = []
    for turn in range(3):
        text = f"turn {turn}: what about topic{turn}?"
        history.append(Message("", "user", text, 0.0))
        events = list(
            client.responses.create(model=MODEL, input=text, previous_response_id=previous, stream=True)
        )
        final = events[-1]
        assert final.type == "response.completed"
        reply = final.response.output_text
        assert reply == SimulatedEngine(TimingModel(0, 0, 0, 0)).compose(history)  # it saw the history
        assert final.response.previous_response_id == previous
        history.append(Message("", "assistant", reply, 0.0))
        previous = final.response.id
        ids.append(previous)
    assert [m.content for m in engine.prompts[-1]] == [m.content for m in history[:-1]]
    conversations = httpx.get(f"{server.url}/conversations").json()
    assert conversations["total"] == 1  # one conversation, three turns
    stored = httpx.get(f"{server.url}/conversations/{conversations['conversations'][0]['id']}").json()
    assert [m["content"] for m in stored["messages"]] == [m.content for m in history]
    for index, response_id in enumerate(ids):
        got = client.responses.retrieve(response_id)
        assert got.status == "completed"
        assert got.output_text == history[2 * index + 1].content
        assert got.previous_response_id == (ids[index - 1] if index else None)


def test_a_response_without_streaming(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve().url)
    first = client.responses.create(model=MODEL, input="a first question")
    assert first.status == "completed"
    assert first.output_text
    assert first.usage is not None
    assert first.usage.output_tokens > 0
    second = client.responses.create(model=MODEL, input="and then?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_store_false_keeps_nothing_but_reads_the_previous_history(serve: Serve, sdk: SDK) -> None:
    engine = RecordingEngine()
    server = serve(engine=engine)
    client = sdk(server.url)
    first = client.responses.create(model=MODEL, input="remember this")
    side = client.responses.create(
        model=MODEL, input="a side question", previous_response_id=first.id, store=False
    )
    assert [m.content for m in engine.prompts[-1]] == ["remember this", first.output_text, "a side question"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(side.id)
    (conversation,) = httpx.get(f"{server.url}/conversations").json()["conversations"]
    assert conversation["message_count"] == 2  # the side turn left nothing
    # The chain goes on from the stored response, as if the side question was never asked.
    third = client.responses.create(model=MODEL, input="go on", previous_response_id=first.id)
    assert third.status == "completed"
    lone = client.responses.create(model=MODEL, input="no history", store=False)
    assert lone.output_text
    assert httpx.get(f"{server.url}/conversations").json()["total"] == 1


def test_instructions_reach_the_engine_for_their_turn_only(serve: Serve, sdk: SDK) -> None:
    engine = RecordingEngine()
    server = serve(engine=engine)
    client = sdk(server.url)
    first = client.responses.create(model=MODEL, input="hello", instructions="answer in French")
    assert [(m.role, m.content) for m in engine.prompts[-1]] == [
        ("system", "answer in French"),
        ("user", "hello"),
    ]
    client.responses.create(
        model=MODEL,
        input=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "again"}],
        previous_response_id=first.id,
    )
    assert [(m.role, m.content) for m in engine.prompts[-1]] == [
        ("system", "be brief"),
        ("user", "hello"),
        ("assistant", first.output_text),
        ("user", "again"),
    ]
    messages = httpx.get(f"{server.url}/conversations").json()["conversations"][0]
    assert messages["message_count"] == 4  # no system message stored


def test_unknown_or_malformed_previous_response_ids_are_not_found(serve: Serve, sdk: SDK) -> None:
    server = serve()
    client = sdk(server.url)
    real = client.responses.create(model=MODEL, input="hi")
    conversation_id = real.id.removeprefix("resp_").split(".")[0]
    for missing in ("resp_nothing.msg_nothing", "not-a-response-id", f"resp_{conversation_id}.msg_other"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.responses.create(model=MODEL, input="x", previous_response_id=missing)
        assert missing in raised.value.message
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_continuing_from_an_older_response_is_a_conflict(serve: Serve, sdk: SDK) -> None:
    client = sdk(serve().url)
    first = client.responses.create(model=MODEL, input="one")
    second = client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    with pytest.raises(openai.ConflictError) as raised:
        client.responses.create(model=MODEL, input="fork", previous_response_id=first.id)
    assert second.id in raised.value.message


def test_max_output_tokens_makes_the_response_incomplete(serve: Serve) -> None:
    events = stream_events(serve().url, {"input": "tell me a lot", "max_output_tokens": 5})
    names = [name for name, _ in events]
    assert names.count("response.output_text.delta") == 5
    assert names[-1] == "response.incomplete"
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_engine_failure_is_response_failed_and_the_partial_reply_is_stored(serve: Serve, sdk: SDK) -> None:
    server = serve(engine=FailingEngine(good_tokens=2))
    body = {"input": "fail please", "model": FailingEngine.name}
    events = stream_events(server.url, body)
    name, data = events[-1]
    assert name == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"]["code"] == "engine_error"
    assert "backend went away" in data["response"]["error"]["message"]
    assert [n for n, _ in events].count("response.output_text.delta") == 2
    response_id = events[0][1]["response"]["id"]
    got = sdk(server.url).responses.retrieve(response_id)
    assert got.status == "failed"
    assert got.output_text == " t0 t1"
    with pytest.raises(openai.InternalServerError):
        sdk(server.url).responses.create(model=FailingEngine.name, input="not streamed")


def test_delete_removes_the_whole_chain(serve: Serve, sdk: SDK) -> None:
    server = serve()
    client = sdk(server.url)
    first = client.responses.create(model=MODEL, input="one")
    second = client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    client.responses.delete(first.id)
    for gone in (first.id, second.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    assert httpx.get(f"{server.url}/conversations").json()["total"] == 0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"input": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "input"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "one user message"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"model": "elsewhere"}, "elsewhere"),
    ],
)
def test_unsupported_requests_are_refused_clearly(serve: Serve, change: dict[str, Any], named: str) -> None:
    server = serve()
    response = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi", **change})
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert named in error["message"] or named == error["param"]
    assert httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "hi"}).status_code == 200


# --- resuming and cancelling a streamed response (chatsse/resume.py, its replay log) ---

SLOW = {"sim_ttft_ms": 0, "sim_token_interval_ms": 20, "sim_reply_tokens_min": 60, "sim_reply_tokens_max": 60}


def test_a_streamed_response_resumes_after_any_sequence_number(serve: Serve, sdk: SDK) -> None:
    server = serve()
    events = stream_events(server.url, {"input": "resume me"})
    response_id = dict(events)["response.created"]["response"]["id"]
    client = sdk(server.url)
    for after in (-1, 0, 2, 3, 4, len(events) // 2, len(events) - 3, len(events) - 2):
        resumed = [
            e.to_dict() for e in client.responses.retrieve(response_id, stream=True, starting_after=after)
        ]
        assert resumed == [data for _, data in events[after + 1 :]], after  # the same events, from there
    everything = list(client.responses.retrieve(response_id, stream=True))
    assert [e.sequence_number for e in everything] == list(range(len(events)))
    assert everything[-1].type == "response.completed"


def test_a_response_whose_client_left_is_followed_to_its_end_by_a_resumed_stream(
    serve: Serve, sdk: SDK
) -> None:
    server = serve(**SLOW, resume_window=2)
    seen = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        connect_sse(
            http, "POST", "/v1/responses", json={"model": MODEL, "stream": True, "input": "x"}
        ) as source,
    ):
        for event in source.iter_sse():
            seen.append(json.loads(event.data))
            if len(seen) == 10:
                break  # the client goes away; the response goes on for the window
    client = sdk(server.url)
    response_id = seen[0]["response"]["id"]
    in_progress = client.responses.retrieve(response_id)
    assert in_progress.status == "in_progress"
    rest = list(
        client.responses.retrieve(response_id, stream=True, starting_after=seen[-1]["sequence_number"])
    )
    assert [e.sequence_number for e in rest] == list(range(10, 10 + len(rest)))
    assert rest[-1].type == "response.completed"
    text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
    text += "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text == client.responses.retrieve(response_id).output_text


def test_cancel_stops_a_streaming_response_which_is_then_cancelled(serve: Serve, sdk: SDK) -> None:
    server = serve(**SLOW)
    client = sdk(server.url)
    stream = client.responses.create(model=MODEL, input="cancel me", stream=True)
    events = []
    for event in stream:
        events.append(event)
        if len(events) == 8:
            cancelled = client.responses.cancel(events[0].response.id)
    assert cancelled.status == "cancelled"
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "cancelled"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert last.response.output_text == cancelled.output_text == text
    assert 0 < len([e for e in events if e.type == "response.output_text.delta"]) < 60
    again = client.responses.cancel(events[0].response.id)  # ended: returned as it is
    assert again.status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope.msg_nope", stream=True).close()

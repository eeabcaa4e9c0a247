"""The events of POST /chat (chatsse.chat.ChatEvents): every encoded event is parsed back with an
independent decoder (httpx-sse's, which follows the WHATWG event stream rules), and its data
has exactly the keys chatsse.protocol declares."""

from __future__ import annotations

import codecs
import json

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import given
from hypothesis import strategies as st
from wire import TRICKY_DELTAS, UTF8_TEXT, assert_one_data_line_per_event, parse

from chatsse import protocol
from chatsse.chat import ChatEvents
from chatsse.conversations import Turn
from chatsse.models import Message
from chatsse.turns import TurnResult

STREAM_ID = "msg_0123abcd"


def encoder(reply_id: str = STREAM_ID) -> ChatEvents:
    user = Message("msg_user", "user", "hi", 12.5)
    turn = Turn("conv1", user, reply_id, [user], new=True, token="turn_1")
    return ChatEvents(turn, model="simulated", retry_ms=2500)


def generic_delta(enc: ChatEvents, text: str) -> bytes:
    return enc._event(protocol.MESSAGE, {"delta": text})


RESULT = TurnResult("Hello, world", "stop", prompt_tokens=4, completion_tokens=3, ttft_ms=1.5, total_ms=9.0)


def test_stream_ids_count_from_zero_across_all_events() -> None:
    enc = encoder()
    assert enc.seq == 0
    raw = b"".join(
        [enc.opening(), enc.delta("Hello"), enc.delta(","), enc.delta(" world"), enc.completed(RESULT)]
    )
    events = parse(raw)
    assert [e.id for e in events] == [protocol.event_id(STREAM_ID, i) for i in range(5)]
    assert [protocol.parse_event_id(e.id) for e in events] == [(STREAM_ID, i) for i in range(5)]
    assert enc.seq == 5
    assert [e.event for e in events] == ["connected", "message", "message", "message", "completed"]
    assert [e.retry for e in events] == [2500, None, None, None, None]
    assert json.loads(events[0].data) == {
        "conversation_id": "conv1", "user_message_id": "msg_user", "message_id": STREAM_ID,
        "model": "simulated", "created": 12.5,
        "resume_url": f"/conversations/conv1/messages/{STREAM_ID}/events",
    }  # fmt: skip
    assert [json.loads(e.data) for e in events[1:4]] == [
        {"delta": "Hello"},
        {"delta": ","},
        {"delta": " world"},
    ]
    assert json.loads(events[4].data) == {
        "conversation_id": "conv1", "message_id": STREAM_ID,
        "content": "Hello, world", "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
        "timings": {"ttft_ms": 1.5, "total_ms": 9.0},
    }  # fmt: skip
    assert_one_data_line_per_event(raw, 5)


def test_every_event_has_exactly_the_protocols_keys() -> None:
    enc = encoder()
    raw = enc.opening() + enc.delta("x") + enc.completed(RESULT) + enc.error("engine_error", "boom")
    for event in parse(raw):
        data = json.loads(event.data)
        assert set(data) == set(protocol.EVENT_DATA[event.event].__annotations__), event.event
    completed = json.loads(parse(encoder().completed(RESULT))[0].data)
    assert set(completed["usage"]) == set(protocol.Usage.__annotations__)
    assert set(completed["timings"]) == set(protocol.Timings.__annotations__)


def test_parse_event_id_refuses_what_is_not_one() -> None:
    for bad in ("", "msg_x", "msg_x:", ":3", "msg_x:-1", "msg_x:1.5"):
        with pytest.raises(ValueError, match="event id"):
            protocol.parse_event_id(bad)
    assert protocol.parse_event_id("a:b:7") == ("a:b", 7)


def test_separate_streams_number_independently() -> None:
    a, b = encoder("a"), encoder("b")
    a.delta("x")
    a.delta("y")
    (event,) = parse(b.delta("z"))
    assert event.id == "b:0"
    (event,) = parse(a.delta("w"))
    assert event.id == "a:2"


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_delta_round_trips_exactly(text: str) -> None:
    raw = encoder().delta(text)
    (event,) = parse(raw)
    assert event.event == "message"
    assert event.id == f"{STREAM_ID}:0"
    assert event.retry is None
    assert json.loads(event.data) == {"delta": text}
    assert_one_data_line_per_event(raw, 1)


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_delta_fast_path_matches_generic_event(text: str) -> None:
    fast = parse(encoder().delta(text))
    generic = parse(generic_delta(encoder(), text))
    assert [(e.event, e.id, e.retry, json.loads(e.data)) for e in fast] == [
        (e.event, e.id, e.retry, json.loads(e.data)) for e in generic
    ]


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_event_data_is_strict_json(text: str) -> None:
    (event,) = parse(encoder().delta(text))

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(event.data, parse_constant=no_constants) == {"delta": text}


@given(UTF8_TEXT)
def test_any_delta_round_trips(text: str) -> None:
    raw = encoder().delta(text)
    (event,) = parse(raw)
    assert event.event == "message"
    assert event.id == f"{STREAM_ID}:0"
    assert json.loads(event.data) == {"delta": text}
    assert_one_data_line_per_event(raw, 1)


@given(st.lists(UTF8_TEXT, max_size=20), st.integers(min_value=0, max_value=10**7))
def test_any_stream_of_deltas_round_trips(deltas: list[str], retry: int) -> None:
    user = Message("msg_user", "user", "hi", 12.5)
    enc = ChatEvents(Turn("conv1", user, STREAM_ID, [user], new=True, token="t"), model="m", retry_ms=retry)
    raw = enc.opening()
    raw += b"".join(enc.delta(text) for text in deltas)
    raw += enc.completed(TurnResult("".join(deltas), "stop", 1, len(deltas), None, 1.0))
    events = parse(raw)
    assert len(events) == len(deltas) + 2
    assert [e.id for e in events] == [f"{STREAM_ID}:{i}" for i in range(len(deltas) + 2)]
    assert events[0].retry == retry
    assert [json.loads(e.data)["delta"] for e in events[1:-1]] == deltas
    assert json.loads(events[-1].data)["content"] == "".join(deltas)
    assert_one_data_line_per_event(raw, len(deltas) + 2)


@given(UTF8_TEXT, st.integers(min_value=1, max_value=64))
def test_delta_stream_parses_the_same_in_any_chunking(text: str, size: int) -> None:
    enc = encoder()
    raw = enc.delta(text) + enc.delta(text[::-1])
    whole = parse(raw)
    # Feed byte chunks through an incremental UTF-8 decoder, as a network client would.
    utf8 = codecs.getincrementaldecoder("utf-8")()
    lines, decoder = SSELineDecoder(), SSEDecoder()
    events = []
    for i in range(0, len(raw), size):
        chunk = utf8.decode(raw[i : i + size])
        for line in lines.decode(chunk) if chunk else []:
            event = decoder.decode(line)
            if event is not None:
                events.append(event)
    assert utf8.decode(b"", final=True) == ""
    assert [(e.id, e.data) for e in events] == [(e.id, e.data) for e in whole]
    assert [json.loads(e.data)["delta"] for e in events] == [text, text[::-1]]


def test_message_event_writes_what_delta_writes() -> None:
    from chatsse.chat import message_event

    enc = encoder()
    enc.opening()
    assert enc.delta(' a "quoted"\n') == message_event(STREAM_ID, 1, ' a "quoted"\n')

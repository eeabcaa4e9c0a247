"""Tests for chatsse.sse's wire format: every encoded event is parsed back with an
independent decoder (httpx-sse's, which follows the WHATWG event stream rules)."""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

import pytest
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import given
from hypothesis import strategies as st

from chatsse.sse import StreamEncoder, dumps, encode_event

STREAM_ID = "msg_0123abcd"
# What a stream can carry: any text UTF-8 can encode (no lone surrogates; pydantic refuses
# them in request JSON, so no reply can hold one).
UTF8_TEXT = st.text(st.characters(codec="utf-8"))

TRICKY_DELTAS = [
    "",
    " plain",
    'say "hi"',
    "back\\slash \\n not a newline",
    "carriage\rreturn",
    "line\nfeed",
    "crlf\r\nend",
    "\r\n\r\n",
    "data: injected\n\nevent: evil",
    "line\u2028separator and paragraph\u2029separator",
    "next line\u0085char",
    "emoji \U0001f600\U0001f469\u200d\U0001f4bb",
    "nul\x00byte",
    "controls \x01\x08\x0b\x0c\x1b\x1f\x7f",
    "caf\u00e9 \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627",
    "\ufeffbom first",
    ": looks like a comment",
    "   leading spaces",
]


def parse(raw: bytes) -> list[ServerSentEvent]:
    """Decode a complete stream: split lines on CR, LF or CRLF only, then dispatch events."""
    text = raw.decode("utf-8")  # strict: the encoder must produce valid UTF-8
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events = []
    for line in [*lines.decode(text), *lines.flush()]:
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def event_blocks(raw: bytes) -> list[list[bytes]]:
    """The raw lines of each event; every event must end with exactly one blank line."""
    assert b"\r" not in raw
    assert raw.endswith(b"\n\n")
    return [block.split(b"\n") for block in raw[:-2].split(b"\n\n")]


def assert_one_data_line_per_event(raw: bytes, events: int) -> None:
    blocks = event_blocks(raw)
    assert len(blocks) == events
    for block in blocks:
        assert all(block), "no blank line inside an event"
        assert sum(line.startswith(b"data:") for line in block) == 1
        assert all(re.match(rb"(id|event|retry|data): ", line) for line in block)


# --- dumps -------------------------------------------------------------------


def test_dumps_is_compact_single_line_json() -> None:
    value = {"a": 1, "b": [1, 2], "text": "x\ny\r\u00e9"}
    text = dumps(value)
    assert json.loads(text) == value
    assert "\n" not in text
    assert "\r" not in text
    assert text.startswith('{"a":1,"b":[1,2],')
    assert "\u00e9" in text  # not escaped to ASCII


# --- encode_event ----------------------------------------------------------------


def test_encode_event_fields_round_trip() -> None:
    data: dict[str, Any] = {"conversation_id": "c1", "created": 12.5, "nested": {"k": [1, None]}}
    raw = encode_event("connected", dumps(data), id=f"{STREAM_ID}:0", retry=3000)
    (event,) = parse(raw)
    assert event.event == "connected"
    assert event.id == f"{STREAM_ID}:0"
    assert event.retry == 3000
    assert json.loads(event.data) == data
    assert_one_data_line_per_event(raw, 1)


def test_encode_event_without_id_or_retry_has_no_such_fields() -> None:
    raw = encode_event("ping", dumps({}))
    assert not re.search(rb"^(id|retry):", raw, re.MULTILINE)
    (event,) = parse(raw)
    assert event.event == "ping"
    assert event.id == ""
    assert event.retry is None
    assert json.loads(event.data) == {}


def test_encode_event_with_empty_data() -> None:
    (event,) = parse(encode_event("done", ""))
    assert event.event == "done"
    assert event.data == ""


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_encode_event_payload_round_trips(text: str) -> None:
    raw = encode_event("message", dumps({"delta": text}), id="s:5")
    (event,) = parse(raw)
    assert json.loads(event.data) == {"delta": text}
    assert_one_data_line_per_event(raw, 1)


# --- StreamEncoder ---------------------------------------------------------------


def test_stream_ids_count_from_zero_across_all_events() -> None:
    enc = StreamEncoder(STREAM_ID)
    assert enc.stream_id == STREAM_ID
    assert enc.seq == 0
    raw = b"".join(
        [
            enc.event("connected", {"message_id": STREAM_ID}, retry=2500),
            enc.delta("Hello"),
            enc.delta(","),
            enc.delta(" world"),
            enc.event("completed", {"content": "Hello, world", "finish_reason": "stop"}),
        ]
    )
    events = parse(raw)
    assert [e.id for e in events] == [f"{STREAM_ID}:{i}" for i in range(5)]
    assert enc.seq == 5
    assert [e.event for e in events] == ["connected", "message", "message", "message", "completed"]
    assert [e.retry for e in events] == [2500, None, None, None, None]
    assert json.loads(events[0].data) == {"message_id": STREAM_ID}
    assert [json.loads(e.data) for e in events[1:4]] == [
        {"delta": "Hello"},
        {"delta": ","},
        {"delta": " world"},
    ]
    assert json.loads(events[4].data) == {"content": "Hello, world", "finish_reason": "stop"}
    assert_one_data_line_per_event(raw, 5)


def test_separate_streams_number_independently() -> None:
    a, b = StreamEncoder("a"), StreamEncoder("b")
    a.delta("x")
    a.delta("y")
    (event,) = parse(b.delta("z"))
    assert event.id == "b:0"
    (event,) = parse(a.delta("w"))
    assert event.id == "a:2"


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_delta_round_trips_exactly(text: str) -> None:
    raw = StreamEncoder(STREAM_ID).delta(text)
    (event,) = parse(raw)
    assert event.event == "message"
    assert event.id == f"{STREAM_ID}:0"
    assert event.retry is None
    assert json.loads(event.data) == {"delta": text}
    assert_one_data_line_per_event(raw, 1)


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_delta_fast_path_matches_generic_event(text: str) -> None:
    fast = parse(StreamEncoder(STREAM_ID).delta(text))
    generic = parse(StreamEncoder(STREAM_ID).event("message", {"delta": text}))
    assert [(e.event, e.id, e.retry, json.loads(e.data)) for e in fast] == [
        (e.event, e.id, e.retry, json.loads(e.data)) for e in generic
    ]


@pytest.mark.parametrize("text", TRICKY_DELTAS)
def test_event_data_is_strict_json(text: str) -> None:
    (event,) = parse(StreamEncoder(STREAM_ID).delta(text))

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(event.data, parse_constant=no_constants) == {"delta": text}


@given(UTF8_TEXT)
def test_any_delta_round_trips(text: str) -> None:
    raw = StreamEncoder(STREAM_ID).delta(text)
    (event,) = parse(raw)
    assert event.event == "message"
    assert event.id == f"{STREAM_ID}:0"
    assert json.loads(event.data) == {"delta": text}
    assert_one_data_line_per_event(raw, 1)


@given(st.lists(UTF8_TEXT, max_size=20), st.integers(min_value=0, max_value=10**7))
def test_any_stream_of_deltas_round_trips(deltas: list[str], retry: int) -> None:
    enc = StreamEncoder(STREAM_ID)
    raw = enc.event("connected", {"n": len(deltas)}, retry=retry)
    raw += b"".join(enc.delta(text) for text in deltas)
    raw += enc.event("completed", {"content": "".join(deltas)})
    events = parse(raw)
    assert len(events) == len(deltas) + 2
    assert [e.id for e in events] == [f"{STREAM_ID}:{i}" for i in range(len(deltas) + 2)]
    assert events[0].retry == retry
    assert [json.loads(e.data)["delta"] for e in events[1:-1]] == deltas
    assert json.loads(events[-1].data) == {"content": "".join(deltas)}
    assert_one_data_line_per_event(raw, len(deltas) + 2)


@given(UTF8_TEXT, st.integers(min_value=1, max_value=64))
def test_delta_stream_parses_the_same_in_any_chunking(text: str, size: int) -> None:
    enc = StreamEncoder(STREAM_ID)
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

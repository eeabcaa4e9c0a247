"""Tests for chatsse.sse's wire format: every encoded event is parsed back with an
independent decoder (httpx-sse's, which follows the WHATWG event stream rules)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import strategies as st

from chatsse.sse import dumps, encode_event

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

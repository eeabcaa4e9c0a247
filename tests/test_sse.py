"""Tests for chatsse.sse's wire format: every encoded event is parsed back with an
independent decoder (httpx-sse's, which follows the WHATWG event stream rules)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from wire import TRICKY_DELTAS, assert_one_data_line_per_event, parse

from chatsse.sse import dumps, encode_event

STREAM_ID = "msg_0123abcd"
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

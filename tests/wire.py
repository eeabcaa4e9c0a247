"""Reading SSE bytes back in tests: an independent decoder (httpx-sse's, which follows the
WHATWG event-stream rules), the strict shape chatsse's events must have, and tricky text."""

from __future__ import annotations

import json
import re
from typing import Any

from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import strategies as st

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


def parse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event in a whole chatsse stream."""
    return [(event.event, json.loads(event.data)) for event in parse(raw)]

"""Tests for the incremental SSE parser against the WHATWG event stream rules."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsse.eventstream import EventStreamParser, ServerSentEvent

Event = ServerSentEvent


def parse(*chunks: bytes | str) -> list[ServerSentEvent]:
    """Feed the chunks (str chunks are UTF-8 encoded), then close."""
    parser = EventStreamParser()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk.encode() if isinstance(chunk, str) else chunk)
    assert parser.close() == []
    return events


def parse_bytewise(stream: bytes) -> list[ServerSentEvent]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))))


# --- line ends -------------------------------------------------------------


def test_lf_line_ends() -> None:
    assert parse("data: a\ndata: b\n\n") == [Event(data="a\nb")]


def test_crlf_line_ends() -> None:
    assert parse("data: a\r\ndata: b\r\n\r\n") == [Event(data="a\nb")]


def test_cr_line_ends() -> None:
    assert parse("data: a\rdata: b\r\r") == [Event(data="a\nb")]


def test_mixed_line_ends() -> None:
    assert parse("data: a\rdata: b\r\ndata: c\n\r\n") == [Event(data="a\nb\nc")]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # If CR and LF counted as two line ends, the blank line would dispatch "a"
    # early and "b" would be a separate event.
    assert parse("data: a\r", "\ndata: b\r", "\n\r", "\n") == [Event(data="a\nb")]


def test_cr_at_chunk_end_then_lf_alone_in_next_chunk() -> None:
    assert parse("data: a\r", "\n", "\r\n") == [Event(data="a")]


def test_cr_at_chunk_end_then_empty_chunks_then_lf() -> None:
    assert parse("data: a\r", b"", "\n", b"", "\r\n") == [Event(data="a")]


def test_cr_at_chunk_end_completes_the_line_immediately() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\r") == [Event(data="a")]


def test_cr_cr_lf_is_two_line_ends() -> None:
    assert parse("data: a\r", "\r\n") == [Event(data="a")]


def test_lf_cr_is_two_line_ends() -> None:
    assert parse("data: a\n\rdata: b\n\n") == [Event(data="a"), Event(data="b")]


def test_other_unicode_line_breaks_are_not_line_ends() -> None:
    weird = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    assert parse(f"data: {weird}\n\n") == [Event(data=weird)]


# --- chunking and decoding -------------------------------------------------


def test_split_at_every_byte_offset() -> None:
    stream = b"event: e\r\nid: 7\r\ndata: h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\r\n\r\n"
    expected = [Event(event="e", data="héllo € 😀", id="7")]
    assert parse(stream) == expected
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert parse(stream[:i], stream[i:j], stream[j:]) == expected, (i, j)


def test_chunk_split_inside_multibyte_utf8_character() -> None:
    emoji = "😀".encode()
    assert len(emoji) == 4
    assert parse(b"data: " + emoji[:1], emoji[1:3], emoji[3:] + b"\n\n") == [Event(data="😀")]


def test_one_byte_chunks() -> None:
    stream = "data: ünïcödé\r\nid: ид\r\n\r\n".encode()
    assert parse_bytewise(stream) == [Event(data="ünïcödé", id="ид")]


def test_invalid_utf8_is_replaced() -> None:
    assert parse(b"data: a\xffb\n\n") == [Event(data="a\ufffdb")]


def test_truncated_utf8_sequence_before_line_end_is_replaced() -> None:
    assert parse(b"data: a\xe2\x82", b"\n\n") == [Event(data="a\ufffd")]


def test_leading_bom_is_skipped() -> None:
    assert parse(b"\xef\xbb\xbfdata: a\n\n") == [Event(data="a")]


def test_leading_bom_split_across_chunks_is_skipped() -> None:
    assert parse(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [Event(data="a")]


def test_only_one_leading_bom_is_skipped() -> None:
    # The second BOM becomes part of the field name "\ufeffdata", which is unknown.
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == [Event(data="b")]


def test_bom_after_stream_start_is_not_skipped() -> None:
    assert parse("data: a\n\n\ufeffdata: b\n\n") == [Event(data="a")]
    assert parse("data: \ufeffb\n\n") == [Event(data="\ufeffb")]


def test_empty_chunks_are_harmless() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == [Event(data="a")]


# --- lines and fields ------------------------------------------------------


def test_comment_lines_are_ignored_and_counted() -> None:
    parser = EventStreamParser()
    assert parser.feed(b": keepalive\n\n:\ndata: a\n: inside\n\n") == [Event(data="a")]
    assert parser.comments == 3


def test_comment_split_across_chunks_is_counted_once() -> None:
    parser = EventStreamParser()
    for chunk in (b": ping", b" ping", b"\r", b"\n:x\r\n"):
        assert parser.feed(chunk) == []
    assert parser.comments == 2


def test_field_without_colon_has_empty_value() -> None:
    # "data" alone appends "" + LF; "event" alone sets the type to "" (default).
    assert parse("data\n\n") == [Event(data="")]
    assert parse("event: x\nevent\ndata: a\n\n") == [Event(data="a")]
    assert parse("id: 1\nid\ndata: a\n\n") == [Event(data="a", id="")]


def test_single_space_after_colon_is_stripped() -> None:
    assert parse("data: a\n\n") == [Event(data="a")]


def test_only_one_space_after_colon_is_stripped() -> None:
    assert parse("data:  a \n\n") == [Event(data=" a ")]


def test_no_space_after_colon() -> None:
    assert parse("data:a\n\n") == [Event(data="a")]


def test_tab_after_colon_is_kept() -> None:
    assert parse("data:\ta\n\n") == [Event(data="\ta")]


def test_value_is_split_at_first_colon_only() -> None:
    assert parse("data: a: b:c\n\n") == [Event(data="a: b:c")]


def test_field_names_are_case_sensitive() -> None:
    assert parse("Data: a\nDATA: b\nEvent: x\ndata: c\n\n") == [Event(data="c")]


def test_space_before_colon_is_part_of_field_name() -> None:
    assert parse("data : a\ndata: b\n\n") == [Event(data="b")]


def test_data_lines_are_joined_with_lf() -> None:
    assert parse("data: a\ndata:\ndata: b\ndata\n\n") == [Event(data="a\n\nb\n")]


def test_only_the_final_lf_is_removed_at_dispatch() -> None:
    assert parse("data: a\ndata:\n\n") == [Event(data="a\n")]
    assert parse("data\ndata\n\n") == [Event(data="\n")]


def test_event_type() -> None:
    assert parse("event: add\ndata: 1\n\ndata: 2\n\n") == [
        Event(event="add", data="1"),
        Event(event="message", data="2"),
    ]


def test_last_event_type_line_wins() -> None:
    assert parse("event: a\nevent: b\ndata: 1\n\n") == [Event(event="b", data="1")]


def test_event_with_empty_data_buffer_is_not_dispatched() -> None:
    assert parse("event: x\n\n") == []
    assert parse("id: 1\nretry: 5\n\n") == []


def test_event_type_is_reset_by_undispatched_event() -> None:
    assert parse("event: x\n\ndata: a\n\n") == [Event(data="a")]


def test_blank_lines_between_events_dispatch_nothing() -> None:
    assert parse("\n\n\ndata: a\n\n\n\ndata: b\n\n") == [Event(data="a"), Event(data="b")]


def test_id_is_none_until_an_id_field_is_seen() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\n") == [Event(data="a", id=None)]
    assert parser.last_event_id == ""


def test_id_persists_across_events() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n") == [
        Event(data="a", id="1"),
        Event(data="b", id="1"),
        Event(data="c", id="2"),
    ]
    assert parser.last_event_id == "2"


def test_id_in_undispatched_block_still_applies() -> None:
    assert parse("id: 5\n\ndata: a\n\n") == [Event(data="a", id="5")]


def test_id_after_data_in_same_block_applies_to_that_event() -> None:
    assert parse("data: a\nid: 9\n\n") == [Event(data="a", id="9")]


def test_empty_id_resets_last_event_id() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"id: 1\ndata: a\n\nid:\ndata: b\n\n") == [
        Event(data="a", id="1"),
        Event(data="b", id=""),
    ]
    assert parser.last_event_id == ""


def test_id_containing_nul_is_ignored() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"id: 1\n\nid: 2\x003\ndata: a\n\n") == [Event(data="a", id="1")]
    assert parser.last_event_id == "1"


def test_id_may_contain_other_control_characters() -> None:
    assert parse("id: a\x01\tb\ndata: x\n\n") == [Event(data="x", id="a\x01\tb")]


def test_retry_with_ascii_digits_is_applied() -> None:
    parser = EventStreamParser()
    assert parser.retry is None
    assert parser.feed(b"retry: 3000\ndata: a\n\ndata: b\n\n") == [
        Event(data="a", retry=3000),
        Event(data="b", retry=None),
    ]
    assert parser.retry == 3000


@pytest.mark.parametrize("value", ["", " 10", "10 ", "10s", "-1", "+1", "1.5", "1e3", "١٢", "²"])
def test_retry_without_only_ascii_digits_is_ignored(value: str) -> None:
    parser = EventStreamParser()
    assert parser.feed(f"retry: 7\n\nretry: {value}\ndata: a\n\n".encode()) == [Event(data="a")]
    assert parser.retry == 7


def test_retry_in_undispatched_block_still_applies() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"retry: 0\n\n") == []
    assert parser.retry == 0


def test_retry_with_many_leading_zeros() -> None:
    parser = EventStreamParser()
    assert parser.feed(f"retry: {'0' * 10_000}42\ndata: a\n\n".encode()) == [Event(data="a", retry=42)]


def test_unknown_fields_are_ignored() -> None:
    assert parse("foo: bar\ndata: a\nx\n\ufeffdata: b\n\n") == [Event(data="a")]
    assert parse("foo: bar\n\n") == []


# --- end of stream -----------------------------------------------------------


def test_incomplete_event_at_end_of_stream_is_discarded() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [Event(data="a")]
    assert parser.pending
    assert parser.close() == []
    assert not parser.pending


def test_unterminated_last_line_is_discarded() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\nid: 5") == [Event(data="a")]
    assert parser.pending
    assert parser.close() == []
    assert parser.last_event_id == ""


def test_nothing_pending_after_complete_events_and_comments() -> None:
    parser = EventStreamParser()
    parser.feed(b"data: a\n\n: bye\n")
    assert not parser.pending


def test_pending_utf8_bytes_and_event_type() -> None:
    parser = EventStreamParser()
    parser.feed(b"\xe2")
    assert parser.pending
    parser.close()
    parser.feed(b"event: x\n")
    assert parser.pending


def test_close_allows_a_new_stream_and_keeps_last_event_id() -> None:
    parser = EventStreamParser()
    parser.feed(b"id: 3\nretry: 9\n: c\ndata: a\n\ndata: lost")
    parser.close()
    # A new response may start with its own BOM and must not see "lost".
    assert parser.feed(b"\xef\xbb\xbfdata: b\n\n") == [Event(data="b", id="3")]
    assert (parser.last_event_id, parser.retry, parser.comments) == ("3", 9, 1)


def test_close_forgets_a_trailing_cr() -> None:
    parser = EventStreamParser()
    parser.feed(b"data: a\r")
    parser.close()
    assert parser.feed(b"\ndata: b\n\n") == [Event(data="b")]


def test_one_megabyte_data_line() -> None:
    value = "x" * 1_000_000 + "é"
    stream = f"data: {value}\r\n\r\n".encode()
    assert parse(stream) == [Event(data=value)]
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    assert parse(*chunks) == [Event(data=value)]


# --- the specification's own examples -----------------------------------------


def test_spec_stock_example() -> None:
    stream = "data: YHOO\ndata: +2\ndata: 10\n\n"
    assert parse(stream) == [Event(data="YHOO\n+2\n10")]


def test_spec_first_second_third_example() -> None:
    stream = ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    parser = EventStreamParser()
    assert parser.feed(stream.encode()) == [
        Event(data="first event", id="1"),
        Event(data="second event", id=""),
        Event(data=" third event", id=""),
    ]
    assert parser.comments == 1


def test_spec_data_field_example() -> None:
    # "The first block fires events with the data set to the empty string, as
    # would the last block if it was followed by a blank line. The middle block
    # fires an event with the data set to a single newline character. The last
    # block is discarded because it is not followed by a blank line."
    parser = EventStreamParser()
    assert parser.feed(b"data\n\ndata\ndata\n\ndata:") == [Event(data=""), Event(data="\n")]
    assert parser.close() == []
    assert parse("data\n\ndata\ndata\n\ndata:\n\n") == [
        Event(data=""),
        Event(data="\n"),
        Event(data=""),
    ]


def test_spec_space_after_colon_example() -> None:
    # "The following stream fires two identical events"
    assert parse("data:test\n\ndata: test\n\n") == [Event(data="test"), Event(data="test")]


def test_spec_event_type_example() -> None:
    stream = "event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    assert parse(stream) == [
        Event(event="add", data="73857293"),
        Event(event="remove", data="2153"),
        Event(event="add", data="113411"),
    ]


# --- property tests ----------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One event as the test encoder writes it."""

    event: str | None
    data: str  # may contain CR/LF: written as several data lines
    id: str | None
    retry: int | None
    comment: str | None
    spaced: bool  # "data: v" rather than "data:v"


_NEWLINE = re.compile(r"\r\n|\r|\n")
_utf8_char = st.characters(codec="utf-8")  # streams are UTF-8: no lone surrogates
_no_line_ends = st.text(_utf8_char).map(lambda s: _NEWLINE.sub("", s))
_data_text = st.lists(_utf8_char | st.sampled_from(["\r", "\n", "\r\n", " ", ":", "é", "😀"])).map("".join)

blocks = st.builds(
    Block,
    event=st.none() | _no_line_ends,
    data=_data_text,
    id=st.none() | _no_line_ends.map(lambda s: s.replace("\0", "")),
    retry=st.none() | st.integers(min_value=0, max_value=10**12),
    comment=st.none() | _no_line_ends,
    spaced=st.booleans(),
)


def encode(stream: Iterable[Block], eol: str, bom: bool) -> bytes:
    """Encode blocks as an event stream with one line-end style."""
    out = ["\ufeff"] if bom else []
    for block in stream:
        if block.comment is not None:
            out.append(f":{block.comment}{eol}")
        if block.event is not None:
            out.append(f"event: {block.event}{eol}")
        for line in _NEWLINE.split(block.data):
            # Without the space, a value starting with a space would lose it.
            sep = ": " if block.spaced or line.startswith(" ") else ":"
            out.append(f"data{sep}{line}{eol}")
        if block.id is not None:
            out.append(f"id: {block.id}{eol}")
        if block.retry is not None:
            out.append(f"retry: {block.retry}{eol}")
        out.append(eol)
    return "".join(out).encode()


def expected_events(stream: Iterable[Block]) -> list[ServerSentEvent]:
    events: list[ServerSentEvent] = []
    last_id: str | None = None
    for block in stream:
        if block.id is not None:
            last_id = block.id
        events.append(
            ServerSentEvent(
                event=block.event or "message",
                data=_NEWLINE.sub("\n", block.data),
                id=last_id,
                retry=block.retry,
            )
        )
    return events


def feed_chunks(stream: bytes, cuts: Iterable[int]) -> tuple[list[ServerSentEvent], bool]:
    """Feed stream split at the cut offsets; return events and pending-at-end."""
    parser = EventStreamParser()
    events: list[ServerSentEvent] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += parser.feed(stream[start:cut])
        start = cut
    pending = parser.pending
    assert parser.close() == []
    return events, pending


@given(
    stream=st.lists(blocks, max_size=8),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    data=st.data(),
)
def test_any_chunking_yields_the_encoded_events(
    stream: list[Block], eol: str, bom: bool, data: st.DataObject
) -> None:
    encoded = encode(stream, eol, bom)
    cuts = data.draw(st.lists(st.integers(0, len(encoded))), label="cuts")
    whole, whole_pending = feed_chunks(encoded, [])
    chunked, chunked_pending = feed_chunks(encoded, cuts)
    assert chunked == whole
    assert whole == expected_events(stream)
    assert not whole_pending
    assert not chunked_pending


_interesting_bytes = st.binary() | st.lists(
    st.sampled_from(
        [
            *(b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"id", b"event", b"retry", b"1", b"\0"),
            *(b"\xef\xbb\xbf", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\xff"),
        ]
    )
).map(b"".join)


@given(stream=_interesting_bytes, data=st.data())
def test_arbitrary_bytes_chunking_invariant(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream))), label="cuts")
    assert feed_chunks(stream, cuts) == feed_chunks(stream, [])

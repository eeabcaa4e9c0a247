"""Incremental Server-Sent Events parser.

A direct reading of the WHATWG "event stream interpretation" algorithm:
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

Bytes can be fed in chunks split anywhere (inside a UTF-8 character, between
the CR and LF of a CRLF); the events produced are the same as for the whole
stream fed at once.

Speed: this runs for every chunk a load client receives. Line ends are found
with C-level ``str`` methods on the whole chunk (never per character) and only
the per-line field dispatch is a Python loop. Text of an unterminated line is
kept as a list of pieces and joined once its line end arrives, so a line of any
length costs linear time and no text is scanned twice.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["EventStreamParser", "ServerSentEvent"]

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event.

    ``id`` is the stream's last event ID in force at dispatch (the spec's
    ``lastEventId``), so it is inherited from earlier events; it is ``None``
    only while no ``id`` field has been seen on the stream (the spec's initial
    empty string), and ``""`` once the server reset it with an empty ``id``.
    ``retry`` is the value of a valid ``retry`` field inside this event's own
    block, else ``None``; the reconnection time in force is
    ``EventStreamParser.retry``.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class EventStreamParser:
    """Feed bytes of one ``text/event-stream`` response, get events back.

    Attributes:
        last_event_id: the spec's last event ID buffer ("" initially).
        retry: the reconnection time (ms) set by the latest valid ``retry``
            field, or ``None`` if the server never sent one.
        comments: number of comment lines seen (keepalives, typically).
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_decoder",
        "_event_retry",
        "_event_type",
        "_id_seen",
        "_partial",
        "_skip_lf",
        "comments",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # True until the first decoded character: a BOM is skipped only there.
        self._at_start = True
        # The previous chunk ended in CR: an LF opening the next one belongs to it.
        self._skip_lf = False
        # Pieces of the current, still unterminated line.
        self._partial: list[str] = []
        # The spec's data buffer, kept as the list of data values; joining them
        # with LF is the same as appending value + LF and removing the last LF.
        self._data: list[str] = []
        # The spec's event type buffer.
        self._event_type = ""
        # A ``retry`` value received inside the current event block.
        self._event_retry: int | None = None
        self._id_seen = False
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments = 0

    @property
    def pending(self) -> bool:
        """Whether part of an undispatched event is buffered.

        ``close()`` would discard it, so a response that ends while this is
        true was truncated mid-event.
        """
        return bool(
            self._partial
            or self._data
            or self._event_type
            or self._event_retry is not None
            or self._decoder.getstate()[0]
        )

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse the next chunk; return the events it completed."""
        # "Streams must be decoded using the UTF-8 decode algorithm"; the
        # incremental decoder keeps a character split across chunks.
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            # "The UTF-8 decode algorithm strips one leading UTF-8 Byte Order
            # Mark (BOM), if any."
            if text[0] == _BOM:
                text = text[1:]
                if not text:
                    return []
        if self._skip_lf:
            # A CRLF split across chunks is one line end, already taken at the CR.
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            # "Lines must be separated by either a CRLF pair, a single LF, or a
            # single CR": normalise all three to LF so one split finds them.
            # A final CR ends its line now; remember to drop a following LF.
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        # The last piece has no line end yet (it is "" if the chunk ended with one).
        tail = lines.pop()
        partial = self._partial
        if not lines:
            partial.append(tail)
            return []
        if partial:
            partial.append(lines[0])
            lines[0] = "".join(partial)
            partial.clear()
        if tail:
            partial.append(tail)
        return self._interpret(lines)

    def close(self) -> list[ServerSentEvent]:
        """Signal end of stream and reset for a new one (a reconnection).

        "Once the end of the file is reached, any pending data must be
        discarded": an unterminated line or an event block without its final
        blank line is dropped, so this always returns ``[]``. Check
        ``pending`` first to detect that. ``last_event_id``, ``retry`` and
        ``comments`` are kept: like the EventSource's last event ID string and
        reconnection time, they outlive one response.
        """
        self._decoder.reset()
        self._at_start = True
        self._skip_lf = False
        self._partial.clear()
        self._data.clear()
        self._event_type = ""
        self._event_retry = None
        return []

    def _interpret(self, lines: list[str]) -> list[ServerSentEvent]:
        """Run the spec's per-line steps over complete lines."""
        events: list[ServerSentEvent] = []
        data = self._data
        event_type = self._event_type
        event_retry = self._event_retry
        comments = 0
        for line in lines:
            if not line:
                # "If the line is empty (a blank line): Dispatch the event."
                if data:
                    # Dispatch step 1 (last event ID string := buffer) is implicit:
                    # last_event_id is read here. Step 3: the data buffer's last
                    # LF is removed; step 6: a non-empty event type replaces
                    # "message".
                    events.append(
                        ServerSentEvent(
                            event_type or "message",
                            "\n".join(data),
                            self.last_event_id if self._id_seen else None,
                            event_retry,
                        )
                    )
                    data.clear()
                # Step 2 ("if the data buffer is an empty string, set the data
                # buffer and the event type buffer to the empty string and
                # return") and step 7 (reset both buffers after dispatch).
                event_type = ""
                event_retry = None
                continue
            if line[0] == ":":
                # "If the line starts with a U+003A COLON character (:): Ignore
                # the line." Counted, as servers send comments as keepalives.
                comments += 1
                continue
            # "If the line contains a U+003A COLON character": field is the text
            # before the first colon, value the text after it. "Otherwise, the
            # string is not empty but does not contain a colon": the whole line
            # is the field name and the value is empty - partition() gives
            # exactly that.
            field, _, value = line.partition(":")
            if value and value[0] == " ":
                # "If value starts with a U+0020 SPACE character, remove it from
                # value." One space only.
                value = value[1:]
            if field == "data":
                # "Append the field value to the data buffer, then append a
                # single U+000A LINE FEED (LF) character to the data buffer."
                data.append(value)
            elif field == "event":
                # "Set the event type buffer to field value."
                event_type = value
            elif field == "id":
                # "If the field value does not contain U+0000 NULL, then set the
                # last event ID buffer to the field value. Otherwise, ignore the
                # field."
                if "\0" not in value:
                    self.last_event_id = value
                    self._id_seen = True
            elif field == "retry" and value.isascii() and value.isdigit():
                # "If the field value consists of only ASCII digits, then
                # interpret the field value as an integer in base ten, and set
                # the event stream's reconnection time to that integer.
                # Otherwise, ignore the field." (An empty value has no digits to
                # interpret, so it is ignored too.)
                try:
                    # Leading zeros stripped so only a value beyond int()'s
                    # digit limit (sys.get_int_max_str_digits) is rejected.
                    event_retry = int(value.lstrip("0") or "0")
                except ValueError:
                    pass  # no usable reconnection time: ignore the field
                else:
                    self.retry = event_retry
            # "Otherwise: The field is ignored."
        self._event_type = event_type
        self._event_retry = event_retry
        self.comments += comments
        return events

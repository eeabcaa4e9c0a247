"""SSE bodies as a reader studies them: split into the blocks that went over the wire, each
block's event, and the part each event plays in its protocol (opening the stream, carrying a
token, finishing the reply, carrying the usage, ending the stream), so chatsse's three fronts
(``POST /chat``, ``/v1/chat/completions``, ``/v1/responses``) can be laid side by side, and
two servers' framing of the same events compared.

The event names and keys are each protocol's own: chatsse/protocol.py for ``/chat``, OpenAI's
chunk and event types for the other two (the same ones chatsse/loadtargets.py reads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from chatsse import protocol
from chatsse.eventstream import EventStreamParser, ServerSentEvent

if TYPE_CHECKING:
    import pandas as pd
    from pandas.io.formats.style import Styler

__all__ = [
    "FRONTS",
    "ROLES",
    "Block",
    "blocks",
    "framing",
    "reply_text",
    "roles",
    "wire_table",
    "with_monospace",
]

FRONTS: Final = ("/chat", "/v1/chat/completions", "/v1/responses")
ROLES: Final = (
    "opens the stream",
    "carries a token",
    "finishes the reply",
    "carries the usage",
    "ends the stream",
)
OPENS, TOKEN, FINISHES, USAGE, ENDS = ROLES

_BLANK_LINE = re.compile(r"(?<=\r\n\r\n)|(?<=\n\n)|(?<=\r\r)")
_RESPONSES_OPEN: Final = frozenset(
    {"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"}
)
_RESPONSES_DONE: Final = frozenset(
    {"response.output_text.done", "response.content_part.done", "response.output_item.done"}
)
_RESPONSES_END: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass(frozen=True)
class Block:
    """One block of a body as it was sent (its line ends included) and the event it dispatches
    (``None`` for a block of comments only, such as a keepalive)."""

    text: str
    event: ServerSentEvent | None


def blocks(body: bytes) -> list[Block]:
    """``body`` cut at each blank line, each piece parsed on its own (so ``event.id`` is set
    only where the block itself has an ``id:`` line)."""
    found = []
    for text in _BLANK_LINE.split(body.decode()):
        if text.strip():
            events = EventStreamParser().feed((text + "\n\n").encode())
            found.append(Block(text, events[0] if events else None))
    return found


def roles(front: str, event: ServerSentEvent) -> tuple[str, ...]:
    """The parts ``event`` plays in a stream of ``front`` (one of :data:`FRONTS`)."""
    if front == "/chat":
        return {
            protocol.CONNECTED: (OPENS,),
            protocol.MESSAGE: (TOKEN,),
            protocol.COMPLETED: (FINISHES, USAGE, ENDS),
            protocol.ERROR: (ENDS,),
        }.get(event.event, ())
    if event.data == "[DONE]":
        return (ENDS,)
    data: Any = json.loads(event.data)
    if front == "/v1/chat/completions":
        found: list[str] = []
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("role") and not delta.get("content"):
                found.append(OPENS)
            if delta.get("content"):
                found.append(TOKEN)
            if choice.get("finish_reason"):
                found.append(FINISHES)
        if data.get("usage"):
            found.append(USAGE)
        return tuple(found)
    if front == "/v1/responses":
        kind = data.get("type")
        if kind in _RESPONSES_OPEN:
            return (OPENS,)
        if kind == "response.output_text.delta":
            return (TOKEN,)
        if kind in _RESPONSES_DONE:
            return (FINISHES,)
        if kind in _RESPONSES_END:
            return (FINISHES, USAGE, ENDS) if data["response"].get("usage") else (FINISHES, ENDS)
        return ()
    raise ValueError(f"unknown front {front!r}; one of {FRONTS}")


def reply_text(front: str, body: bytes) -> str:
    """The reply a body of ``front`` carries: the text of its token events, joined."""
    parts = []
    for block in blocks(body):
        if block.event is None or TOKEN not in roles(front, block.event):
            continue
        data = json.loads(block.event.data)
        parts.append(
            data["choices"][0]["delta"]["content"] if front == "/v1/chat/completions" else data["delta"]
        )
    return "".join(parts)


def _shown(text: str, width: int) -> str:
    lines = [
        line if len(line) <= width else line[: width - 1] + "…" for line in text.rstrip("\r\n").splitlines()
    ]
    return "\n".join(lines)


def wire_table(bodies: Mapping[str, bytes], *, width: int = 240) -> pd.DataFrame:
    """One column per front, one row per role: how many events play it, and the first of them
    as sent (lines cut at ``width``); then the stream's size. ``bodies``: front -> raw body."""
    import pandas as pd

    columns: dict[str, list[str]] = {}
    for front, body in bodies.items():
        found = [(block, roles(front, block.event)) for block in blocks(body) if block.event is not None]
        cells = []
        previous: Block | None = None
        for role in ROLES:
            playing = [block for block, parts in found if role in parts]
            if not playing:
                cells.append("—")
                continue
            first = playing[0]
            shown = "↑ the same event" if first is previous else _shown(first.text, width)
            cells.append(f"{len(playing)} event{'s' if len(playing) > 1 else ''}\n{shown}")
            previous = first
        tokens = [len(block.text.encode()) for block, parts in found if TOKEN in parts]
        with_ids = sum(1 for block, _ in found if block.event is not None and block.event.id is not None)
        cells += [
            f"{len(found)} events, {with_ids} with an id: line",
            f"{len(body)} bytes, {sum(tokens) / max(1, len(tokens)):.0f} per token event",
        ]
        columns[front] = cells
    return pd.DataFrame(columns, index=[*ROLES, "events", "size"])


def with_monospace(frame: pd.DataFrame) -> Styler:
    """``frame`` shown with its cells in monospace, left-aligned, line breaks kept and long lines
    (JSON has no spaces to break at) wrapped anywhere, so the columns fit side by side."""
    cells: list[tuple[str, str | float]] = [
        ("white-space", "pre-wrap"),
        ("word-break", "break-all"),
        ("font-family", "monospace"),
        ("text-align", "left"),
        ("vertical-align", "top"),
        ("max-width", "34em"),
    ]
    return frame.style.set_table_styles([{"selector": "td", "props": cells}])


def framing(body: bytes) -> dict[str, Any]:
    """How a body is framed: its events and comment blocks, its line end, the fields of its
    first event in the order sent, its size."""
    found = blocks(body)
    text = body.decode()
    line_end = "CRLF" if "\r\n" in text else "CR" if "\r" in text else "LF"
    first = next((block for block in found if block.event is not None), None)
    fields = [] if first is None else [line.split(":", 1)[0] for line in first.text.splitlines() if line]
    return {
        "events": sum(1 for block in found if block.event is not None),
        "comments": sum(1 for block in found if block.event is None),
        "line end": line_end,
        "first event's fields": " ".join(fields),
        "bytes": len(body),
    }

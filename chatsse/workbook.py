"""Helpers for the notebooks: stream chat turns live into a cell's output, and size
experiments for a quick run.

Notebooks use top-level ``await`` (IPython runs cells in its own event loop), so these
helpers are async and never start an event loop themselves; nest-asyncio is not needed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import httpx
from httpx_sse import aconnect_sse

from chatsse import protocol

__all__ = ["ChatTurn", "Conversation", "pick", "quick_mode", "raw_chunks", "show_chunks", "stream_turn"]

QUICK_ENV = "CHATSSE_QUICK"
T = TypeVar("T")


def quick_mode() -> bool:
    """True when ``CHATSSE_QUICK=1``: notebooks shrink durations and counts (CI runs them so)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0", "false", "no")


def pick(full: T, quick: T) -> T:
    """``full`` normally, ``quick`` in quick mode."""
    return quick if quick_mode() else full


@dataclass
class ChatTurn:
    """One streamed reply as the client saw it. Times are seconds from sending the request."""

    status: int
    conversation_id: str | None = None
    message_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    server_timings: dict[str, float] = field(default_factory=dict)
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    ttft: float | None = None
    total: float = 0.0

    @property
    def token_times(self) -> list[float]:
        return [t for t, name, _ in self.events if name == protocol.MESSAGE]


async def stream_turn(
    url: str,
    message: str,
    conversation_id: str | None = None,
    *,
    show: bool = True,
    out: TextIO | None = None,
    client: httpx.AsyncClient | None = None,
    **extra: Any,
) -> ChatTurn:
    """Send one message to ``url``'s ``/chat`` and read the stream; with ``show``, print the
    reply token by token as it arrives."""
    out = out or sys.stdout
    body = {"message": message, "conversation_id": conversation_id, **extra}
    own = client is None
    http = client or httpx.AsyncClient(base_url=url, timeout=60)
    started = time.perf_counter()
    try:
        async with aconnect_sse(http, "POST", f"{url}/chat", json=body) as source:
            turn = ChatTurn(status=source.response.status_code)
            if turn.status != 200:
                await source.response.aread()
                turn.error = source.response.json().get("error")
                if show:
                    print(f"HTTP {turn.status}: {turn.error}", file=out)
                return turn
            async for event in source.aiter_sse():
                at = time.perf_counter() - started
                data = json.loads(event.data)
                turn.events.append((at, event.event, data))
                if event.event == protocol.CONNECTED:
                    turn.conversation_id = data["conversation_id"]
                    turn.message_id = data["message_id"]
                elif event.event == protocol.MESSAGE:
                    if turn.ttft is None:
                        turn.ttft = at
                    turn.text += data["delta"]
                    if show:
                        print(data["delta"], end="", file=out, flush=True)
                elif event.event == protocol.COMPLETED:
                    turn.finish_reason = data["finish_reason"]
                    turn.usage = data["usage"]
                    turn.server_timings = data["timings"]
                elif event.event == protocol.ERROR:
                    turn.error = data
                    if show:
                        print(f"\n[error: {data['type']}: {data['message']}]", file=out)
    finally:
        if own:
            await http.aclose()
    turn.total = time.perf_counter() - started
    if show:
        print(file=out, flush=True)
    return turn


class Conversation:
    """A multi-turn chat that remembers its conversation id: ``await chat.say("hi")``."""

    def __init__(self, url: str, *, show: bool = True) -> None:
        self.url = url
        self.show = show
        self.conversation_id: str | None = None
        self.turns: list[ChatTurn] = []

    async def say(self, message: str, **extra: Any) -> ChatTurn:
        if self.show:
            print(f"> {message}", flush=True)
        turn = await stream_turn(self.url, message, self.conversation_id, show=self.show, **extra)
        if turn.conversation_id:
            self.conversation_id = turn.conversation_id
        self.turns.append(turn)
        return turn

    async def history(self) -> list[dict[str, Any]]:
        """The conversation as the server stored it."""
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.get(f"/conversations/{self.conversation_id}")
            response.raise_for_status()
            messages: list[dict[str, Any]] = response.json()["messages"]
            return messages


async def raw_chunks(url: str, message: str, **extra: Any) -> list[tuple[float, bytes]]:
    """The response body of one ``/chat`` exactly as it came off the socket, with each
    chunk's arrival time (seconds from sending)."""
    chunks: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        async with client.stream("POST", "/chat", json={"message": message, **extra}) as response:
            async for chunk in response.aiter_raw():
                chunks.append((time.perf_counter() - started, chunk))
    return chunks


def show_chunks(chunks: Sequence[tuple[float, bytes]], limit: int = 8, out: TextIO | None = None) -> None:
    """Print the first chunks of a raw stream with their arrival times."""
    out = out or sys.stdout
    for at, chunk in chunks[:limit]:
        print(f"{at * 1000:8.1f} ms  {chunk!r}", file=out)
    if len(chunks) > limit:
        print(f"... {len(chunks) - limit} more chunks", file=out)

"""Helpers for the notebooks: stream chat turns live into a cell's output, learn which worker
answered a turn, and size experiments for a quick run.

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
from chatsse.errors import ChatsseError

__all__ = [
    "LIVE_UPDATES_PER_SECOND",
    "ChatTurn",
    "Conversation",
    "WorkerUnknown",
    "live_frontend",
    "pick",
    "quick_mode",
    "raw_chunks",
    "show_chunks",
    "stream_turn",
    "worker_turn",
]

QUICK_ENV = "CHATSSE_QUICK"
LIVE_UPDATES_PER_SECOND = 20
"""At most this many redraws of a live reply per second (the last state is always drawn)."""
T = TypeVar("T")


def quick_mode() -> bool:
    """True when ``CHATSSE_QUICK=1``: notebooks shrink durations and counts (CI runs them so)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0", "false", "no")


def pick(full: T, quick: T) -> T:
    """``full`` normally, ``quick`` in quick mode."""
    return quick if quick_mode() else full


def _kernel() -> Any:
    """The Jupyter kernel running this code, or None (plain Python, terminal IPython)."""
    ipython = sys.modules.get("IPython")  # never imported for this: plain Python stays plain
    shell = None if ipython is None else ipython.get_ipython()
    return getattr(shell, "kernel", None)


def live_frontend() -> bool:
    """True when this code runs in a Jupyter kernel for a frontend a person is watching, where
    a display can be redrawn in place.

    Plain Python and terminal IPython have no kernel, so nothing would redraw a display: they
    get plain text, token by token. A kernel cannot see its frontend, but it sees how the
    running cell was sent: JupyterLab, Notebook and VS Code send ``allow_stdin`` (a person may
    answer ``input()``); headless runners (nbclient, under ``nbconvert --execute``, nbmake and
    papermill) turn it off, since nobody is there to type or to watch. They get plain text
    too, the reply written once it is complete: their saved output is then the reply in one
    piece, not a redraw or an output per token.
    """
    kernel = _kernel()
    if kernel is None:
        return False
    content = kernel.get_parent().get("content", {})
    return bool(content.get("allow_stdin", False))


@dataclass
class ChatTurn:
    """One streamed reply as the client saw it. Times are seconds from sending the request,
    ``sent_at`` (``time.perf_counter()``), so turns sent at different moments can share a clock."""

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
    sent_at: float = 0.0

    @property
    def token_times(self) -> list[float]:
        return [t for t, name, _ in self.events if name == protocol.MESSAGE]


class _TextView:
    """A reply as plain text: each delta written as it arrives (``streaming``), else the
    whole reply once it has ended."""

    def __init__(self, out: TextIO | None, *, streaming: bool = True) -> None:
        self.out = out or sys.stdout
        self.streaming = streaming
        self.tail = ""

    def prompt(self, message: str) -> None:
        print(f"> {message}", file=self.out, flush=True)

    def delta(self, turn: ChatTurn, text: str, at: float) -> None:
        if self.streaming:
            print(text, end="", file=self.out, flush=True)

    def event(self, turn: ChatTurn, at: float) -> None:
        return None

    def http_error(self, turn: ChatTurn) -> None:
        print(f"HTTP {turn.status}: {turn.error}", file=self.out)

    def stream_error(self, turn: ChatTurn, error: dict[str, Any]) -> None:
        line = f"\n[error: {error['type']}: {error['message']}]"
        if self.streaming:
            print(line, file=self.out)
        else:
            self.tail = line

    def finish(self, turn: ChatTurn) -> None:
        if not self.streaming:
            print(turn.text + self.tail, end="", file=self.out)
        print(file=self.out, flush=True)


def _status_line(turn: ChatTurn, now: float, *, done: bool = False) -> str:
    """``TTFT 212 ms · 24.8 tokens/s · 31 events``: tokens/s is the decode rate, the tokens
    after the first over the time since the first."""
    times = turn.token_times
    parts = ["waiting for the first token" if turn.ttft is None else f"TTFT {turn.ttft * 1000:.0f} ms"]
    if len(times) > 1 and times[-1] > times[0]:
        parts.append(f"{(len(times) - 1) / (times[-1] - times[0]):.1f} tokens/s")
    parts.append(f"{len(turn.events)} event{'s' * (len(turn.events) != 1)}")
    if done:
        parts.append(f"done in {now * 1000:.0f} ms")
    return " · ".join(parts)


class _LiveView:
    """A reply rendered in place as Markdown, a status line under it, in one IPython display.

    Redrawn at most :data:`LIVE_UPDATES_PER_SECOND` times a second: a token costs one clock
    comparison, and a redraw joins the text so far (the text of a chat reply, small)."""

    def __init__(self) -> None:
        self.heading = ""
        self.pieces: list[str] = []
        self.tail = ""
        self.drawn_at = -1.0
        self.handle: Any = None

    def prompt(self, message: str) -> None:
        self.heading = "".join(f"> {line}\n" for line in message.splitlines() or [""]) + "\n"

    def _draw(self, turn: ChatTurn, now: float, *, done: bool = False) -> None:
        from IPython.display import Markdown, display

        self.drawn_at = now
        status = _status_line(turn, now, done=done)
        reply = Markdown(f"{self.heading}{''.join(self.pieces)}{self.tail}\n\n*{status}*")  # type: ignore[no-untyped-call]
        if self.handle is None:
            self.handle = display(reply, display_id=True)  # type: ignore[no-untyped-call]
        else:
            self.handle.update(reply)

    def delta(self, turn: ChatTurn, text: str, at: float) -> None:
        self.pieces.append(text)
        if len(self.pieces) == 1 or at - self.drawn_at >= 1 / LIVE_UPDATES_PER_SECOND:
            self._draw(turn, at)

    def event(self, turn: ChatTurn, at: float) -> None:
        if self.handle is None:  # connected: show that the stream is open
            self._draw(turn, at)

    def http_error(self, turn: ChatTurn) -> None:
        self.tail = f"**HTTP {turn.status}**: {turn.error}"
        self._draw(turn, turn.total)

    def stream_error(self, turn: ChatTurn, error: dict[str, Any]) -> None:
        self.tail = f"\n\n**error: {error['type']}**: {error['message']}"

    def finish(self, turn: ChatTurn) -> None:
        self._draw(turn, turn.total, done=True)


_View = _TextView | _LiveView


def _view(show: bool, live: bool | None, out: TextIO | None) -> _View | None:
    if not show:
        return None
    watched = live_frontend()
    if live if live is not None else out is None and watched:
        return _LiveView()
    return _TextView(out, streaming=out is not None or watched or _kernel() is None)


async def stream_turn(
    url: str,
    message: str,
    conversation_id: str | None = None,
    *,
    show: bool = True,
    out: TextIO | None = None,
    client: httpx.AsyncClient | None = None,
    live: bool | None = None,
    **extra: Any,
) -> ChatTurn:
    """Send one message to ``url``'s ``/chat`` and read the stream; with ``show``, show the
    reply as it arrives: rendered in place with a live status line where a notebook frontend
    is watching (``live``, by default :func:`live_frontend`, unless ``out`` is given), else
    printed token by token to ``out`` (stdout), or, in a kernel no one watches, once whole."""
    return await _stream(url, message, conversation_id, _view(show, live, out), client, extra)


async def _stream(
    url: str,
    message: str,
    conversation_id: str | None,
    view: _View | None,
    client: httpx.AsyncClient | None,
    extra: dict[str, Any],
) -> ChatTurn:
    body = {"message": message, "conversation_id": conversation_id, **extra}
    own = client is None
    http = client or httpx.AsyncClient(base_url=url, timeout=60)
    started = time.perf_counter()
    pieces: list[str] = []
    turn = ChatTurn(status=0, sent_at=started)
    try:
        async with aconnect_sse(http, "POST", f"{url}/chat", json=body) as source:
            turn.status = source.response.status_code
            if turn.status != 200:
                await source.response.aread()
                turn.error = source.response.json().get("error")
                turn.total = time.perf_counter() - started
                if view is not None:
                    view.http_error(turn)
                return turn
            async for event in source.aiter_sse():
                if not event.data:
                    # A keepalive comment after an event with an id: httpx-sse hands it on as an
                    # event with no data, which the WHATWG algorithm never dispatches.
                    continue
                at = time.perf_counter() - started
                data = json.loads(event.data)
                turn.events.append((at, event.event, data))
                if event.event == protocol.MESSAGE:
                    if turn.ttft is None:
                        turn.ttft = at
                    pieces.append(data["delta"])
                    if view is not None:
                        view.delta(turn, data["delta"], at)
                    continue
                if event.event == protocol.CONNECTED:
                    turn.conversation_id = data["conversation_id"]
                    turn.message_id = data["message_id"]
                elif event.event == protocol.COMPLETED:
                    turn.finish_reason = data["finish_reason"]
                    turn.usage = data["usage"]
                    turn.server_timings = data["timings"]
                elif event.event == protocol.ERROR:
                    turn.error = data
                    if view is not None:
                        view.stream_error(turn, data)
                if view is not None:
                    view.event(turn, at)
    finally:
        turn.text = "".join(pieces)
        if own:
            await http.aclose()
    turn.total = time.perf_counter() - started
    if view is not None:
        view.finish(turn)
    return turn


class Conversation:
    """A multi-turn chat that remembers its conversation id: ``await chat.say("hi")``.
    ``show`` and ``live`` as for :func:`stream_turn`."""

    def __init__(self, url: str, *, show: bool = True, live: bool | None = None) -> None:
        self.url = url
        self.show = show
        self.live = live
        self.conversation_id: str | None = None
        self.turns: list[ChatTurn] = []

    async def say(self, message: str, **extra: Any) -> ChatTurn:
        view = _view(self.show, self.live, None)
        if view is not None:
            view.prompt(message)
        turn = await _stream(self.url, message, self.conversation_id, view, None, extra)
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


class WorkerUnknown(ChatsseError, RuntimeError):
    """The turn did not travel on the connection whose worker was asked."""


async def worker_turn(
    url: str, message: str, conversation_id: str | None = None, *, show: bool = False, **extra: Any
) -> tuple[int, ChatTurn]:
    """Stream one turn on a new connection and say which worker process served it: its pid.

    A TCP connection is accepted by one worker process, which serves every request on it until
    it closes, so ``GET /health`` just before the turn, on the same keep-alive connection,
    answers the turn's worker (``this_worker.pid``). The connection is checked to be the same
    one for both requests (its local address); if the server closed it in between,
    :class:`WorkerUnknown` is raised. No header or server change is needed.
    """
    addresses: list[object] = []

    async def note_connection(response: httpx.Response) -> None:
        stream = response.extensions["network_stream"]
        addresses.append(stream.get_extra_info("client_addr"))

    async with httpx.AsyncClient(
        base_url=url,
        timeout=60,
        limits=httpx.Limits(max_connections=1),
        event_hooks={"response": [note_connection]},
    ) as http:
        health = await http.get("/health")
        health.raise_for_status()
        pid: int = health.json()["this_worker"]["pid"]
        turn = await stream_turn(url, message, conversation_id, show=show, client=http, **extra)
    if len(addresses) != 2 or addresses[0] != addresses[1]:
        raise WorkerUnknown(f"/health and /chat used different connections: {addresses}")
    return pid, turn


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

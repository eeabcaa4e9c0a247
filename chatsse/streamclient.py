"""A client's view of one stream: every read off the socket and every event, with the time it
arrived, on a connection whose worker is known; a reply dropped mid-way on purpose, resumed with
``Last-Event-ID`` on another worker, or stopped from another connection (README, "Resuming and
stopping a stream").

Which worker serves a request is the worker that accepted its connection, so a
:class:`WorkerConnection` asks ``/health`` (``this_worker.pid``) on one keep-alive connection
and sends its stream on the same one; the local port is checked at both, so the pid it names
is the pid that streamed. Times are ``time.perf_counter()`` readings, comparable across
streams read in one process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatsse import protocol
from chatsse.errors import ChatsseError
from chatsse.eventstream import EventStreamParser

__all__ = [
    "Arrival",
    "StreamView",
    "WorkerConnection",
    "WorkerNotFound",
    "read_chat",
    "read_chats",
    "stored_reply",
]

DROPPED = "dropped"  # StreamView.ending of a stream its client left on purpose
CLOSED = "closed"  # ... and of one whose connection ended with no last event
_TIMEOUT = 60.0  # seconds httpx waits for a connection, a write, or the next read
_ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1)


class WorkerNotFound(ChatsseError, RuntimeError):
    """No new connection reached a worker other than the ones to avoid."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One event as the client got it: when, in which read off the socket, what."""

    at: float
    read: int
    event: str
    id: str | None
    data: dict[str, Any]

    @property
    def position(self) -> int | None:
        """The event's place in its stream, from its id (``<message id>:<position>``)."""
        if not self.id:
            return None
        try:
            return protocol.parse_event_id(self.id)[1]
        except ValueError:
            return None


@dataclass(slots=True)
class StreamView:
    """One stream as its client read it. ``ending``: ``completed``, ``error:<type>``,
    ``dropped`` (the client left on purpose), ``closed`` (the connection ended without a last
    event) or ``http_<status>``."""

    status: int
    started: float
    worker_pid: int | None = None
    reads: list[tuple[float, int]] = field(default_factory=list)  # (arrival, bytes after decoding)
    events: list[Arrival] = field(default_factory=list)
    ending: str = CLOSED
    done: bool = False  # read to its end (or dropped)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # an error's body (a stream's bytes are in ``events``)

    @property
    def tokens(self) -> list[Arrival]:
        return [e for e in self.events if e.event == protocol.MESSAGE]

    @property
    def text(self) -> str:
        return "".join(e.data.get("delta", "") for e in self.tokens)

    @property
    def token_times(self) -> list[float]:
        """Each token event's arrival, in seconds from the request."""
        return [e.at - self.started for e in self.tokens]

    @property
    def token_reads(self) -> int:
        """How many reads off the socket brought at least one token event."""
        return len({e.read for e in self.tokens})

    def bursts(self, within: float = 0.005) -> list[tuple[float, int]]:
        """Token events grouped by arrival: ``(seconds from the request, tokens)`` per burst, a
        burst being the tokens that came less than ``within`` seconds after the one before."""
        found: list[tuple[float, int]] = []
        previous = None
        for at in self.token_times:
            if previous is not None and at - previous < within:
                found[-1] = (found[-1][0], found[-1][1] + 1)
            else:
                found.append((at, 1))
            previous = at
        return found

    @property
    def last_event_id(self) -> str | None:
        return self.events[-1].id if self.events else None

    def _connected(self) -> dict[str, Any]:
        for event in self.events:
            if event.event == protocol.CONNECTED:
                return event.data
        raise ChatsseError("the stream has no connected event")

    @property
    def conversation_id(self) -> str:
        return str(self._connected()["conversation_id"])

    @property
    def message_id(self) -> str:
        return str(self._connected()["message_id"])

    @property
    def resume_path(self) -> str:
        """Where the reply can be resumed (``connected``'s ``resume_url``)."""
        return str(self._connected()["resume_url"])

    @property
    def stop_path(self) -> str:
        return protocol.stop_path(self.conversation_id, self.message_id)

    @property
    def finish_reason(self) -> str | None:
        last = self.events[-1] if self.events else None
        return last.data.get("finish_reason") if last and last.event == protocol.COMPLETED else None


async def _read(
    response: httpx.Response,
    view: StreamView,
    drop_after_tokens: int | None,
    on_event: Callable[[], None] | None,
) -> None:
    parser = EventStreamParser()
    tokens = 0
    async for chunk in response.aiter_bytes():  # decoded (gzip) as it arrives
        at = time.perf_counter()
        view.reads.append((at, len(chunk)))
        for event in parser.feed(chunk):
            try:
                data = json.loads(event.data) if event.data else {}
            except json.JSONDecodeError:
                data = {"raw": event.data}
            view.events.append(Arrival(at, len(view.reads) - 1, event.event, event.id, data))
            if on_event is not None:
                on_event()
            if event.event == protocol.COMPLETED:
                view.ending = protocol.COMPLETED
            elif event.event == protocol.ERROR:
                view.ending = f"error:{data.get('type')}"
            elif event.event == protocol.MESSAGE:
                tokens += 1
                if drop_after_tokens is not None and tokens >= drop_after_tokens:
                    view.ending = DROPPED
                    return  # leaving the response unread closes the connection


async def _stream(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    drop_after_tokens: int | None = None,
    on_response: Callable[[httpx.Response], None] | None = None,
    on_view: Callable[[StreamView], None] | None = None,
    on_event: Callable[[], None] | None = None,
) -> StreamView:
    started = time.perf_counter()
    async with client.stream(method, path, json=json_body, headers=headers) as response:
        if on_response is not None:
            on_response(response)
        view = StreamView(status=response.status_code, started=started, headers=dict(response.headers))
        if on_view is not None:
            on_view(view)
        try:
            if response.status_code != 200:
                view.body = await response.aread()
                view.ending = f"http_{response.status_code}"
            else:
                await _read(response, view, drop_after_tokens, on_event)
        except httpx.TransportError:
            view.ending = CLOSED
        finally:
            view.done = True
            if on_event is not None:
                on_event()
    return view


async def read_chat(
    url: str, message: str, *, client: httpx.AsyncClient | None = None, **extra: Any
) -> StreamView:
    """One ``POST /chat`` read to its end (``extra``: more body fields, e.g. ``max_tokens``), on
    ``client`` if given, else on a client of its own."""
    body = {"message": message, **extra}
    if client is not None:
        return await _stream(client, "POST", f"{url}/chat", json_body=body)
    async with httpx.AsyncClient(timeout=_TIMEOUT) as own:
        return await _stream(own, "POST", f"{url}/chat", json_body=body)


async def read_chats(url: str, schedule: Sequence[tuple[float, str]], **extra: Any) -> list[StreamView]:
    """Several ``POST /chat`` streams read at once, each on its own connection of one client:
    ``schedule`` lists ``(seconds from now, message)``; the views come back in that order."""
    limits = httpx.Limits(max_connections=len(schedule), max_keepalive_connections=len(schedule))
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=limits) as client:

        async def one(delay: float, message: str) -> StreamView:
            await asyncio.sleep(delay)
            return await read_chat(url, message, client=client, **extra)

        return list(await asyncio.gather(*(one(delay, message) for delay, message in schedule)))


async def stored_reply(url: str, conversation_id: str, *, wait: float = 10.0) -> dict[str, Any]:
    """The conversation's last reply as stored, once it is (a reply is stored when its turn
    ends, which may come after its client left): polled for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT) as client:
        while True:
            response = await client.get(f"/conversations/{conversation_id}")
            response.raise_for_status()
            last: dict[str, Any] = response.json()["messages"][-1]
            if last["role"] == "assistant":
                return last
            if time.monotonic() >= deadline:
                raise ChatsseError(f"no reply stored in {conversation_id} within {wait} s")
            await asyncio.sleep(0.05)


def _local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    address = stream.get_extra_info("client_addr")
    return int(address[1])


class WorkerConnection:
    """One keep-alive connection to ``url`` and the pid of the worker process serving it:
    ``conn = await WorkerConnection.open(url, avoid={pid})``. A stream dropped on purpose
    closes the connection, and the object with it."""

    def __init__(self, client: httpx.AsyncClient, pid: int, port: int) -> None:
        self.client = client
        self.pid = pid
        self.port = port  # the connection's local port
        self.closed = False
        self.current: StreamView | None = None
        """The stream being read (or the last one): its events grow as they arrive, so another
        task can look at a stream that is still open (:meth:`read_tokens`)."""
        self._progress = asyncio.Event()

    @classmethod
    async def open(cls, url: str, *, avoid: Collection[int] = (), attempts: int = 200) -> WorkerConnection:
        """A connection served by a worker whose pid is not in ``avoid``: new connections are
        opened until one lands on such a worker (the kernel hands each to one worker). Between
        misses the client pauses a little longer each time (up to 50 ms): on a busy machine the
        worker that is running takes every connection until the others get the CPU."""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(0.05, 0.002 * attempt))
            client = httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, limits=_ONE_CONNECTION)
            response = await client.get("/health")
            response.raise_for_status()
            pid = int(response.json()["this_worker"]["pid"])
            if pid not in avoid:
                return cls(client, pid, _local_port(response))
            await client.aclose()
        raise WorkerNotFound(f"{attempts} connections, every one served by a worker in {sorted(avoid)}")

    def _same_connection(self, response: httpx.Response) -> None:
        port = _local_port(response)
        if port != self.port:  # the server closed the idle connection and httpx opened another
            raise ChatsseError(f"the request went on a new connection (port {port}, not {self.port})")

    def _started(self, view: StreamView) -> None:
        view.worker_pid = self.pid
        self.current = view

    async def stream(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        drop_after_tokens: int | None = None,
    ) -> StreamView:
        """Send a request whose answer is a stream and read it; with ``drop_after_tokens``,
        close the connection after that many token events (a client that goes away)."""
        if self.closed:
            raise ChatsseError("this connection was closed")
        self.current = None
        view = await _stream(
            self.client,
            method,
            path,
            json_body=json_body,
            headers=headers,
            drop_after_tokens=drop_after_tokens,
            on_response=self._same_connection,
            on_view=self._started,
            on_event=self._progress.set,
        )
        if view.ending == DROPPED:
            await self.aclose()
        return view

    async def read_tokens(self, count: int) -> StreamView:
        """Wait until the stream this connection is reading (in another task) has brought
        ``count`` token events, or has ended; return it as read so far."""
        while True:
            view = self.current
            if view is not None and (view.done or len(view.tokens) >= count):
                return view
            self._progress.clear()
            await self._progress.wait()

    async def chat(self, message: str, *, drop_after_tokens: int | None = None, **extra: Any) -> StreamView:
        """``POST /chat`` on this connection."""
        body = {"message": message, **extra}
        return await self.stream("POST", "/chat", json_body=body, drop_after_tokens=drop_after_tokens)

    async def resume(self, view: StreamView, *, from_start: bool = False) -> StreamView:
        """``GET`` the resume path of ``view``'s reply after its last event (``from_start``:
        every event, as a second reader following the reply would)."""
        last = None if from_start else view.last_event_id
        headers = {"Last-Event-ID": last} if last else None
        return await self.stream("GET", view.resume_path, headers=headers)

    async def post(self, path: str, json_body: Any = None) -> httpx.Response:
        """``POST`` on this connection (a stop, from another connection than the stream's)."""
        if self.closed:
            raise ChatsseError("this connection was closed")
        response = await self.client.post(path, json=json_body)
        self._same_connection(response)
        return response

    async def aclose(self) -> None:
        self.closed = True
        await self.client.aclose()

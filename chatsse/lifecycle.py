"""The life of one app's streams, owned by one object: :class:`Lifecycle`.

It admits streams (or refuses them: draining, or the per-worker cap), tracks each from
admission to its end as a :class:`Slot`, and runs one ticker for all of them that writes
keepalive comments and enforces the engine, write and reply deadlines (chatsse/deadlines.py).
On shutdown, :meth:`Lifecycle.drain` gives open streams the grace period, then stops each one
still open, which stores its partial reply and writes its ``shutdown`` event.

Every server command calls it: ``chatsse serve``, the gunicorn worker and
``InProcessServer`` all run :class:`chatsse.serving.ChatsseServer`, whose shutdown begins
with ``drain()``.

A slot exists from admission, before the turn begins in the store, so a drain that starts
while a request is still inside ``begin_turn`` reaches it too: the stop waits (a slot in a
store call is never cancelled; the call has its own deadline) and the stream ends with its
``shutdown`` event as soon as its response starts.

One flow, per stream: ``admit`` -> the route begins the turn -> the response ``attach``-es
the slot to the connection (a task waits on ``receive`` for the client to go away) -> the
producer writes through ``emit`` and marks what it waits on (``phase``) -> the response ends
-> ``release``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from typing import Any, Final, Protocol

from starlette.types import Message, Receive, Send

from chatsse.deadlines import Deadlines
from chatsse.errors import ServerBusy, ShuttingDown
from chatsse.logs import get_logger
from chatsse.protocol import Outcome

__all__ = ["FIRST_TOKEN", "NEXT_TOKEN", "STORING", "WRITING", "Lifecycle", "Slot", "lifecycle_of"]

log = get_logger("chatsse.lifecycle")

# What a stream waits on (Slot.phase), and so which deadline the watchdog applies.
STORING: Final = 0  # a store call: bounded by its own deadline; stops wait until it returns
FIRST_TOKEN: Final = 1  # the engine's first token
NEXT_TOKEN: Final = 2  # the engine's next token
WRITING: Final = 3  # a socket write

_KEEPALIVE: Final = b": keepalive\n\n"


class OpenStreamsGauge(Protocol):
    def inc(self) -> None: ...

    def dec(self) -> None: ...


def _abort_connection(send: Send) -> bool:
    """Close the connection under ``send`` at once, unsent bytes dropped. ASGI has no call for
    it; uvicorn's ``send`` is a method of the request cycle, which holds the transport. Closing
    it makes uvicorn report a disconnect (a blocked ``send`` returns), as for a client that
    left. False if the transport cannot be reached (another server)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    abort()
    return True


class Slot:
    """One stream, from admission to release. The producer writes through :meth:`emit` and
    sets :attr:`phase`; the ticker reads both."""

    __slots__ = (
        "_cancelled", "_lifecycle", "_receive", "_send", "_waiter", "away_until", "closed", "disconnected",
        "phase", "ping", "ping_ticks", "quiet", "reply_deadline", "resume_window", "seen_phase",
        "stop_reason", "task", "wrote",
    )  # fmt: skip

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._send: Send | None = None
        self._receive: Receive | None = None
        self._waiter: asyncio.Future[Message] | None = None
        self.phase = STORING  # begin_turn comes first
        self.seen_phase = STORING
        self.wrote = False  # a write began since the ticker last looked
        self.quiet = 0  # ticks without a write, in this phase
        self.ping: asyncio.Task[None] | None = None  # a keepalive comment being written
        self.ping_ticks = 0
        self.task: asyncio.Task[None] | None = None  # the producer's, while it runs
        self._cancelled = False
        self.stop_reason: Outcome | None = None
        self.reply_deadline = math.inf
        self.closed = False  # the last body message is being sent or has been
        self.disconnected = False
        # A recorded stream (resumable) whose client goes away keeps generating into its log
        # for this many seconds, more while a resuming client reads it (0: stop at once).
        self.resume_window = 0.0
        self.away_until = math.inf  # the client is gone: stop at this loop time unless resumed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._lifecycle.loop

    # --- the response's side ---

    def attach(self, send: Send, receive: Receive) -> None:
        """The response has started: watch the connection, start the reply's deadline."""
        self._send, self._receive = send, receive
        self.reply_deadline = self._lifecycle.loop.time() + self._lifecycle.deadlines.reply
        self._listen()

    def detach(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None

    @property
    def body_send(self) -> Send:
        """The server's own ``send``, for a producer's per-token loop, which marks ``wrote``
        itself (once per batch of writes)."""
        assert self._send is not None
        return self._send

    def emit(self, chunk: bytes) -> Awaitable[None]:
        """The hot path: a flag, a dict, and the server's ``send`` for the caller to await
        (a plain function: no coroutine of its own between the producer and the server)."""
        self.wrote = True
        return self._send({"type": "http.response.body", "body": chunk, "more_body": True})  # type: ignore[misc]

    async def finish(self, last: bytes | None = None) -> None:
        """End the body, with ``last`` in the same write."""
        self.closed = True
        self.phase = WRITING
        self.wrote = True
        self.reply_deadline = math.inf
        await self._send({"type": "http.response.body", "body": last or b"", "more_body": False})  # type: ignore[misc]

    # --- stopping ---

    def stop(self, reason: Outcome) -> None:
        """End the producer (the first reason given is kept). A slot in a store call is not
        interrupted: the producer reads ``stop_reason`` when the call returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.reply_deadline = math.inf
        if self.phase != STORING and self.task is not None and not self._cancelled:
            # From the loop, not here: by then the producer may have returned (``task`` is
            # cleared as it does), and a cancel must never reach the writes that follow.
            self._lifecycle.loop.call_soon(self._cancel)

    def _cancel(self) -> None:
        task = self.task
        if task is not None and self.phase != STORING and not self._cancelled:
            self._cancelled = True
            task.cancel()

    def uncancel(self) -> bool:
        """After the producer's task caught a ``CancelledError``: True if the cancel was this
        slot's stop (now spent), False if it came from elsewhere and must propagate."""
        task = self.task
        return self._cancelled and task is not None and task.uncancel() == 0

    def abort(self, reason: Outcome) -> None:
        """The client stopped reading: drop the connection (a blocked write returns at once)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._send is None or not _abort_connection(self._send):
            self.stop(reason)

    def _listen(self) -> None:
        waiting = self._receive()  # type: ignore[misc]
        loop = self._lifecycle.loop
        # uvicorn's receive is a coroutine: a task of its own, without ensure_future's checks.
        self._waiter = waiter = (
            loop.create_task(waiting)
            if asyncio.iscoroutine(waiting)
            else asyncio.ensure_future(waiting, loop=loop)
        )
        waiter.add_done_callback(self._received)

    def _received(self, waiter: asyncio.Future[Message]) -> None:
        if waiter.cancelled() or self.closed:
            return
        if waiter.exception() is None and waiter.result()["type"] != "http.disconnect":
            self._listen()  # more request body nobody asked for: keep listening
            return
        self.disconnected = True
        if self.resume_window > 0 and self.stop_reason is None:
            self.away_until = self._lifecycle.loop.time() + self.resume_window  # the watchdog stops it
        else:
            self.stop("client_disconnected")

    @property
    def away(self) -> bool:
        """The client went away and the stream goes on, for a client that resumes it."""
        return self.away_until != math.inf

    def resumed(self) -> None:
        """A client is reading this stream's log: keep generating for another window."""
        if self.away:
            self.away_until = max(self.away_until, self._lifecycle.loop.time() + self.resume_window)

    async def _ping(self) -> None:
        try:
            if not self.closed and not self.disconnected:
                await self._send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})  # type: ignore[misc]
        except Exception as exc:  # the response ended while the ping waited to be written
            if not self.closed:
                log.warning("keepalive_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.ping = None


class Lifecycle:
    """Admits, tracks, watches, drains and stops one app's streams (module docstring)."""

    def __init__(self, deadlines: Deadlines, *, max_streams: int, gauge: OpenStreamsGauge) -> None:
        self.deadlines = deadlines
        self.max_streams = max_streams
        self._gauge = gauge
        self._slots: set[Slot] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._emptied = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        tick = deadlines.tick
        self._ping_after = max(1, math.floor(deadlines.keepalive / (2 * tick)))
        self._limits = {  # phase -> ticks without a write before the watchdog ends the stream
            FIRST_TOKEN: math.ceil(deadlines.first_token / tick),
            NEXT_TOKEN: math.ceil(deadlines.token_gap / tick),
            WRITING: math.ceil(deadlines.write / tick),
        }

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (the one the first admission ran in)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def open_streams(self) -> int:
        """Streams admitted and not yet released, in this worker."""
        return len(self._slots)

    def admit(self) -> Slot:
        """A slot for one more stream; ``ShuttingDown`` or ``ServerBusy`` if there is none."""
        if self.draining:
            raise ShuttingDown()
        if len(self._slots) >= self.max_streams:
            raise ServerBusy(
                f"{len(self._slots)} streams open in this worker; the limit is {self.max_streams}"
                " (CHATSSE_MAX_STREAMS_PER_WORKER)",
                retry_after=self.deadlines.busy_retry_after,
            )
        slot = Slot(self)
        self._slots.add(slot)
        self._gauge.inc()
        if self._ticker is None:
            self._ticker = self.loop.create_task(self._tick())
        return slot

    def release(self, slot: Slot) -> None:
        if slot in self._slots:
            self._slots.discard(slot)
            self._gauge.dec()
            if not self._slots:
                self._emptied.set()

    # --- the ticker: keepalive comments and the watchdog ---

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._slots:
                await asyncio.sleep(self.deadlines.tick)
                now = loop.time()
                for slot in list(self._slots):
                    self._check(slot, now)
        finally:
            self._ticker = None

    def _check(self, slot: Slot, now: float) -> None:
        if slot._send is None:  # not streaming yet
            return
        if slot.disconnected:  # gone: only a stream kept for resumption still has deadlines
            if slot.away and slot.stop_reason is None:
                self._check_away(slot, now)
            return
        if slot.ping is not None:
            slot.ping_ticks += 1
            if slot.ping_ticks >= self._limits[WRITING]:
                slot.abort("write_timeout")
                return
        phase = slot.phase
        if now >= slot.reply_deadline and phase != STORING:
            slot.stop("timeout")
            return
        if slot.wrote or phase != slot.seen_phase:
            slot.wrote, slot.seen_phase, slot.quiet = False, phase, 0
            return
        slot.quiet = quiet = slot.quiet + 1
        if phase == STORING:
            return
        if quiet >= self._limits[phase]:
            if phase == WRITING:
                slot.abort("write_timeout")
            else:
                slot.stop("engine_timeout")
        elif phase != WRITING and quiet % self._ping_after == 0 and slot.ping is None:
            slot.ping_ticks = 0
            slot.ping = self.loop.create_task(slot._ping())

    def _check_away(self, slot: Slot, now: float) -> None:
        """A stream whose client went away: the resume window, the reply and engine deadlines;
        no keepalive, no write deadline (its writes go nowhere)."""
        phase = slot.phase
        if phase == STORING:
            return
        if now >= slot.away_until:
            slot.stop("client_disconnected")
        elif now >= slot.reply_deadline:
            slot.stop("timeout")
        elif slot.wrote or phase != slot.seen_phase:
            slot.wrote, slot.seen_phase, slot.quiet = False, phase, 0
        elif phase != WRITING:
            slot.quiet += 1
            if slot.quiet >= self._limits[phase]:
                slot.stop("engine_timeout")

    # --- shutdown ---

    def drain(self) -> None:
        """Refuse new streams; give open ones the grace period, then stop each one still open
        (it ends with its ``shutdown`` event). Call in the server's event loop; idempotent."""
        if self.draining:
            return
        self.draining = True
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        if self._slots:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), self.deadlines.grace)
        for slot in list(self._slots):
            slot.stop("shutdown")

    async def aclose(self) -> None:
        """The app is stopping: drain if nobody did, wait (bounded) for the streams to end,
        then stop the background tasks."""
        self.drain()
        if self._slots:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), self.deadlines.server_shutdown)
        for task in (self._ticker, self._drainer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Stopped: the app may be served again, by another server and event loop.
        self._ticker = self._drainer = self._loop = None
        self.draining = False


def lifecycle_of(app: Any) -> Lifecycle | None:
    """The lifecycle of a chatsse app (None for any other ASGI app)."""
    lifecycle = getattr(app, "lifecycle", None)
    return lifecycle if isinstance(lifecycle, Lifecycle) else None

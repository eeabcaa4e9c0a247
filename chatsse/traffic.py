"""Mixed chat traffic, with what every client saw: the load of a soak or chaos run
(chatsse/soak.py, chatsse/chaos.py).

``concurrency`` simulated users, each running sessions back to back until the run ends
(closed loop, no think time). A session is one of:

- **chat**: a ``POST /chat`` conversation of 1 to ``max_turns`` turns. Each turn is read to its
  end, or its client drops the connection mid-stream and resumes it at once with
  ``Last-Event-ID`` (``drop``), or drops it and never comes back (``abandon``: the
  conversation ends there), or stops it with ``POST .../stop`` from another connection
  (``stop``).
- **responses**: a chain of ``POST /v1/responses`` (``store: true``, each turn's
  ``previous_response_id`` the turn before), streamed or not; a streamed turn may be dropped and
  resumed (``GET /v1/responses/{id}?stream=true&starting_after=``) or cancelled
  (``POST /v1/responses/{id}/cancel``).
- **completions**: ``POST /v1/chat/completions``, streamed or not, the client resending the
  history each turn (stateless: nothing is stored).
- **bad**: one request the server must refuse: invalid JSON (422), an unknown conversation
  (404), an oversized message (413), the wrong method (405), an unknown
  ``previous_response_id`` (404), a resume of an unknown reply (404).

Every request is one :class:`Exchange`: what was asked (its ``kind``), when, and how it ended
(``ending``): ``completed``, ``error:<type>`` (the stream's last event), ``closed`` (the
connection closed without a last event), ``dropped`` (the client left on purpose),
``http_<status>:<type>``, ``timeout``, ``connection`` or ``protocol_error``. An exchange that
did not end as its kind should has a ``problem``; for a bad request the refusal asked for is
expected, and anything else is a problem. A stream the server cut (``closed``) is resumed once,
as a client would, and the resume's ending is kept (``resumed``).

Every turn whose client saw its last event of success (``completed``, ``response.completed``
or ``response.incomplete``, a stored non-streamed response) goes into the run's ledger of
:class:`CompletedTurn`; :func:`missing_turns` reads each one back from its conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from chatsse import protocol
from chatsse.eventstream import EventStreamParser, ServerSentEvent

__all__ = [
    "BAD_KINDS",
    "KINDS",
    "PROBE",
    "CompletedTurn",
    "Exchange",
    "MissingTurn",
    "Mix",
    "Traffic",
    "TrafficRecord",
    "digest",
    "missing_turns",
]

# What an exchange asked for (Exchange.kind).
CHAT: Final = "chat"
CHAT_DROPPED: Final = "chat_dropped"  # the client dropped it mid-stream, to resume it
CHAT_ABANDONED: Final = "chat_abandoned"  # the client dropped it and never came back
CHAT_STOPPED: Final = "chat_stopped"  # a stream stopped by POST .../stop
CHAT_RESUME: Final = "chat_resume"  # GET <resume_url> with Last-Event-ID
STOP: Final = "stop"  # POST .../stop
COMPLETIONS: Final = "completions"
COMPLETIONS_STREAM: Final = "completions_stream"
RESPONSES: Final = "responses"
RESPONSES_STREAM: Final = "responses_stream"
RESPONSES_DROPPED: Final = "responses_dropped"
RESPONSES_CANCELLED: Final = "responses_cancelled"  # a stream cancelled by POST .../cancel
RESPONSES_RESUME: Final = "responses_resume"  # GET /v1/responses/{id}?stream=true&starting_after=
CANCEL: Final = "cancel"  # POST /v1/responses/{id}/cancel
PROBE: Final = "probe"  # a short /chat turn on a fresh connection (chaos: has the server recovered?)

# The bad requests, each with the refusal it must get: (status, error type).
BAD_KINDS: Final[dict[str, tuple[int, str]]] = {
    "bad_json": (422, "invalid_request"),
    "bad_conversation": (404, "conversation_not_found"),
    "bad_size": (413, "message_too_large"),
    "bad_method": (405, "method_not_allowed"),
    "bad_response_id": (404, "response_not_found"),
    "bad_resume": (404, "replay_not_found"),
}
KINDS: Final = (
    CHAT, CHAT_DROPPED, CHAT_ABANDONED, CHAT_STOPPED, CHAT_RESUME, STOP,
    COMPLETIONS, COMPLETIONS_STREAM,
    RESPONSES, RESPONSES_STREAM, RESPONSES_DROPPED, RESPONSES_CANCELLED, RESPONSES_RESUME, CANCEL,
    *BAD_KINDS, PROBE,
)  # fmt: skip

COMPLETED: Final = "completed"
CLOSED: Final = "closed"
DROPPED: Final = "dropped"

_MESSAGES = (
    "How do server-sent events work?",
    "What happens to a stream when its worker dies?",
    "Why does a chat server store the partial reply?",
    "How long should a resume window be?",
    "What does a soak test find that a load test does not?",
)
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete"})
_RESPONSE_FINISH = {"completed": "stop", "incomplete": "length", "cancelled": "stopped"}


def digest(text: str) -> str:
    """A short fingerprint of a reply's text: the ledger keeps this, not the text."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class Mix:
    """What the traffic sends: sessions by weight, then what happens within them."""

    chat: float = 5.0
    responses: float = 2.0
    completions: float = 2.0
    bad: float = 1.0
    max_turns: int = 4  # turns per session: 1 to this
    drop: float = 0.12  # a streamed, stored turn: dropped mid-stream and resumed at once
    abandon: float = 0.03  # ... dropped, never resumed (the session ends)
    stop: float = 0.08  # ... stopped (POST .../stop) or cancelled (/v1/responses/{id}/cancel)
    streamed: float = 0.7  # the OpenAI fronts: share of streamed requests

    def __post_init__(self) -> None:
        if min(self.chat, self.responses, self.completions, self.bad) < 0 or not (
            self.chat + self.responses + self.completions + self.bad > 0
        ):
            raise ValueError("session weights must be non-negative, and one positive")
        if not 0 <= self.drop + self.abandon + self.stop <= 1 or min(self.drop, self.abandon, self.stop) < 0:
            raise ValueError("drop, abandon and stop are shares of a turn: each >= 0, together <= 1")
        if self.max_turns < 1:
            raise ValueError("max_turns must be at least 1")


@dataclass(slots=True)
class Exchange:
    """One request and how it ended (module docstring). Times are ``time.monotonic()``."""

    kind: str
    started: float
    ended: float = 0.0
    status: int | None = None
    opened: float | None = None  # when its event stream began (a 200 stream)
    ending: str = ""
    problem: str | None = None  # None: it ended as its kind should
    resumed: str | None = None  # a stream the server cut, resumed once: how the resume ended
    after_cut: bool = False  # a resume of a stream the server cut (its ending is ``resumed`` there)
    detail: str | None = None  # the error's message (an error event, a refusal, an exception)

    @property
    def expected_refusal(self) -> bool:
        """A bad request, refused as it should be."""
        return self.kind in BAD_KINDS and self.problem is None

    def in_flight(self, at: float) -> bool:
        return self.started <= at < (self.ended or float("inf"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "started": self.started, "ended": self.ended, "status": self.status,
            "opened": self.opened, "ending": self.ending, "problem": self.problem, "resumed": self.resumed,
            "after_cut": self.after_cut, "detail": self.detail,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class CompletedTurn:
    """A turn whose client saw it succeed: it must be in its conversation."""

    front: str  # chat or responses
    conversation_id: str
    message_id: str
    content_digest: str
    finish_reason: str | None
    completed_at: float  # time.monotonic() when its client saw the end


@dataclass(frozen=True, slots=True)
class MissingTurn:
    turn: CompletedTurn
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "front": self.turn.front,
            "conversation_id": self.turn.conversation_id,
            "message_id": self.turn.message_id,
            "why": self.why,
        }


@dataclass
class TrafficRecord:
    """Everything one run sent and saw."""

    exchanges: list[Exchange] = field(default_factory=list)
    turns: list[CompletedTurn] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def extend(self, other: TrafficRecord) -> None:
        """Add a later run's record to this one."""
        self.exchanges += other.exchanges
        self.turns += other.turns
        self.ended = other.ended

    def by_kind(self, *, probes: bool = False) -> dict[str, int]:
        counts = Counter(e.kind for e in self.exchanges if probes or e.kind != PROBE)
        return {kind: counts[kind] for kind in KINDS if counts[kind]}

    def endings(self, exchanges: Iterable[Exchange] | None = None) -> dict[str, dict[str, int]]:
        """``{kind: {ending: count}}``."""
        table: dict[str, Counter[str]] = {}
        for e in self.exchanges if exchanges is None else exchanges:
            table.setdefault(e.kind, Counter())[e.ending] += 1
        return {kind: dict(sorted(c.items())) for kind, c in sorted(table.items())}

    def expected_refusals(self) -> dict[str, int]:
        """Bad requests refused as asked, by ``http_<status>:<type>``."""
        return dict(sorted(Counter(e.ending for e in self.exchanges if e.expected_refusal).items()))

    def problems(self, exchanges: Iterable[Exchange] | None = None) -> dict[str, int]:
        """Unexpected endings, by ``<kind>: <problem>``."""
        found = Counter(
            f"{e.kind}: {e.problem}"
            for e in (self.exchanges if exchanges is None else exchanges)
            if e.problem is not None
        )
        return dict(sorted(found.items()))

    def unexpected(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.problem is not None]


class _StreamCut(Exception):
    """The connection closed in the middle of an event stream."""


def _json(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text[:80]!r}")
    return value


async def _events(response: aiohttp.ClientResponse) -> AsyncGenerator[ServerSentEvent, None]:
    parser = EventStreamParser()
    try:
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                yield event
    except (aiohttp.ClientError, OSError) as exc:
        raise _StreamCut(f"{type(exc).__name__}: {exc}") from exc


async def _refused(exchange: Exchange, response: aiohttp.ClientResponse) -> None:
    """End ``exchange`` as ``http_<status>:<type>`` (chatsse's envelope, or OpenAI's code)."""
    kind, message = "?", None
    with contextlib.suppress(ValueError, aiohttp.ClientError):
        body = await response.json(content_type=None)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            kind, message = str(error.get("code") or error.get("type") or "?"), error.get("message")
    exchange.ending = f"http_{response.status}:{kind}"
    exchange.detail = None if message is None else str(message)[:300]


class _ChatReading:
    """What one /chat stream has said (across a drop and its resume)."""

    __slots__ = ("completed", "connected", "error", "events", "last_id", "parts")

    def __init__(self) -> None:
        self.connected: dict[str, Any] = {}
        self.parts: list[str] = []
        self.completed: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.last_id: str | None = None
        self.events = 0

    def take(self, event: ServerSentEvent) -> None:
        self.events += 1
        self.last_id = event.id
        name = event.event
        if name == protocol.MESSAGE:
            self.parts.append(_json(event.data)["delta"])
        elif name == protocol.CONNECTED:
            self.connected = _json(event.data)
        elif name == protocol.COMPLETED:
            self.completed = _json(event.data)
        elif name == protocol.ERROR:
            self.error = _json(event.data)

    @property
    def ended(self) -> bool:
        return self.completed is not None or self.error is not None

    def ending(self) -> str:
        if self.completed is not None:
            return COMPLETED
        if self.error is not None:
            return f"error:{self.error.get('type')}"
        return CLOSED

    @property
    def detail(self) -> str | None:
        return None if self.error is None else str(self.error.get("message"))[:300]


class _ResponseReading:
    """What one streamed response has said (across a drop and its resume)."""

    __slots__ = ("detail", "done_texts", "error", "events", "final", "parts", "response_id")

    def __init__(self) -> None:
        self.response_id: str | None = None
        self.parts: list[str] = []
        self.done_texts: list[str] = []
        self.final: dict[str, Any] | None = None
        self.error: str | None = None
        self.detail: str | None = None
        self.events = 0  # the next expected sequence_number

    def take(self, event: ServerSentEvent) -> None:
        payload = _json(event.data)
        if payload["sequence_number"] != self.events:
            raise ValueError(f"sequence_number {payload['sequence_number']}, expected {self.events}")
        self.events += 1
        kind = payload["type"]
        if kind == "response.output_text.delta":
            self.parts.append(payload["delta"])
        elif kind == "response.created":
            self.response_id = payload["response"]["id"]
        elif kind == "response.output_text.done":
            self.done_texts.append(payload["text"])
        elif kind in _RESPONSE_DONE:
            self.final = payload["response"]
        elif kind == "response.failed":
            error = payload["response"].get("error") or {}
            self.error, self.detail = str(error.get("code") or "failed"), str(error.get("message"))[:300]
        elif kind == "error":
            self.error, self.detail = str(payload.get("code") or "error"), str(payload.get("message"))[:300]

    @property
    def ended(self) -> bool:
        return self.final is not None or self.error is not None

    def ending(self) -> str:
        if self.error is not None:
            return f"error:{self.error}"
        return COMPLETED if self.final is not None else CLOSED


def _split_response_id(value: str) -> tuple[str, str]:
    """``resp_<conversation id>.<message id>`` (chatsse/openai/wire.py)."""
    conversation_id, separator, message_id = value.removeprefix("resp_").partition(".")
    if not value.startswith("resp_") or not separator:
        raise ValueError(f"not a chatsse response id: {value!r}")
    return conversation_id, message_id


class Traffic:
    """The mixed traffic against one server (module docstring); :meth:`run` sends it.

    ``max_message_size``: the server's ``CHATSSE_MAX_MESSAGE_SIZE`` (an oversized message is
    one byte more). ``request_timeout`` bounds every exchange. ``model``: the OpenAI fronts'
    model (``GET /v1/models``)."""

    def __init__(
        self,
        url: str,
        mix: Mix | None = None,
        *,
        concurrency: int = 50,
        seed: int = 0,
        max_message_size: int = 16_384,
        request_timeout: float = 30.0,
        model: str = "simulated",
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = url.rstrip("/")
        self.mix = mix or Mix()
        self.concurrency = concurrency
        self.seed = seed
        self.max_message_size = max_message_size
        self.request_timeout = request_timeout
        self.model = model
        self._runs = 0
        self._http: aiohttp.ClientSession | None = None
        self._record = TrafficRecord()
        self._tasks: set[asyncio.Task[None]] = set()
        self._streaming: dict[int, int] = {}  # id(exchange) -> its client port, while its stream is open

    # --- running ---

    async def run(self, duration: float | None = None, until: asyncio.Event | None = None) -> TrafficRecord:
        """Send the mix for ``duration`` seconds, or until ``until`` is set; sessions then end
        after their turn in flight (each bounded by ``request_timeout``)."""
        if duration is None and until is None:
            raise ValueError("a run needs a duration or an event that ends it")
        self._runs += 1
        record = self._record = TrafficRecord(started=time.monotonic())
        stopping = until or asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)  # the server keeps 5 s
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as http:
            self._http = http
            users = [asyncio.ensure_future(self._user(i, stopping)) for i in range(self.concurrency)]
            try:
                if duration is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), duration)
                    stopping.set()
                await asyncio.gather(*users)
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                for task in users:
                    task.cancel()
                await asyncio.gather(*users, return_exceptions=True)
                self._http = None
        record.ended = time.monotonic()
        return record

    async def probe(self, message: str = "probe", *, within: float | None = None) -> Exchange:
        """One short ``POST /chat`` turn on a fresh connection, read to its end (any worker may
        answer it) within ``within`` seconds (``request_timeout``); a completed one joins the
        ledger of the run in progress (or of the last run)."""
        record = self._record
        exchange = Exchange(PROBE, time.monotonic())
        connector = aiohttp.TCPConnector(force_close=True)
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                asyncio.timeout(self.request_timeout if within is None else within),
                http.post(f"{self.url}/chat", json={"message": message, "max_tokens": 4}) as response,
            ):
                exchange.status = response.status
                if response.status != 200:
                    await _refused(exchange, response)
                else:
                    exchange.opened = time.monotonic()
                    reading = _ChatReading()
                    async for event in _events(response):
                        reading.take(event)
                    exchange.ending, exchange.detail = reading.ending(), reading.detail
                    self._chat_turn_done(reading, record)
        except (Exception, asyncio.CancelledError) as exc:
            exchange.ending = self._failure(exc, exchange)
            exchange.detail = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            exchange.ended = time.monotonic()
            if exchange.ending != COMPLETED:
                exchange.problem = exchange.ending
            record.exchanges.append(exchange)
        return exchange

    async def _user(self, index: int, stopping: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1_000_003 + self._runs * 10_007 + index)
        mix = self.mix
        sessions = (self._chat_session, self._responses_session, self._completions_session, self._bad)
        weights = (mix.chat, mix.responses, mix.completions, mix.bad)
        while not stopping.is_set():
            session = rng.choices(sessions, weights)[0]
            await session(rng, stopping)

    def _message(self, rng: random.Random, turn: int) -> str:
        return f"{rng.choice(_MESSAGES)} (turn {turn + 1}, {rng.randrange(10**6)})"

    def _action(self, rng: random.Random) -> str:
        mix, draw = self.mix, rng.random()
        if draw < mix.drop:
            return "drop"
        if draw < mix.drop + mix.abandon:
            return "abandon"
        if draw < mix.drop + mix.abandon + mix.stop:
            return "stop"
        return "read"

    def open_stream_ports(self) -> set[int]:
        """The client's local ports of the streams open now: a chaos run finds the worker
        serving a stream by its connection (chatsse/chaos.py)."""
        return set(self._streaming.values())

    def _opened(self, exchange: Exchange, response: aiohttp.ClientResponse) -> None:
        exchange.opened = time.monotonic()
        transport = None if response.connection is None else response.connection.transport
        sockname = None if transport is None else transport.get_extra_info("sockname")
        if sockname:
            self._streaming[id(exchange)] = sockname[1]

    def _begin(self, kind: str) -> Exchange:
        exchange = Exchange(kind, time.monotonic())
        self._record.exchanges.append(exchange)
        return exchange

    def _failure(self, exc: BaseException, exchange: Exchange) -> str:
        """The ending of an exchange that raised."""
        if isinstance(exc, TimeoutError):
            return "timeout"
        if isinstance(exc, asyncio.CancelledError):
            return "cancelled"
        if isinstance(exc, _StreamCut):
            return CLOSED
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            return CLOSED if exchange.status is not None else "connection"
        if isinstance(exc, (ValueError, KeyError, TypeError)):
            return "protocol_error"
        raise exc

    @contextlib.asynccontextmanager
    async def _exchange(self, kind: str, *, after_cut: bool = False) -> AsyncIterator[Exchange]:
        """Time one exchange, bound it, and turn what it raised into its ending."""
        exchange = self._begin(kind)
        exchange.after_cut = after_cut
        try:
            async with asyncio.timeout(self.request_timeout):
                yield exchange
        except (Exception, asyncio.CancelledError) as exc:
            exchange.ending = self._failure(exc, exchange)
            exchange.detail = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            exchange.ended = time.monotonic()
            self._streaming.pop(id(exchange), None)

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "not running"
        return self._http

    # --- POST /chat ---

    async def _chat_session(self, rng: random.Random, stopping: asyncio.Event) -> None:
        conversation_id: str | None = None
        for turn in range(rng.randint(1, self.mix.max_turns)):
            if stopping.is_set():
                return
            conversation_id = await self._chat_turn(conversation_id, self._action(rng), rng, turn)
            if conversation_id is None:
                return

    async def _chat_turn(
        self, conversation_id: str | None, action: str, rng: random.Random, turn: int
    ) -> str | None:
        """One turn; the conversation to go on with, or None (it failed, or was abandoned)."""
        kind = {"drop": CHAT_DROPPED, "abandon": CHAT_ABANDONED, "stop": CHAT_STOPPED}.get(action, CHAT)
        body: dict[str, Any] = {"message": self._message(rng, turn)}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        cut = rng.randint(1, 12) if action in ("drop", "abandon") else None
        stop_after = rng.randint(2, 6) if action == "stop" else None
        reading = _ChatReading()
        stop: asyncio.Task[None] | None = None
        async with (
            self._exchange(kind) as exchange,
            self.http.post(f"{self.url}/chat", json=body) as response,
        ):
            exchange.status = response.status
            if response.status != 200:
                await _refused(exchange, response)
            else:
                self._opened(exchange, response)
                async with contextlib.aclosing(_events(response)) as events:
                    async for event in events:
                        reading.take(event)
                        if cut is not None and reading.events > cut and not reading.ended:
                            exchange.ending = DROPPED
                            response.close()  # the server sees a client that went away
                            break
                        if stop_after is not None and reading.events == stop_after and stop is None:
                            stop = self._spawn(self._stop(reading.connected))
                if exchange.ending != DROPPED:
                    exchange.ending, exchange.detail = reading.ending(), reading.detail
        if stop is not None:
            await stop
        return await self._chat_turn_end(exchange, reading, action)

    async def _chat_turn_end(self, exchange: Exchange, reading: _ChatReading, action: str) -> str | None:
        if exchange.ending == DROPPED:
            if action == "abandon":
                return None
            await self._chat_resume(reading)  # at once: well within the server's resume window
        elif exchange.ending == CLOSED and reading.connected:
            exchange.problem = CLOSED
            exchange.resumed = await self._chat_resume(reading, after_cut=True)  # as a client would
        elif exchange.ending != COMPLETED:
            exchange.problem = exchange.ending
            return None
        completed = reading.completed
        if completed is None:
            return None
        if "".join(reading.parts) != completed.get("content"):
            exchange.problem = "content_mismatch"
        elif action == "stop" and completed.get("finish_reason") not in ("stopped", "stop", "length"):
            exchange.problem = f"finish_reason {completed.get('finish_reason')}"
        self._chat_turn_done(reading, self._record)
        return None if exchange.problem is not None else str(completed["conversation_id"])

    def _chat_turn_done(self, reading: _ChatReading, record: TrafficRecord) -> None:
        completed = reading.completed
        if completed is None:
            return
        record.turns.append(
            CompletedTurn(
                "chat",
                str(completed["conversation_id"]),
                str(completed["message_id"]),
                digest(str(completed["content"])),
                completed.get("finish_reason"),
                time.monotonic(),
            )
        )

    async def _chat_resume(self, reading: _ChatReading, *, after_cut: bool = False) -> str:
        """Resume a /chat stream after its last event seen; its ending."""
        headers = {"Last-Event-ID": reading.last_id or ""}
        async with (
            self._exchange(CHAT_RESUME, after_cut=after_cut) as exchange,
            self.http.get(self.url + reading.connected["resume_url"], headers=headers) as response,
        ):
            exchange.status = response.status
            if response.status != 200:
                await _refused(exchange, response)
            else:
                self._opened(exchange, response)
                async for event in _events(response):
                    reading.take(event)
                exchange.ending, exchange.detail = reading.ending(), reading.detail
        if exchange.ending != COMPLETED:
            exchange.problem = exchange.ending
        return exchange.ending

    async def _stop(self, connected: dict[str, Any]) -> None:
        path = protocol.stop_path(connected["conversation_id"], connected["message_id"])
        answer: dict[str, Any] = {}
        async with self._exchange(STOP) as exchange, self.http.post(self.url + path) as response:
            exchange.status = response.status
            if response.status in (200, 202):
                answer = _json(await response.text())
                exchange.ending = f"http_{response.status}"
            else:
                await _refused(exchange, response)
        if exchange.ending == "http_202":
            exchange.problem = "not confirmed within 5 s (202)"
        elif exchange.ending != "http_200":
            exchange.problem = exchange.ending
        elif answer.get("stopped") and answer.get("finish_reason") != "stopped":
            exchange.problem = f"stopped with finish_reason {answer.get('finish_reason')}"

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- POST /v1/responses ---

    async def _responses_session(self, rng: random.Random, stopping: asyncio.Event) -> None:
        previous: str | None = None
        for turn in range(rng.randint(1, self.mix.max_turns)):
            if stopping.is_set():
                return
            if rng.random() < self.mix.streamed:
                previous = await self._responses_stream(previous, self._action(rng), rng, turn)
            else:
                previous = await self._responses_buffered(previous, rng, turn)
            if previous is None:
                return

    def _responses_body(self, previous: str | None, message: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "input": message, "stream": stream, "store": True}
        if previous is not None:
            body["previous_response_id"] = previous
        return body

    async def _responses_buffered(self, previous: str | None, rng: random.Random, turn: int) -> str | None:
        body = self._responses_body(previous, self._message(rng, turn), False)
        answer: dict[str, Any] = {}
        async with (
            self._exchange(RESPONSES) as exchange,
            self.http.post(f"{self.url}/v1/responses", json=body) as response,
        ):
            exchange.status = response.status
            if response.status != 200:
                await _refused(exchange, response)
            else:
                answer = _json(await response.text())
                exchange.ending = COMPLETED
        if exchange.ending != COMPLETED or answer.get("status") not in _RESPONSE_FINISH:
            exchange.problem = (
                exchange.ending if exchange.ending != COMPLETED else f"status {answer.get('status')}"
            )
            return None
        text = "".join(
            c.get("text", "") for item in answer.get("output", []) for c in item.get("content", [])
        )
        self._response_done(str(answer["id"]), text, str(answer["status"]))
        return str(answer["id"])

    def _response_done(self, response_id: str, text: str, status: str) -> None:
        conversation_id, message_id = _split_response_id(response_id)
        finish = _RESPONSE_FINISH.get(status)
        turn = CompletedTurn("responses", conversation_id, message_id, digest(text), finish, time.monotonic())
        self._record.turns.append(turn)

    async def _responses_stream(
        self, previous: str | None, action: str, rng: random.Random, turn: int
    ) -> str | None:
        kind = {"drop": RESPONSES_DROPPED, "abandon": RESPONSES_DROPPED, "stop": RESPONSES_CANCELLED}.get(
            action, RESPONSES_STREAM
        )
        body = self._responses_body(previous, self._message(rng, turn), True)
        cut = rng.randint(6, 20) if action in ("drop", "abandon") else None  # 5 events precede the text
        cancel_after = rng.randint(6, 10) if action == "stop" else None
        reading = _ResponseReading()
        cancel: asyncio.Task[None] | None = None
        async with (
            self._exchange(kind) as exchange,
            self.http.post(f"{self.url}/v1/responses", json=body) as response,
        ):
            exchange.status = response.status
            if response.status != 200:
                await _refused(exchange, response)
            else:
                self._opened(exchange, response)
                async with contextlib.aclosing(_events(response)) as events:
                    async for event in events:
                        reading.take(event)
                        if cut is not None and reading.events > cut and not reading.ended:
                            exchange.ending = DROPPED
                            response.close()
                            break
                        if cancel_after is not None and reading.events == cancel_after and cancel is None:
                            cancel = self._spawn(self._cancel(reading))
                if exchange.ending != DROPPED:
                    exchange.ending, exchange.detail = reading.ending(), reading.detail
        if cancel is not None:
            await cancel
        if exchange.ending == DROPPED:
            if action == "abandon":
                return None
            await self._responses_resume(reading)
        elif exchange.ending == CLOSED and reading.response_id is not None:
            exchange.problem = CLOSED
            exchange.resumed = await self._responses_resume(reading, after_cut=True)
        elif exchange.ending != COMPLETED:
            exchange.problem = exchange.ending
            return None
        final, response_id = reading.final, reading.response_id
        if final is None or response_id is None or reading.error is not None:
            return None
        if "".join(reading.parts) != "".join(reading.done_texts):
            exchange.problem = "content_mismatch"
        elif action == "stop" and final.get("status") not in ("cancelled", "completed", "incomplete"):
            exchange.problem = f"status {final.get('status')}"
        self._response_done(response_id, "".join(reading.parts), str(final.get("status")))
        return None if exchange.problem is not None else response_id

    async def _responses_resume(self, reading: _ResponseReading, *, after_cut: bool = False) -> str:
        url = f"{self.url}/v1/responses/{reading.response_id}"
        params = {"stream": "true", "starting_after": str(reading.events - 1)}
        async with (
            self._exchange(RESPONSES_RESUME, after_cut=after_cut) as exchange,
            self.http.get(url, params=params) as response,
        ):
            exchange.status = response.status
            if response.status != 200:
                await _refused(exchange, response)
            else:
                self._opened(exchange, response)
                async for event in _events(response):
                    reading.take(event)
                exchange.ending, exchange.detail = reading.ending(), reading.detail
        if exchange.ending != COMPLETED:
            exchange.problem = exchange.ending
        return exchange.ending

    async def _cancel(self, reading: _ResponseReading) -> None:
        answer: dict[str, Any] = {}
        async with (
            self._exchange(CANCEL) as exchange,
            self.http.post(f"{self.url}/v1/responses/{reading.response_id}/cancel") as response,
        ):
            exchange.status = response.status
            if response.status == 200:
                answer = _json(await response.text())
                exchange.ending = "http_200"
            else:
                await _refused(exchange, response)
        if exchange.ending != "http_200":
            exchange.problem = exchange.ending
        elif answer.get("status") not in ("cancelled", "completed", "incomplete"):
            exchange.problem = f"status {answer.get('status')}"

    # --- POST /v1/chat/completions ---

    async def _completions_session(self, rng: random.Random, stopping: asyncio.Event) -> None:
        history: list[dict[str, str]] = []
        for turn in range(rng.randint(1, self.mix.max_turns)):
            if stopping.is_set():
                return
            message = self._message(rng, turn)
            streamed = rng.random() < self.mix.streamed
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [*history, {"role": "user", "content": message}],
                "stream": streamed,
            }
            reply: str | None = None
            async with (
                self._exchange(COMPLETIONS_STREAM if streamed else COMPLETIONS) as exchange,
                self.http.post(f"{self.url}/v1/chat/completions", json=body) as response,
            ):
                exchange.status = response.status
                if response.status != 200:
                    await _refused(exchange, response)
                elif streamed:
                    self._opened(exchange, response)
                    reply, exchange.ending = await self._completion_chunks(response)
                else:
                    answer = _json(await response.text())
                    reply, exchange.ending = answer["choices"][0]["message"]["content"], COMPLETED
            if exchange.ending != COMPLETED or reply is None:
                exchange.problem = exchange.ending
                return
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]

    async def _completion_chunks(self, response: aiohttp.ClientResponse) -> tuple[str | None, str]:
        parts: list[str] = []
        async with contextlib.aclosing(_events(response)) as events:
            async for event in events:
                if event.data == "[DONE]":
                    return "".join(parts), COMPLETED
                payload = _json(event.data)
                if "error" in payload:
                    error = payload["error"] if isinstance(payload["error"], dict) else {}
                    return None, f"error:{error.get('code') or error.get('type') or '?'}"
                for choice in payload.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
        return None, CLOSED

    # --- requests the server must refuse ---

    async def _bad(self, rng: random.Random, stopping: asyncio.Event) -> None:
        kind = rng.choice(tuple(BAD_KINDS))
        url, method = f"{self.url}/chat", "POST"
        options: dict[str, Any] = {}
        if kind == "bad_json":
            options = {"data": b'{"message": "unfinished', "headers": {"Content-Type": "application/json"}}
        elif kind == "bad_conversation":
            options = {"json": {"message": "hello?", "conversation_id": f"nope{rng.randrange(10**9)}"}}
        elif kind == "bad_size":
            options = {"json": {"message": "x" * (self.max_message_size + 1)}}
        elif kind == "bad_method":
            method = "GET"
        elif kind == "bad_response_id":
            url = f"{self.url}/v1/responses"
            body = self._responses_body(f"resp_nope{rng.randrange(10**9)}.msg_nope", "hello?", False)
            options = {"json": body}
        else:
            url = self.url + protocol.resume_path(f"nope{rng.randrange(10**9)}", "msg_nope")
            method = "GET"
        async with (
            self._exchange(kind) as exchange,
            self.http.request(method, url, **options) as response,
        ):
            exchange.status = response.status
            await _refused(exchange, response)
        status, error_type = BAD_KINDS[kind]
        if exchange.ending != f"http_{status}:{error_type}":
            exchange.problem = exchange.ending


async def missing_turns(
    url: str, turns: Iterable[CompletedTurn], *, concurrency: int = 16, read_timeout: float = 30.0
) -> list[MissingTurn]:
    """Read every turn's conversation back (``GET /conversations/{id}``); the turns that are not
    there as their client saw them: the reply's id, role and content (and finish reason)."""
    by_conversation: dict[str, list[CompletedTurn]] = {}
    for turn in turns:
        by_conversation.setdefault(turn.conversation_id, []).append(turn)
    missing: list[MissingTurn] = []
    pending = list(by_conversation.items())
    base = url.rstrip("/")

    async def check(http: aiohttp.ClientSession) -> None:
        while pending:
            conversation_id, wanted = pending.pop()
            messages: dict[str, dict[str, Any]] | None = None
            why = ""
            for attempt in range(3):
                try:
                    async with (
                        asyncio.timeout(read_timeout),
                        http.get(f"{base}/conversations/{conversation_id}") as response,
                    ):
                        if response.status == 404:
                            why = "conversation not found"
                            break
                        if response.status == 200:
                            body = await response.json()
                            messages = {m["id"]: m for m in body["messages"]}
                            break
                        why = f"conversation unreadable: http_{response.status}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    why = f"conversation unreadable: {type(exc).__name__}"
                await asyncio.sleep(0.2 * (attempt + 1))
            for turn in wanted:
                found = None if messages is None else messages.get(turn.message_id)
                if found is None:
                    missing.append(MissingTurn(turn, why or "reply not in its conversation"))
                elif found["role"] != "assistant" or digest(found["content"]) != turn.content_digest:
                    missing.append(MissingTurn(turn, "stored content differs from what the client saw"))
                elif turn.finish_reason is not None and found["finish_reason"] != turn.finish_reason:
                    missing.append(MissingTurn(turn, f"stored finish_reason {found['finish_reason']}"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(check(http) for _ in range(concurrency)))
    return missing

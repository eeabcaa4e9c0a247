"""What the load client talks to: one streamed chat request per call, measured into a record.

Three protocols:

- :class:`ChatsseTarget`: chatsse's ``POST /chat`` (README, "Protocol"). Content events
  are ``event: message``; ``completed`` carries the usage; ``error`` ends a failed stream.
  A user's next turn sends the ``conversation_id`` from ``connected``.
- :class:`OpenAITarget`: OpenAI chat completions with ``"stream": true`` (vLLM,
  llama.cpp, Ollama, ...). Content is ``choices[0].delta.content``; usage comes in a
  last chunk (``stream_options.include_usage``); ``data: [DONE]`` ends the stream; an
  in-band ``{"error": {...}}`` chunk is a failure. The client keeps the message list,
  so a multi-turn user sends the whole history every turn.
- :class:`ResponsesTarget`: the OpenAI Responses API, ``POST /v1/responses`` with
  ``"stream": true, "store": true``. Every event's data has a ``type`` and a
  ``sequence_number`` (0, 1, 2, ...); content is ``response.output_text.delta``; the
  stream ends with ``response.completed`` or ``response.incomplete`` (both carry the
  usage), or fails with ``response.failed`` or an ``error`` event; there is no
  ``[DONE]``. The server keeps the conversation: a user's next turn sends the last
  response's id as ``previous_response_id``.

Hot path: bytes are read as they arrive (``iter_any``, never line by line) and fed to
:class:`~chatsse.eventstream.EventStreamParser`. A chunk costs one ``perf_counter``
call, and a content event one list append of that time: events in one chunk arrived
together. chatsse ``message`` events are not JSON-decoded unless their text is wanted
(``collect_text``, or an ``on_text`` callback); OpenAI chunks must be decoded to tell
content from role and usage chunks, and Responses events to check their sequence numbers.

Error types written to ``RequestRecord.error``:

==========================  ==============================================================
``http_<status>``           the response status was not 200
``stream_error:<type>``     the server ended the stream with an error (its ``type``;
                            Responses: the ``code`` of ``response.failed`` or ``error``)
``truncated``               the stream ended cleanly without ``completed`` / ``[DONE]`` /
                            ``response.completed`` / ``response.incomplete``
``content_mismatch``        ``collect_text``: the deltas differ from chatsse's ``content``
                            or from the Responses ``response.output_text.done`` texts
``protocol_error``          an event's data was not the JSON the protocol specifies, or a
                            Responses ``sequence_number`` was not the previous one + 1
``connection``              connecting failed, or the connection broke mid-stream
``timeout``                 the request did not finish within its time limit
``cancelled``               the run stopped it (end of the drain time, Ctrl-C)
==========================  ==============================================================
"""

from __future__ import annotations

import asyncio
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from chatsse import protocol
from chatsse.errors import ChatsseError
from chatsse.eventstream import EventStreamParser
from chatsse.loadmetrics import RequestRecord

__all__ = [
    "ChatsseTarget",
    "Conversation",
    "OpenAITarget",
    "ResponsesTarget",
    "Target",
    "TargetError",
    "endpoint_url",
]

TextCallback = Callable[[str], object]

_loads = json.loads
_CONNECTED, _MESSAGE, _COMPLETED, _ERROR = protocol.EVENTS

# Responses API event types (the ``type`` of each event's data).
_TEXT_DELTA = "response.output_text.delta"
_REASONING_DELTA = "response.reasoning_text.delta"
_TEXT_DONE = "response.output_text.done"
_RESPONSE_FINISHED = frozenset({"response.completed", "response.incomplete"})
_RESPONSE_FAILED = "response.failed"
_STREAM_ERROR = "error"


class TargetError(ChatsseError, RuntimeError):
    """The target cannot be used (e.g. no model could be discovered)."""


def endpoint_url(url: str, default_path: str) -> str:
    """``url`` itself when it names a path, else the server root plus ``default_path``.

    ``http://host:8000`` and ``http://host:8000/`` get the default path; for OpenAI
    targets an OpenAI-style base URL ending in ``/v1`` gets the rest of the default path
    (``/chat/completions``, ``/responses``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}"
    if not path:
        return base + default_path
    if default_path.startswith("/v1/") and path.endswith("/v1"):
        return base + path + default_path[3:]
    return base + parts.path


@dataclass(slots=True)
class Conversation:
    """One user's conversation, carried from turn to turn.

    ``conversation_id``: chatsse's id, from the first turn's ``connected`` event.
    ``history``: OpenAI targets, the messages sent so far (completed turns only).
    ``response_id``: Responses targets, the id of the last successful response (completed
    or incomplete), sent as the next turn's ``previous_response_id``.
    ``last_reply``: the last reply's text, when it was collected.
    """

    conversation_id: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    response_id: str | None = None
    last_reply: str | None = None


class Target(ABC):
    """A streaming chat endpoint. Subclasses read one protocol's stream."""

    protocol: ClassVar[str]
    default_path: ClassVar[str]

    def __init__(self, url: str, *, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.url = endpoint_url(url, self.default_path)
        self.max_tokens = max_tokens

    def describe(self) -> dict[str, Any]:
        """What a result file records about the target."""
        return {"protocol": self.protocol, "url": self.url, "max_tokens": self.max_tokens}

    async def prepare(self, http: aiohttp.ClientSession) -> None:  # noqa: B027 - an optional hook
        """Called once before a run, with the run's session; nothing to do by default."""

    def for_process(self, index: int) -> None:  # noqa: B027 - an optional hook
        """Called in client process ``index`` of a split run, on that process's copy of the
        target (unpickled from the parent's); nothing to do by default."""

    @abstractmethod
    def request_body(self, conversation: Conversation, message: str) -> dict[str, Any]:
        """The JSON body of the next turn."""

    @abstractmethod
    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        conversation: Conversation,
        message: str,
        record: RequestRecord,
        on_text: TextCallback | None,
    ) -> None:
        """Read a 200 response's event stream into ``record`` (and ``conversation``)."""

    async def request(
        self,
        http: aiohttp.ClientSession,
        conversation: Conversation,
        message: str,
        record: RequestRecord,
        *,
        time_limit: float | None = None,
        on_text: TextCallback | None = None,
    ) -> None:
        """Send one turn and fill ``record``; never raises except on cancellation.

        ``record.sent`` must already be set; ``time_limit`` bounds the whole exchange
        (``timeout`` error). ``on_text`` receives each content delta as
        it arrives (this decodes every content event).
        """
        try:
            async with (
                asyncio.timeout(time_limit),
                http.post(
                    self.url,
                    json=self.request_body(conversation, message),
                    headers={"Accept": "text/event-stream"},
                ) as response,
            ):
                record.headers_at = perf_counter()
                record.status = response.status
                if response.status != 200:
                    await response.read()
                    record.error = f"http_{response.status}"
                else:
                    await self._read_stream(response, conversation, message, record, on_text)
        except TimeoutError:  # asyncio's, and aiohttp's own timeouts subclass it
            record.error = "timeout"
        except (aiohttp.ClientError, OSError):
            record.error = "connection"
        except (ValueError, KeyError, TypeError, AttributeError):
            record.error = "protocol_error"  # malformed JSON or fields in an event
        except asyncio.CancelledError:
            if record.error is None:
                record.error = "cancelled"
            raise
        finally:
            if record.end is None:
                record.end = perf_counter()
            if record.first_token_at is None and record.token_times:
                record.first_token_at = record.token_times[0]


class _Reading:
    """What one chatsse turn's stream has said so far (across a drop and its resume)."""

    __slots__ = ("completed", "events", "failure", "last_id", "parts", "received", "resume_url")

    def __init__(self, parts: list[str] | None) -> None:
        self.parts = parts
        self.events = 0
        self.received = 0
        self.completed: dict[str, Any] | None = None
        self.failure: dict[str, Any] | None = None
        self.last_id: str | None = None
        self.resume_url: str | None = None


class ChatsseTarget(Target):
    """chatsse's ``POST /chat``.

    ``collect_text`` decodes every ``message`` event, keeps the reply in
    ``Conversation.last_reply`` and checks it equals ``completed.content``.

    ``drop_fraction`` (0 to 1): that share of streams is dropped (the connection closed)
    after a random number of tokens, from 1 to ``max_tokens`` (64 without it), and resumed at
    once from the ``connected`` event's ``resume_url`` with ``Last-Event-ID``. Each resume's
    latency, from the close to the first resumed event, goes to
    ``RequestRecord.resume_latencies``; the reply is checked against ``completed.content``
    (a gap or a duplicate is ``content_mismatch``). A reply shorter than its cut is not
    dropped. The server's resume window (``CHATSSE_RESUME_WINDOW``) must be above 0.
    """

    protocol = "chatsse"
    default_path = "/chat"

    def __init__(
        self,
        url: str,
        *,
        max_tokens: int | None = None,
        collect_text: bool = False,
        drop_fraction: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(url, max_tokens=max_tokens)
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be within [0, 1], got {drop_fraction}")
        self.collect_text = collect_text or drop_fraction > 0
        self.drop_fraction = drop_fraction
        self._seed = seed
        self._rng = random.Random(seed)
        self._http: aiohttp.ClientSession | None = None
        parts = urlsplit(self.url)
        self._origin = f"{parts.scheme}://{parts.netloc}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "collect_text": self.collect_text, "drop_fraction": self.drop_fraction}

    async def prepare(self, http: aiohttp.ClientSession) -> None:
        self._http = http  # resumes go through the run's session

    def for_process(self, index: int) -> None:
        # Each process draws its own drops (the same seed gives the same run).
        self._rng = random.Random(None if self._seed is None else f"{self._seed}:{index}")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_http": None}  # a session belongs to its process's run

    def request_body(self, conversation: Conversation, message: str) -> dict[str, Any]:
        body: dict[str, Any] = {"message": message}
        if conversation.conversation_id is not None:
            body["conversation_id"] = conversation.conversation_id
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def _cut(self) -> int | None:
        """Tokens after which to drop this stream, or None to read it whole."""
        if self.drop_fraction <= 0 or self._rng.random() >= self.drop_fraction:
            return None
        return self._rng.randint(1, self.max_tokens or 64)

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        conversation: Conversation,
        message: str,
        record: RequestRecord,
        on_text: TextCallback | None,
    ) -> None:
        reading = _Reading([] if self.collect_text or on_text is not None else None)
        cut = self._cut()
        dropped = await self._consume(response, conversation, record, reading, on_text, cut)
        if dropped:
            response.close()  # the connection goes: the server sees a client that left
            await self._resume(record, reading, on_text)
        record.end = perf_counter()
        record.events = reading.events
        record.bytes_received = reading.received
        tokens = len(record.token_times)
        completed, parts = reading.completed, reading.parts
        if completed is not None:
            usage = completed.get("usage") or {}
            tokens = usage.get("completion_tokens", tokens)
            record.prompt_tokens = usage.get("prompt_tokens")
            if parts is not None:
                reply = "".join(parts)
                conversation.last_reply = record.text = reply
                if reply != completed.get("content"):
                    record.error = "content_mismatch"
        elif reading.failure is not None:
            record.error = f"stream_error:{reading.failure.get('type') or 'unknown'}"
        else:
            record.error = "truncated"
        record.tokens = tokens

    async def _consume(
        self,
        response: aiohttp.ClientResponse,
        conversation: Conversation | None,
        record: RequestRecord,
        reading: _Reading,
        on_text: TextCallback | None,
        cut: int | None = None,
        resumed_from: float | None = None,
    ) -> bool:
        """Read events into ``reading``; True if it stopped at ``cut`` tokens (a drop)."""
        parser = EventStreamParser()
        feed = parser.feed
        add_token = record.token_times.append
        parts = reading.parts
        async for chunk in response.content.iter_any():
            now = perf_counter()
            reading.received += len(chunk)
            batch = feed(chunk)
            if not batch:
                continue
            if resumed_from is not None:
                record.resume_latencies.append(now - resumed_from)
                resumed_from = None
            reading.events += len(batch)
            for event in batch:
                name = event.event
                reading.last_id = event.id
                if name == _MESSAGE:
                    add_token(now)
                    if parts is not None:
                        delta: str = _loads(event.data)["delta"]
                        parts.append(delta)
                        if on_text is not None:
                            on_text(delta)
                    if cut is not None and len(record.token_times) >= cut:
                        return True
                elif name == _CONNECTED:
                    connected = _loads(event.data)
                    if conversation is not None:
                        conversation.conversation_id = connected.get("conversation_id")
                    reading.resume_url = connected.get("resume_url")
                elif name == _COMPLETED:
                    reading.completed = _loads(event.data)
                elif name == _ERROR:
                    reading.failure = _loads(event.data)
        return False

    async def _resume(self, record: RequestRecord, reading: _Reading, on_text: TextCallback | None) -> None:
        """The stream was dropped: take it up again after its last event."""
        if self._http is None or reading.resume_url is None or reading.last_id is None:
            raise ValueError("a dropped stream cannot be resumed: no session, or no connected event")
        dropped = perf_counter()
        headers = {"Accept": "text/event-stream", "Last-Event-ID": reading.last_id}
        async with self._http.get(self._origin + reading.resume_url, headers=headers) as response:
            if response.status != 200:
                await response.read()
                reading.failure = {"type": f"resume_http_{response.status}"}
                return
            await self._consume(response, None, record, reading, on_text, resumed_from=dropped)


class _ModelTarget(Target):
    """An OpenAI-style endpoint serving named models.

    ``model=None`` asks the server (``GET <base>/v1/models``, next to the endpoint) and
    uses its first model. ``collect_text``: see the subclasses.
    """

    def __init__(
        self, url: str, *, model: str | None = None, max_tokens: int | None = None, collect_text: bool = False
    ) -> None:
        super().__init__(url, max_tokens=max_tokens)
        self.model = model
        self.collect_text = collect_text

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model, "collect_text": self.collect_text}

    @property
    def models_url(self) -> str:
        """The endpoint URL with the default path's part after ``/v1`` replaced by ``/models``."""
        return self.url.removesuffix(self.default_path.removeprefix("/v1")) + "/models"

    async def prepare(self, http: aiohttp.ClientSession) -> None:
        if self.model is not None:
            return
        models_url = self.models_url
        try:
            async with asyncio.timeout(30), http.get(models_url) as response:
                listing = await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise TargetError(f"cannot list models at {models_url}: {exc!r}; pass a model") from exc
        models = listing.get("data") if isinstance(listing, dict) else None
        if not models:
            raise TargetError(f"no model listed at {models_url}; pass a model")
        self.model = str(models[0]["id"])


class OpenAITarget(_ModelTarget):
    """An OpenAI-compatible ``POST /v1/chat/completions`` with streaming.

    Reasoning deltas (``reasoning_content`` / ``reasoning``) count as tokens too: they
    are generated tokens, though not part of the reply text. The reply's text is always
    joined (the history needs it); ``collect_text`` also keeps it in ``RequestRecord.text``.
    """

    protocol = "openai"
    default_path = "/v1/chat/completions"

    def request_body(self, conversation: Conversation, message: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*conversation.history, {"role": "user", "content": message}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        conversation: Conversation,
        message: str,
        record: RequestRecord,
        on_text: TextCallback | None,
    ) -> None:
        parser = EventStreamParser()
        feed = parser.feed
        token_times = record.token_times
        add_token = token_times.append
        parts: list[str] = []
        add_part = parts.append
        events = 0
        received = 0
        done = False
        usage: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        async for chunk in response.content.iter_any():
            now = perf_counter()
            received += len(chunk)
            batch = feed(chunk)
            if not batch:
                continue
            events += len(batch)
            for event in batch:
                data = event.data
                if data == "[DONE]":
                    done = True
                    continue
                payload = _loads(data)
                if not isinstance(payload, dict):
                    continue
                choices = payload.get("choices")
                if choices:
                    delta = choices[0].get("delta") or {}
                    content = delta.get("content")
                    if content:
                        add_token(now)
                        add_part(content)
                        if on_text is not None:
                            on_text(content)
                    elif delta.get("reasoning_content") or delta.get("reasoning"):
                        add_token(now)
                if payload.get("usage"):
                    usage = payload["usage"]
                if "error" in payload:
                    failure = payload["error"] if isinstance(payload["error"], dict) else {}
        record.end = perf_counter()
        record.events = events
        record.bytes_received = received
        record.tokens = len(token_times)
        if usage is not None:
            record.tokens = usage.get("completion_tokens", record.tokens)
            record.prompt_tokens = usage.get("prompt_tokens")
        if failure is not None:
            record.error = f"stream_error:{failure.get('type') or failure.get('code') or 'unknown'}"
        elif not done:
            record.error = "truncated"
        else:
            reply = "".join(parts)
            conversation.last_reply = reply
            if self.collect_text:
                record.text = reply
            conversation.history.append({"role": "user", "content": message})
            conversation.history.append({"role": "assistant", "content": reply})


class ResponsesTarget(_ModelTarget):
    """The OpenAI Responses API, ``POST /v1/responses`` with streaming.

    Events are told apart by their data's ``type`` (the ``event:`` line is not needed).
    Each ``response.output_text.delta`` is a token; ``response.reasoning_text.delta``
    counts too (generated, though not reply text). ``collect_text`` joins the deltas'
    text into ``Conversation.last_reply`` and checks it equals the
    ``response.output_text.done`` texts. A turn that ends without error (``completed`` or
    ``incomplete``, e.g. at ``max_output_tokens``) moves ``Conversation.response_id`` on.
    """

    protocol = "responses"
    default_path = "/v1/responses"

    def request_body(self, conversation: Conversation, message: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "input": message, "stream": True, "store": True}
        if conversation.response_id is not None:
            body["previous_response_id"] = conversation.response_id
        if self.max_tokens is not None:
            body["max_output_tokens"] = self.max_tokens
        return body

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        conversation: Conversation,
        message: str,
        record: RequestRecord,
        on_text: TextCallback | None,
    ) -> None:
        parser = EventStreamParser()
        feed = parser.feed
        token_times = record.token_times
        add_token = token_times.append
        parts: list[str] | None = [] if self.collect_text or on_text is not None else None
        done_texts: list[str] = []
        events = 0  # also the next expected sequence_number: they count the events from 0
        received = 0
        final: dict[str, Any] | None = None  # the response object of the last response.* event
        failure: dict[str, Any] | None = None
        async for chunk in response.content.iter_any():
            now = perf_counter()
            received += len(chunk)
            for event in feed(chunk):
                payload = _loads(event.data)
                if payload["sequence_number"] != events:
                    raise ValueError(f"sequence_number {payload['sequence_number']}, expected {events}")
                events += 1
                kind = payload["type"]
                if kind == _TEXT_DELTA:
                    add_token(now)
                    if parts is not None:
                        delta: str = payload["delta"]
                        parts.append(delta)
                        if on_text is not None:
                            on_text(delta)
                elif kind == _REASONING_DELTA:
                    add_token(now)
                elif kind == _TEXT_DONE:
                    done_texts.append(payload["text"])
                elif kind in _RESPONSE_FINISHED:
                    final = payload["response"]
                elif kind == _RESPONSE_FAILED:
                    final = payload["response"]
                    failure = final.get("error") or {}
                elif kind == _STREAM_ERROR:
                    failure = payload
        record.end = perf_counter()
        record.events = events
        record.bytes_received = received
        usage = (final.get("usage") if final is not None else None) or {}
        record.tokens = usage.get("output_tokens", len(token_times))
        record.prompt_tokens = usage.get("input_tokens")
        if failure is not None:
            record.error = f"stream_error:{failure.get('code') or 'unknown'}"
            return
        if final is None:
            record.error = "truncated"
            return
        if parts is not None:
            reply = "".join(parts)
            conversation.last_reply = record.text = reply
            if reply != "".join(done_texts):
                record.error = "content_mismatch"
                return
        conversation.response_id = final["id"]

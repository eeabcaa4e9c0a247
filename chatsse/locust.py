"""Locust users that stream chat turns and report TTFT, ITL and E2E as Locust request types.

``chatsse load`` runs on one machine; Locust's distributed mode (``--master``, ``--worker``)
is an existing engine for many. These users give it chatsse's protocols, so any number of
Locust workers can drive a chatsse server, or any OpenAI-compatible one::

    from chatsse.locust import ChatsseUser   # in a locustfile (scripts/locustfile.py)

- :class:`ChatsseUser`: ``POST /chat``; a conversation of ``turns`` turns, each sending the
  ``conversation_id`` of the first turn's ``connected`` event.
- :class:`OpenAIChatUser`: ``POST /v1/chat/completions`` with ``"stream": true`` and
  ``stream_options.include_usage``; the client resends the history each turn.
- :class:`OpenAIResponsesUser`: ``POST /v1/responses``, each turn chaining the last
  ``previous_response_id``.

Rows in Locust's statistics (``Type`` / ``Name``, the name being the endpoint's path):

- ``POST``: Locust's own row, one request per turn, timed to the response headers. A turn
  that fails is a failure here, with its reason: :class:`TurnRefused` (an HTTP status other
  than 200 before the stream, with the server's error type), :class:`StreamFailed` (the
  server ended the stream with an error event), :class:`StreamCut` (the stream ended, or the
  connection broke, before its last event), :class:`ProtocolViolation` (event data that is
  not the protocol's JSON), or the connection error itself.
- ``TTFT``: send -> the first content event. ``ITL``: one sample per gap between consecutive
  content events. ``E2E``: send -> the end of the response stream. These cover completed
  turns only, with the definitions of ``chatsse load`` (chatsse/loadmetrics.py): a content
  event is ``event: message``, an OpenAI chunk with ``delta.content`` (or reasoning; the
  role-only first chunk is not a token), a ``response.output_text.delta``. So a completed
  turn of n content events gives one TTFT, n - 1 ITLs and one E2E.

Locust keeps response times rounded to two significant digits (whole ms below 100 ms) and
computes its percentiles from those buckets, so they are coarser than ``chatsse load``'s;
the quantities are the same. The request bodies are ``chatsse load``'s
(chatsse/loadtargets.py).

**Why HttpUser, not FastHttpUser.** A stream must be read as it arrives: every event's time
is its arrival. ``FastHttpUser``'s streaming read, ``iter_content(chunk_size)``, waits for
``chunk_size`` bytes (geventhttpclient's ``read(n)`` loops until it has them), so it batches
events and would report them late; its ``readline`` splits on CRLF, which SSE need not
send, and a per-event read needs a private attribute. ``HttpUser`` (requests, urllib3) with
``stream=True`` and ``iter_content(chunk_size=None)`` yields each HTTP chunk of a chunked
response as it arrives, and a server sends an event per chunk. FastHttpUser's advantage is
a cheaper request, which a stream of many events amortises: measured per event (client CPU,
gevent, EventStreamParser included, chatsse streams of about 1000 tokens), requests took 6.5-7.5 us
and geventhttpclient's line reads 9-11 us.

Per event the loop costs one ``perf_counter()`` per chunk, the parser, and a list append
per content event; Locust's events are fired once the turn has completed.

Settings are class attributes (subclass to change them), overridden by Locust options
(``--chat-message``, ``--chat-max-tokens``, ``--chat-turns``, ``--chat-think-time``,
``--chat-api-key``, ``--chat-model``; also as ``LOCUST_CHAT_*`` environment variables or in
a Locust config file). Importing this module imports Locust, which
monkey-patches the standard library for gevent: import it from a locustfile only; nothing
else in chatsse imports it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from itertools import pairwise
from time import perf_counter
from typing import Any, ClassVar
from urllib.parse import urlsplit

import gevent  # type: ignore[import-untyped]  # no types shipped
from locust import HttpUser, events, task
from locust.clients import ResponseContextManager
from requests import RequestException, Response

from chatsse import protocol
from chatsse.errors import ChatsseError
from chatsse.eventstream import EventStreamParser, ServerSentEvent
from chatsse.loadtargets import (
    ChatsseTarget,
    Conversation,
    OpenAITarget,
    ResponsesTarget,
    Target,
    TargetError,
)

__all__ = [
    "DEFAULT_MESSAGE",
    "ChatUser",
    "ChatsseUser",
    "OpenAIChatUser",
    "OpenAIResponsesUser",
    "ProtocolViolation",
    "StreamCut",
    "StreamFailed",
    "TurnError",
    "TurnRefused",
]

DEFAULT_MESSAGE = "Tell me about server-sent events."

_loads = json.loads
_CONNECTED, _MESSAGE, _COMPLETED, _ERROR = protocol.EVENTS
# The Responses API's token events: reply text, and reasoning (generated, though not the reply).
_TOKEN_DELTAS = frozenset({"response.output_text.delta", "response.reasoning_text.delta"})
_RESPONSE_FINISHED = frozenset({"response.completed", "response.incomplete"})
_RESPONSE_FAILED = "response.failed"

# The model each OpenAI endpoint listed first, asked once per process.
_models: dict[str, str] = {}


class TurnError(ChatsseError):
    """Why a turn failed: the exception of its failure in Locust's statistics."""


class TurnRefused(TurnError):
    """The server answered with an HTTP status other than 200, before any stream."""


class StreamFailed(TurnError):
    """The server ended the stream with an error event."""


class StreamCut(TurnError):
    """The stream ended, or the connection broke, before the protocol's last event."""


class ProtocolViolation(TurnError):
    """An event's data was not the JSON the protocol specifies."""


def _number(name: str, value: Any, kind: type[int] | type[float], least: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number < least:
        raise ValueError(f"{name} must be at least {least}, got {value!r}")
    return number


def _parse(name: str, kind: type[int] | type[float], least: float) -> Callable[[str], Any]:
    """An option's ``type``: the command line refuses a bad value at once (values typed in the
    web UI arrive as text, and are checked when a user starts)."""

    def parse(text: str) -> Any:
        try:
            return _number(name, text, kind, least)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# The options: the class attribute each one overrides, how its text is read, what it is.
_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "message": (str, "the message of every turn"),
    "max_tokens": (_parse("max_tokens", int, 1), "reply tokens at most"),
    "turns": (_parse("turns", int, 1), "turns per conversation"),
    "think_time": (_parse("think_time", float, 0), "seconds between a user's turns"),
    "api_key": (str, "sent as Authorization: Bearer"),
    "model": (str, "OpenAI users: the model (unset: the first GET /v1/models lists)"),
}


def _add_options(parser: Any, **_kwargs: Any) -> None:
    # On the parser itself, not a group: only Locust's own add_argument takes is_secret.
    for attribute, (kind, meaning) in _OPTIONS.items():
        parser.add_argument(
            "--chat-" + attribute.replace("_", "-"),
            env_var=f"LOCUST_CHAT_{attribute.upper()}",
            type=kind,
            is_secret=attribute == "api_key",
            help=meaning,
        )


events.init_command_line_parser.add_listener(_add_options)  # type: ignore[no-untyped-call]


def _refresh_loop_time(**_kwargs: Any) -> None:
    """Locust's ``--run-time`` timer counts from gevent's cached loop time, which stands still
    until the loop first runs: the seconds Locust takes to start on a busy machine were cut
    from the run (a 3 s run lasted 0.1 s). Refreshed when Locust is ready to start."""
    gevent.get_hub().loop.update_now()


events.init.add_listener(_refresh_loop_time)  # type: ignore[no-untyped-call]


class _Turn:
    """What one turn's stream has said so far."""

    __slots__ = ("end", "failure", "finished", "parts", "received", "token_times")

    def __init__(self) -> None:
        self.token_times: list[float] = []  # arrival of every content event
        self.parts: list[str] = []  # the reply's text, where the next turn needs it
        self.received = 0
        self.finished = False  # the protocol's last event of success arrived
        self.failure: str | None = None  # the error event's type
        self.end = 0.0


class ChatUser(HttpUser):
    """A user that streams chat turns; one Locust task is one turn.

    Subclasses say which endpoint (``make_target``) and how its events read (``_on_event``).
    Call :meth:`chat_turn` from a task of your own to send other messages.
    """

    abstract = True

    message: str = DEFAULT_MESSAGE
    """The user message of every turn."""
    max_tokens: int | None = None
    """Reply tokens at most; None: the server's default."""
    turns: int = 1
    """Turns per conversation; then the user starts a new one (a failed turn ends it too)."""
    think_time: float = 0.0
    """Seconds between the end of a turn and the next (Locust's ``wait_time``)."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; chatsse asks for one when it has a keys file."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    """Seconds the server may stay silent, before the headers or between two reads."""

    last_event: ClassVar[str]
    """The event that ends a successful stream, for :class:`StreamCut`'s message."""

    conversation: Conversation
    """The current conversation (what its next turn must send)."""
    turns_sent: int
    """Turns sent in the current conversation."""
    _target: Target | None = None
    _name: str  # the endpoint's path: the Name of its rows
    _headers: dict[str, str]

    def wait_time(self) -> float:
        return self.think_time

    def make_target(self, url: str) -> Target:
        """The endpoint at ``url`` (Locust's host), which writes each turn's request body."""
        raise NotImplementedError

    def on_start(self) -> None:
        self.conversation, self.turns_sent = Conversation(), 0
        options = self.environment.parsed_options
        if options is not None:
            self._apply_options(vars(options))
        self.turns = _number("turns", self.turns, int, 1)
        self.think_time = _number("think_time", self.think_time, float, 0)
        if self.max_tokens is not None:
            self.max_tokens = _number("max_tokens", self.max_tokens, int, 1)
        self._headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"
        if self.host is None:  # HttpUser has refused to start without one
            raise TargetError("no host: pass --host or set the class's host")
        self._target = self.make_target(self.host)
        self._name = urlsplit(self._target.url).path

    def _apply_options(self, options: dict[str, Any]) -> None:
        for attribute in _OPTIONS:
            value = options.get(f"chat_{attribute}")
            if value is not None and value != "" and hasattr(self, attribute):
                setattr(self, attribute, value)

    @task
    def turn(self) -> None:
        self.chat_turn()

    def chat_turn(self, message: str | None = None) -> bool:
        """Send one turn of the current conversation, read its stream, report it to Locust;
        True if it completed."""
        target = self._target
        if target is None:
            raise RuntimeError("chat_turn() before on_start()")
        if self.turns_sent >= self.turns:
            self.conversation, self.turns_sent = Conversation(), 0
        self.turns_sent += 1
        message = self.message if message is None else message
        body = target.request_body(self.conversation, message)
        turn = _Turn()
        sent = perf_counter()
        response = self.client.post(
            target.url,
            name=self._name,
            json=body,
            headers=self._headers,
            stream=True,
            catch_response=True,
            timeout=(self.connect_timeout, self.read_timeout),
        )
        with response:
            try:
                failure = self._read(response, turn, message)
            finally:
                response.close()
            if failure is not None:
                response.failure(failure)  # type: ignore[no-untyped-call]  # locust leaves it untyped
        if failure is not None or response.status_code != 200:
            self.turns_sent = self.turns  # the conversation ends with a failed turn
            return False
        self._report(sent, turn)
        return True

    def _read(self, response: ResponseContextManager, turn: _Turn, message: str) -> TurnError | None:
        """Read the response; the turn's failure, or None (also for a connection error,
        which Locust reports itself)."""
        status = response.status_code
        if status == 0:
            return None
        if status != 200:
            return TurnRefused(f"HTTP {status} {_error_type(response)}")
        try:
            self._consume(response.iter_content(chunk_size=None), turn)
        except RequestException as exc:
            return StreamCut(f"the connection broke mid-stream: {type(exc).__name__}")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            return ProtocolViolation(f"{type(exc).__name__}: {exc}")
        if turn.failure is not None:
            return StreamFailed(f"error event: {turn.failure}")
        if not turn.finished:
            return StreamCut(f"the stream ended without {self.last_event}")
        self._completed(turn, message)
        return None

    def _consume(self, chunks: Iterable[bytes], turn: _Turn) -> None:
        feed = EventStreamParser().feed
        on_event = self._on_event
        received = 0
        for chunk in chunks:
            now = perf_counter()
            received += len(chunk)
            for event in feed(chunk):
                on_event(event, now, turn)
        turn.end = perf_counter()
        turn.received = received

    def _on_event(self, event: ServerSentEvent, now: float, turn: _Turn) -> None:
        raise NotImplementedError

    def _completed(self, turn: _Turn, message: str) -> None:
        """A turn completed: carry what the next turn needs."""

    def _report(self, sent: float, turn: _Turn) -> None:
        fire = self.environment.events.request.fire
        name = self._name
        context = self.context()
        times = turn.token_times
        if times:
            fire(
                request_type="TTFT",
                name=name,
                response_time=(times[0] - sent) * 1000,
                response_length=0,
                exception=None,
                context=context,
            )
            for previous, current in pairwise(times):
                fire(
                    request_type="ITL",
                    name=name,
                    response_time=(current - previous) * 1000,
                    response_length=0,
                    exception=None,
                    context=context,
                )
        fire(
            request_type="E2E",
            name=name,
            response_time=(turn.end - sent) * 1000,
            response_length=turn.received,
            exception=None,
            context=context,
        )


def _error_type(response: Response) -> str:
    """The error type of a refusal's JSON body: chatsse's ``type``, or the ``code`` under which
    OpenAI-style servers (chatsse's ``/v1`` too) name the error."""
    try:
        error = response.json()["error"]
        return str(error.get("code") or error.get("type") or response.reason)
    except (ValueError, KeyError, TypeError, AttributeError):
        return str(response.reason)


class ChatsseUser(ChatUser):
    """chatsse's ``POST /chat``: a conversation continues with the ``conversation_id`` of its
    first turn's ``connected`` event."""

    last_event = f"a {_COMPLETED} event"

    def make_target(self, url: str) -> Target:
        return ChatsseTarget(url, max_tokens=self.max_tokens)

    def _on_event(self, event: ServerSentEvent, now: float, turn: _Turn) -> None:
        name = event.event
        if name == _MESSAGE:
            turn.token_times.append(now)
        elif name == _CONNECTED:
            self.conversation.conversation_id = _loads(event.data)["conversation_id"]
        elif name == _COMPLETED:
            turn.finished = True
        elif name == _ERROR:
            turn.failure = _loads(event.data).get("type") or "unknown"


class _ModelUser(ChatUser):
    """An OpenAI-style endpoint: ``model`` None asks ``GET .../v1/models`` for the first one,
    once per process."""

    abstract = True
    model: str | None = None

    def make_target(self, url: str) -> Target:
        target = self._model_target(url)
        if target.model is None:
            target.model = _models.get(target.models_url) or self._discover(target.models_url)
        return target

    def _model_target(self, url: str) -> OpenAITarget | ResponsesTarget:
        raise NotImplementedError

    def _discover(self, models_url: str) -> str:
        with self.client.get(
            models_url,
            name=urlsplit(models_url).path,
            headers=self._headers,
            catch_response=True,
            timeout=(self.connect_timeout, self.read_timeout),
        ) as response:
            try:
                model = str(response.json()["data"][0]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                failure = TurnRefused(f"HTTP {response.status_code}: no model listed")
                response.failure(failure)
                raise TargetError(f"no model listed at {models_url}; pass --chat-model") from None
        _models[models_url] = model
        return model


class OpenAIChatUser(_ModelUser):
    """OpenAI chat completions, streamed (vLLM, llama.cpp, Ollama, chatsse's ``/v1``)."""

    last_event = "data: [DONE]"

    def _model_target(self, url: str) -> OpenAITarget:
        return OpenAITarget(url, model=self.model, max_tokens=self.max_tokens)

    def _on_event(self, event: ServerSentEvent, now: float, turn: _Turn) -> None:
        data = event.data
        if data == "[DONE]":
            turn.finished = True
            return
        payload = _loads(data)
        choices = payload.get("choices")
        if choices:
            delta = choices[0].get("delta") or {}
            content = delta.get("content")
            if content:
                turn.token_times.append(now)
                turn.parts.append(content)
            elif delta.get("reasoning_content") or delta.get("reasoning"):
                turn.token_times.append(now)
        if "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {}
            turn.failure = str(error.get("code") or error.get("type") or "unknown")

    def _completed(self, turn: _Turn, message: str) -> None:
        history = self.conversation.history
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": "".join(turn.parts)})


class OpenAIResponsesUser(_ModelUser):
    """The OpenAI Responses API, streamed and stored: each turn sends the last response's id
    as ``previous_response_id``."""

    last_event = "response.completed or response.incomplete"

    def _model_target(self, url: str) -> ResponsesTarget:
        return ResponsesTarget(url, model=self.model, max_tokens=self.max_tokens)

    def _on_event(self, event: ServerSentEvent, now: float, turn: _Turn) -> None:
        payload = _loads(event.data)
        kind = payload["type"]
        if kind in _TOKEN_DELTAS:
            turn.token_times.append(now)
        elif kind in _RESPONSE_FINISHED:
            turn.finished = True
            self.conversation.response_id = payload["response"]["id"]
        elif kind == _RESPONSE_FAILED:
            turn.failure = (payload["response"].get("error") or {}).get("code") or "unknown"
        elif kind == "error":
            turn.failure = payload.get("code") or "unknown"

"""chatsse's wire protocol: every name a client of ``POST /chat`` sees, in one place.

Event names, the keys of each event's data, the event id format, the error envelope, the
error types (before a stream: with their HTTP status; during one: with the finish reason of
the stored reply) and how each stream can end. The server's encoder (chatsse/chat.py), the
load client's chatsse target, the workbook, the chat page (its constants are generated from
:func:`page_constants`) and the benchmarks' reference servers all take them from here; the
README's protocol tables list the same names (tests/test_readme.py checks).

Wire format of one event (chatsse/sse.py encodes it)::

    id: <message id>:<position>
    event: <name>
    retry: <ms>                (connected only)
    data: <one line of JSON>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict, get_args

__all__ = [
    "COMPLETED",
    "CONNECTED",
    "ENDINGS",
    "ERROR",
    "EVENTS",
    "EVENT_DATA",
    "HTTP_ERRORS",
    "ID_SEPARATOR",
    "INTERRUPTED",
    "MESSAGE",
    "RESUME_ERRORS",
    "STREAM_LOST",
    "CompletedData",
    "ConnectedData",
    "Ending",
    "ErrorData",
    "FinishReason",
    "MessageData",
    "Outcome",
    "Timings",
    "Usage",
    "error_body",
    "error_body_for",
    "error_envelope",
    "event_id",
    "openai_error_data",
    "page_constants",
    "parse_event_id",
    "resume_path",
    "stop_path",
]

# --- events, in stream order ---------------------------------------------------------------

CONNECTED: Final = "connected"
MESSAGE: Final = "message"
COMPLETED: Final = "completed"
ERROR: Final = "error"
EVENTS: Final = (CONNECTED, MESSAGE, COMPLETED, ERROR)

FinishReason = Literal["stop", "length", "stopped", "interrupted", "timeout", "error", "shutdown", "lost"]
"""A stored reply's finish reason. ``lost``: the turn never stored its reply (its worker died,
or its store call never answered) and a later turn took the conversation over."""


class ConnectedData(TypedDict):
    conversation_id: str
    user_message_id: str
    message_id: str  # the reply's id, the stream's id
    model: str
    created: float  # Unix time of the user message
    resume_url: str  # GET it, with Last-Event-ID, to resume this stream (on any worker)


class MessageData(TypedDict):
    delta: str


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(TypedDict):
    ttft_ms: float | None  # request arrival to the first token sent
    total_ms: float  # request arrival to the reply stored


class CompletedData(TypedDict):
    conversation_id: str
    message_id: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class ErrorData(TypedDict):
    type: str
    message: str
    message_id: str


EVENT_DATA: Final[dict[str, type]] = {
    CONNECTED: ConnectedData,
    MESSAGE: MessageData,
    COMPLETED: CompletedData,
    ERROR: ErrorData,
}

# --- event ids ------------------------------------------------------------------------------

ID_SEPARATOR: Final = ":"


def event_id(message_id: str, position: int) -> str:
    """An event's id: the stream (the reply's message id) and the event's place in it, from 0."""
    return f"{message_id}{ID_SEPARATOR}{position}"


def parse_event_id(value: str) -> tuple[str, int]:
    """``(message_id, position)`` of an event id; ValueError if it is not one."""
    message_id, separator, position = value.rpartition(ID_SEPARATOR)
    if not separator or not message_id or not position.isdigit():
        raise ValueError(f"not a chatsse event id: {value!r}")
    return message_id, int(position)


def resume_path(conversation_id: str, message_id: str) -> str:
    """Where a reply's stream can be resumed: ``GET`` with ``Last-Event-ID``."""
    return f"/conversations/{conversation_id}/messages/{message_id}/events"


def stop_path(conversation_id: str, message_id: str) -> str:
    """Where a streaming reply can be stopped, from any worker: ``POST``."""
    return f"/conversations/{conversation_id}/messages/{message_id}/stop"


# --- errors before a stream: HTTP status and JSON envelope ----------------------------------

HTTP_ERRORS: Final[dict[str, int]] = {
    "conversation_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "conversation_busy": 409,
    "conversation_full": 409,
    "request_timeout": 408,
    "message_too_large": 413,
    "request_too_large": 413,
    "invalid_request": 422,
    "headers_too_large": 431,
    "server_busy": 503,
    "conversation_limit": 503,
    "shutting_down": 503,
    "storage_unavailable": 503,
    "internal_error": 500,
    # API keys and their limits (chatsse/auth.py, chatsse/limits/)
    "invalid_api_key": 401,
    "permission_denied": 403,
    "rate_limit_exceeded": 429,
    # Resuming a stream (GET /conversations/{id}/messages/{message_id}/events)
    "replay_not_found": 404,
    "replay_expired": 410,
    # The OpenAI fronts (chatsse/openai/), and an upstream model (chatsse/upstream.py)
    "invalid_parameter": 400,
    "model_not_found": 404,
    "response_not_found": 404,
    "response_not_latest": 409,
    "upstream_rejected": 400,
    "upstream_rate_limited": 429,
    "upstream_error": 502,
    "upstream_unavailable": 503,
    "upstream_timeout": 504,
}
"""Error types answered before a stream starts, with their HTTP status."""


def error_envelope(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """``{"error": {"type", "message", ...}}``: every JSON error body, and OpenAI's shape."""
    return {"error": {"type": error_type, "message": message, **extra}}


_OPENAI_CATEGORIES: Final = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error_data(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, for the ``/v1`` fronts: ``type`` is the category its SDK reads,
    ``code`` the chatsse error type."""
    if status in _OPENAI_CATEGORIES:
        category = _OPENAI_CATEGORIES[status]
    else:
        category = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": category, "param": param, "code": code}}


def error_body(error_type: str, message: str, **extra: Any) -> bytes:
    return json.dumps(error_envelope(error_type, message, **extra), separators=(",", ":")).encode()


def error_body_for(path: str, status: int, error_type: str, message: str) -> bytes:
    """The error body of the front that serves ``path``: OpenAI's shape under ``/v1/``,
    chatsse's elsewhere. For errors found before a front's own code runs (the headers, the
    body's size or time)."""
    if path.startswith("/v1/"):
        return json.dumps(openai_error_data(status, error_type, message), separators=(",", ":")).encode()
    return error_body(error_type, message)


# --- how a stream ends ----------------------------------------------------------------------

Outcome = Literal[
    "stop",
    "length",
    "stopped",
    "client_disconnected",
    "write_timeout",
    "timeout",
    "engine_timeout",
    "engine_error",
    "internal_error",
    "shutdown",
    "storage_error",
    "turn_lost",
]
"""Where a stream ended (the ``outcome`` label of ``chatsse_streams_total``)."""


@dataclass(frozen=True, slots=True)
class Ending:
    """What one outcome means on the wire and in the store."""

    finish_reason: FinishReason | None  # of the stored reply; None: no reply is stored
    error_type: str | None  # the final ``error`` event's type; None: ``completed`` or nothing
    meaning: str


ENDINGS: Final[dict[Outcome, Ending]] = {
    "stop": Ending("stop", None, "the reply is complete"),
    "length": Ending("length", None, "the reply reached max_tokens"),
    "stopped": Ending("stopped", None, "a client stopped the reply (POST .../stop): what was sent is kept"),
    "client_disconnected": Ending(
        "interrupted",
        None,
        "the client went away mid-reply, and no client resumed it within CHATSSE_RESUME_WINDOW",
    ),
    "write_timeout": Ending(
        "interrupted", None, "the client stopped reading: a write waited CHATSSE_WRITE_TIMEOUT"
    ),
    "timeout": Ending("timeout", "timeout", "the reply did not finish within CHATSSE_REQUEST_TIMEOUT"),
    "engine_timeout": Ending(
        "timeout",
        "engine_timeout",
        "the engine sent no token within CHATSSE_ENGINE_FIRST_TOKEN_TIMEOUT (first) or "
        "CHATSSE_ENGINE_IDLE_TIMEOUT (next)",
    ),
    "engine_error": Ending("error", "engine_error", "the response engine failed mid-reply"),
    "internal_error": Ending("error", "internal_error", "chatsse failed to encode or send an event"),
    "shutdown": Ending(
        "shutdown",
        "shutdown",
        "the server is stopping and the reply did not finish within CHATSSE_SHUTDOWN_GRACE_PERIOD",
    ),
    "storage_error": Ending(None, "storage_error", "the conversation store did not store the reply"),
    "turn_lost": Ending(
        None,
        "turn_lost",
        "the turn outlived its conversation lock and another turn (or a deletion) took the "
        "conversation over; the reply is not stored",
    ),
}
assert set(ENDINGS) == set(get_args(Outcome))


# The last event of a resumed stream (GET .../events) whose reply did not send one of its own.
INTERRUPTED: Final = "interrupted"
"""``error`` type: the client streaming the reply went away and the reply stopped there."""
STREAM_LOST: Final = "stream_lost"
"""``error`` type: the worker streaming the reply stopped writing it (it died, or lost its store)."""
RESUME_ERRORS: Final = (INTERRUPTED, STREAM_LOST)


def page_constants() -> dict[str, Any]:
    """What the chat page's script needs, generated into the page (chatsse/routes.py)."""
    return {
        "events": {name: name for name in EVENTS},
        "idSeparator": ID_SEPARATOR,
        "fields": {
            **{name: sorted(cls.__annotations__) for name, cls in EVENT_DATA.items()},
            "usage": sorted(Usage.__annotations__),
            "timings": sorted(Timings.__annotations__),
        },
        "streamErrors": sorted({e.error_type for e in ENDINGS.values() if e.error_type} | set(RESUME_ERRORS)),
    }

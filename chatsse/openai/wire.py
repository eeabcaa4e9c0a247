"""What the OpenAI fronts share on the wire: the error envelope, response ids, the
validation-error answer.

OpenAI's error body is ``{"error": {"message", "type", "param", "code"}}``: ``type`` is the
category the SDK reads (``invalid_request_error``, ``rate_limit_error``, ``server_error``...),
``code`` says which error; chatsse puts its own error type (chatsse/protocol.py) in ``code``
(``openai_error_data``, in chatsse/protocol.py with chatsse's own envelope).
The SDK raises by the HTTP status (``BadRequestError`` for 400, ``NotFoundError`` for 404, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import ValidationError
from starlette.responses import Response

from chatsse.endpoints import DirectEndpoint
from chatsse.errors import ApiError, InvalidParameter, ModelNotFound, ResponseNotFound
from chatsse.protocol import openai_error_data
from chatsse.state import AppState

__all__ = [
    "RESPONSE_PREFIX",
    "STREAM_ERROR_STATUS",
    "BufferedAnswer",
    "OpenAIEndpoint",
    "check_model",
    "invalid_body",
    "openai_error",
    "openai_error_data",
    "parse_response_id",
    "response_id",
]

RESPONSE_PREFIX: Final = "resp_"
_SEPARATOR: Final = "."  # never in a conversation id (CONVERSATION_ID_PATTERN)
# The status of a buffered (non-streaming) answer whose turn ended in an error event's type.
STREAM_ERROR_STATUS: Final = {
    "timeout": 504,
    "engine_timeout": 504,
    "engine_error": 502,
    "internal_error": 500,
    "shutdown": 503,
    "storage_error": 503,
    "turn_lost": 409,
}


def openai_error(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = json.dumps(openai_error_data(status, code, message, param), separators=(",", ":"))
    return Response(body, status, headers, media_type="application/json")


def api_error(exc: ApiError) -> Response:
    param = exc.param if isinstance(exc, InvalidParameter) else None
    return openai_error(exc.status, exc.type, exc.message, param=param, headers=exc.headers)


def invalid_body(exc: ValidationError) -> Response:
    """400, as OpenAI answers a body it cannot take: the first problem's field as ``param``."""
    return invalid_parameters(exc.errors(include_url=False))


def invalid_parameters(errors: Sequence[Any]) -> Response:
    """400 ``invalid_parameter`` for pydantic's ``errors`` (of a body, or of a query)."""
    problems = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"])
        problems.append(
            f"{where}: {error['msg']}" if where else str(error["msg"]).removeprefix("Value error, ")
        )
    param = ".".join(str(part) for part in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return openai_error(400, "invalid_parameter", "; ".join(problems) or "invalid request", param=param)


def response_id(conversation_id: str, message_id: str) -> str:
    """A stored response's id: its conversation and its reply message, so any worker finds it."""
    return f"{RESPONSE_PREFIX}{conversation_id}{_SEPARATOR}{message_id}"


def parse_response_id(value: str) -> tuple[str, str]:
    """``(conversation_id, message_id)``; ``ResponseNotFound`` if ``value`` names no stored response."""
    body = value.removeprefix(RESPONSE_PREFIX)
    conversation_id, separator, message_id = body.partition(_SEPARATOR)
    if not value.startswith(RESPONSE_PREFIX) or not separator or not conversation_id or not message_id:
        raise ResponseNotFound(f"Response with id '{value}' not found.")
    return conversation_id, message_id


class BufferedAnswer:
    """What a non-streaming request's formats share: nothing is written until the turn ends,
    and a turn that ends in an error answers that error's status with OpenAI's error body.
    Subclasses write ``completed``."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 200

    def opening(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return b""

    def error(self, error_type: str, message: str) -> bytes:
        self.status = STREAM_ERROR_STATUS.get(error_type, 500)
        return json.dumps(openai_error_data(self.status, error_type, message), separators=(",", ":")).encode()


def check_model(state: AppState, model: str) -> None:
    served = state.engine.name
    if model != served:
        raise ModelNotFound(f"The model `{model}` does not exist; this server serves `{served}`.")


class OpenAIEndpoint(DirectEndpoint):
    """A direct endpoint answering errors in OpenAI's shape."""

    def error(self, status: int, error_type: str, message: str, **extra: Any) -> Response:
        return openai_error(status, error_type, message)

    def invalid(self, exc: ValidationError) -> Response:
        return invalid_body(exc)

    def api_error(self, exc: ApiError) -> Response:
        return api_error(exc)

"""Every exception chatsse raises derives from :class:`ChatsseError`.

:class:`ApiError` subclasses are answered to a client: before a stream starts as their HTTP
``status`` with the JSON error envelope (chatsse/protocol.py), with a ``Retry-After`` header
when retrying later can succeed. Their ``type`` is the envelope's ``type``.
"""

from __future__ import annotations

from typing import ClassVar

from chatsse import protocol

__all__ = [
    "ApiError",
    "ChatsseError",
    "ConversationBusy",
    "ConversationFull",
    "ConversationLimitReached",
    "ConversationNotFound",
    "InvalidParameter",
    "MessageTooLarge",
    "ModelNotFound",
    "RateLimited",
    "ReplayExpired",
    "ReplayNotFound",
    "ResponseNotFound",
    "ResponseNotLatest",
    "ServerBusy",
    "ShuttingDown",
    "StorageUnavailable",
    "TurnLost",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class ChatsseError(Exception):
    """Base of every error chatsse raises."""


class ApiError(ChatsseError):
    """An error answered to the client; subclasses set ``type`` (a key of
    :data:`chatsse.protocol.HTTP_ERRORS`, which gives the status)."""

    type: ClassVar[str]

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return protocol.HTTP_ERRORS[self.type]

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class ConversationNotFound(ApiError):
    type = "conversation_not_found"


class ConversationBusy(ApiError):
    type = "conversation_busy"


class ConversationFull(ApiError):
    type = "conversation_full"


class ConversationLimitReached(ApiError):
    type = "conversation_limit"


class MessageTooLarge(ApiError):
    type = "message_too_large"


class ServerBusy(ApiError):
    type = "server_busy"


class RateLimited(ApiError):
    """A limit of the caller's key, or the server's stream cap (chatsse/limits/), is reached:
    429 with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers."""

    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, rate_headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.rate_headers = rate_headers

    @property
    def headers(self) -> dict[str, str] | None:
        return {**self.rate_headers, "Retry-After": str(self.retry_after)}


class ShuttingDown(ApiError):
    type = "shutting_down"

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message, retry_after=1)


class StorageUnavailable(ApiError):
    """The conversation store failed or did not answer within ``CHATSSE_STORE_TIMEOUT``."""

    type = "storage_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1)


class TurnLost(ChatsseError):
    """A turn's reply was refused: the turn no longer holds its conversation's lock (it outlived
    the lock, and another turn or a deletion took the conversation over)."""


class InvalidParameter(ApiError):
    """An OpenAI request asks for something chatsse does not support (it never ignores one)."""

    type = "invalid_parameter"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(ApiError):
    type = "model_not_found"


class ResponseNotFound(ApiError):
    type = "response_not_found"


class ResponseNotLatest(ApiError):
    """A Responses-API turn continues from a response that is not its conversation's latest."""

    type = "response_not_latest"


class UpstreamRejected(ApiError):
    """The upstream model refused the request as invalid (its 400 or 422)."""

    type = "upstream_rejected"


class UpstreamRateLimited(ApiError):
    type = "upstream_rate_limited"


class UpstreamError(ApiError):
    """The upstream model answered with a server error, or something that is not its protocol."""

    type = "upstream_error"


class UpstreamUnavailable(ApiError):
    """The upstream model cannot be reached."""

    type = "upstream_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1)


class UpstreamTimeout(ApiError):
    type = "upstream_timeout"


class ReplayNotFound(ApiError):
    """No reply stream by that id in that conversation (or a Last-Event-ID of another one)."""

    type = "replay_not_found"


class ReplayExpired(ApiError):
    """The reply is stored, but its replay log is gone (``CHATSSE_REPLAY_TTL``)."""

    type = "replay_expired"

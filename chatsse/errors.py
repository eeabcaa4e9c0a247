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
    "MessageTooLarge",
    "ServerBusy",
    "ShuttingDown",
    "StorageUnavailable",
    "TurnLost",
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

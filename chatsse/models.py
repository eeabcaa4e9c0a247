"""Conversation data (plain dataclasses) and the HTTP request/response schemas (pydantic).

Pydantic models are used only at the edges of a request, never per streamed token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatsse.protocol import FinishReason

__all__ = [
    "CONVERSATION_ID_PATTERN",
    "ChatRequest",
    "ConversationInfo",
    "ConversationList",
    "ConversationOut",
    "ErrorBody",
    "ErrorDetail",
    "FinishReason",
    "Message",
    "MessageOut",
    "Role",
    "StopOut",
]

Role = Literal["system", "user", "assistant"]
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


@dataclass(slots=True, frozen=True)
class Message:
    id: str
    role: Role
    content: str
    created_at: float
    finish_reason: FinishReason | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True, frozen=True)
class ConversationInfo:
    id: str
    created_at: float
    updated_at: float
    message_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChatRequest(BaseModel):
    """Body of ``POST /chat``."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, description="The user's message.")
    conversation_id: str | None = Field(
        None,
        pattern=CONVERSATION_ID_PATTERN,
        description="Continue this conversation; omit or null to start a new one.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on reply tokens (the server's own cap still applies)."
    )


class MessageOut(BaseModel):
    id: str
    role: Role
    content: str
    created_at: float
    finish_reason: FinishReason | None


class StopOut(BaseModel):
    """``POST .../stop``: the reply as it ended (``stopped``: this call ended it)."""

    conversation_id: str
    message_id: str
    stopped: bool
    finish_reason: FinishReason | None  # None: its worker has not confirmed the stop yet (202)
    content: str | None


class ConversationOut(BaseModel):
    id: str
    created_at: float
    updated_at: float
    message_count: int
    messages: list[MessageOut] | None = None


class ConversationList(BaseModel):
    conversations: list[ConversationOut]
    total: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail

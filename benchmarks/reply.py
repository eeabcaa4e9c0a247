"""The reply every reference server sends, configured by environment variables.

``BENCH_REPLY_TOKENS`` (default 500): tokens in a reply unless the request's
``max_tokens`` asks for fewer. ``BENCH_TTFT_MS`` (default 0): wait before the first token.
``BENCH_TOKEN_INTERVAL_MS`` (default 0): gap between tokens, on absolute deadlines like
chatsse's simulated engine. Zero delays stream without sleeping.
"""

from __future__ import annotations

import json
import os
import time

from chatsse.protocol import CompletedData, ConnectedData

REPLY_TOKENS = int(os.environ.get("BENCH_REPLY_TOKENS", "500"))
TTFT = float(os.environ.get("BENCH_TTFT_MS", "0")) / 1000
TOKEN_INTERVAL = float(os.environ.get("BENCH_TOKEN_INTERVAL_MS", "0")) / 1000
PACED = TTFT > 0 or TOKEN_INTERVAL > 0

# Ids as long as chatsse's (``chatsse.conversations.new_id``: 24 hex digits), so every
# server sends the same bytes.
MESSAGE_ID = "msg_0123456789abcdef01234567"
CONVERSATION_ID = "0123456789abcdef01234567"
# Word-sized tokens, like the simulated engine's.
TOKENS = [(" stream", " tokens", " arrive", " one", " by", " one", ".")[i % 7] for i in range(REPLY_TOKENS)]


def reply_length(body: bytes) -> int:
    """Tokens to send for a request body: ``max_tokens`` if given and smaller."""
    try:
        requested = json.loads(body or b"{}").get("max_tokens")
    except ValueError:
        requested = None
    if isinstance(requested, int) and requested >= 1:
        return min(requested, REPLY_TOKENS)
    return REPLY_TOKENS


def connected_data() -> ConnectedData:
    return {
        "conversation_id": CONVERSATION_ID,
        "user_message_id": "msg_user",
        "message_id": MESSAGE_ID,
        "model": "reference",
        "created": time.time(),
    }


def completed_data(tokens: int) -> CompletedData:
    return {
        "conversation_id": CONVERSATION_ID,
        "message_id": MESSAGE_ID,
        "content": "".join(TOKENS[:tokens]),
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
        "timings": {"ttft_ms": 0.0, "total_ms": 0.0},
    }

"""A small OpenAI-compatible streaming server for the load client's tests.

``POST /v1/chat/completions`` streams, like vLLM: a role chunk, one chunk per content
token, a finish chunk, a usage chunk (when ``stream_options.include_usage``), then
``data: [DONE]``. Options make it fail in band, stop early, or refuse with a status.
``GET /v1/models`` lists one model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


@dataclass
class FakeOpenAI:
    """Reply ``turn <n> reply`` split in tokens, where n counts the user messages sent."""

    tokens_per_reply: int = 5
    token_delay: float = 0.0
    error_after: int | None = None  # content chunks before an in-band error
    truncate: bool = False  # end without [DONE]
    status: int = 200
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def reply_tokens(self, turn: int) -> list[str]:
        words = [f"turn {turn} reply"] + [f" w{i}" for i in range(self.tokens_per_reply - 1)]
        return words[: self.tokens_per_reply]

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return JSONResponse({"error": {"message": "refused", "type": "refused"}}, self.status)
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        tokens = self.reply_tokens(turn)[: body.get("max_tokens") or None]
        usage = body.get("stream_options", {}).get("include_usage", False)
        return StreamingResponse(self.stream(tokens, body["model"], usage), media_type="text/event-stream")

    async def stream(self, tokens: list[str], model: str, usage: bool) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        for i, token in enumerate(tokens):
            if self.error_after is not None and i == self.error_after:
                error = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
                yield f"data: {json.dumps(error)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield chunk({"content": token})
        if self.truncate:
            return
        yield chunk({}, finish="stop")
        if usage:
            counts = {"prompt_tokens": 7, "completion_tokens": len(tokens), "total_tokens": 7 + len(tokens)}
            payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": counts}
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

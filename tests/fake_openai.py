"""A small OpenAI-compatible streaming server for the load client's tests.

``POST /v1/chat/completions`` streams, like vLLM: a role chunk, one chunk per content
token, a finish chunk, a usage chunk (when ``stream_options.include_usage``), then
``data: [DONE]``. Options make it fail in band, stop early, or refuse with a status.

``POST /v1/responses`` streams the Responses API's events (``event: <type>`` and data
with ``type`` and ``sequence_number``): ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, one
``response.output_text.delta`` per token, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut the
reply). Completed and incomplete responses are kept in memory, so a later request can
continue them with ``previous_response_id`` (an unknown one is a 404). The same options
apply, plus ``failure`` (``response.failed`` or an ``error`` event) and
``skip_sequence_number``.

``GET /v1/models`` lists one model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"
PROMPT_TOKENS = 7  # per turn of the conversation (Responses: the chain's turns add up)


@dataclass
class FakeOpenAI:
    """Reply ``turn <n> reply`` split in tokens: n counts the user messages sent (chat
    completions) or the responses in the ``previous_response_id`` chain, this one included.
    """

    tokens_per_reply: int = 5
    token_delay: float = 0.0
    error_after: int | None = None  # content chunks before an in-band error
    failing_requests: frozenset[int] | None = None  # which requests (0-based) error_after hits; None: all
    failure: Literal["response.failed", "error"] = "response.failed"  # Responses: how it fails in band
    truncate: bool = False  # end without [DONE] (Responses: without the done and final events)
    skip_sequence_number: int | None = None  # Responses: never send this sequence number
    tokens_per_delta: int = 1  # tokens the usage counts per content chunk
    status: int = 200
    bodies: list[dict[str, Any]] = field(default_factory=list)
    chains: dict[str, int] = field(default_factory=dict)  # stored response id -> its turn

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def reply_tokens(self, turn: int) -> list[str]:
        words = [f"turn {turn} reply"] + [f" w{i}" for i in range(self.tokens_per_reply - 1)]
        return words[: self.tokens_per_reply]

    async def _receive(self, request: Request) -> tuple[int, dict[str, Any], Response | None]:
        """The request's index and body, and the refusal when ``status`` is not 200."""
        body = await request.json()
        self.bodies.append(body)
        refusal = None
        if self.status != 200:
            refusal = JSONResponse({"error": {"message": "refused", "type": "refused"}}, self.status)
        return len(self.bodies) - 1, body, refusal

    def _error_at(self, index: int) -> int | None:
        """The content chunk before which request ``index`` fails, if it does."""
        if self.failing_requests is not None and index not in self.failing_requests:
            return None
        return self.error_after

    async def completions(self, request: Request) -> Response:
        index, body, refusal = await self._receive(request)
        if refusal is not None:
            return refusal
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        tokens = self.reply_tokens(turn)[: body.get("max_tokens") or None]
        usage = body.get("stream_options", {}).get("include_usage", False)
        stream = self.stream(tokens, body["model"], usage, self._error_at(index))
        return StreamingResponse(stream, media_type="text/event-stream")

    async def stream(
        self, tokens: list[str], model: str, usage: bool, error_at: int | None
    ) -> AsyncIterator[bytes]:
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
            if i == error_at:
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
            completion = len(tokens) * self.tokens_per_delta
            counts = {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": completion,
                "total_tokens": PROMPT_TOKENS + completion,
            }
            payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": counts}
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def responses(self, request: Request) -> Response:
        index, body, refusal = await self._receive(request)
        if refusal is not None:
            return refusal
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.chains:
            error = {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
            return JSONResponse({"error": error}, 404)
        turn = 1 if previous is None else self.chains[previous] + 1
        full = self.reply_tokens(turn)
        tokens = full[: body.get("max_output_tokens") or None]
        stream = self.response_events(
            f"resp_{index}", body["model"], turn, tokens, len(tokens) < len(full), self._error_at(index)
        )
        return StreamingResponse(stream, media_type="text/event-stream")

    async def response_events(
        self, response_id: str, model: str, turn: int, tokens: list[str], cut: bool, error_at: int | None
    ) -> AsyncIterator[bytes]:
        numbers = (n for n in itertools.count() if n != self.skip_sequence_number)

        def event(kind: str, **data: Any) -> bytes:
            payload = {"type": kind, "sequence_number": next(numbers), **data}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

        def response(status: str, **data: Any) -> dict[str, Any]:
            fields = {"error": None, "incomplete_details": None, "output": [], "usage": None, **data}
            return {"id": response_id, "object": "response", "model": model, "status": status, **fields}

        item_id = f"msg_{response_id}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        yield event("response.created", response=response("in_progress"))
        yield event("response.in_progress", response=response("in_progress"))
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": ""})
        for i, token in enumerate(tokens):
            if i == error_at:
                if self.failure == "error":
                    yield event("error", code="engine_died", message="engine died", param=None)
                else:
                    error = {"code": "server_error", "message": "engine died"}
                    yield event("response.failed", response=response("failed", error=error))
                return
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield event("response.output_text.delta", **where, delta=token, logprobs=[])
        if self.truncate:
            return
        text = "".join(tokens)
        part = {"type": "output_text", "text": text, "annotations": []}
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=part)
        item = {**item, "status": "incomplete" if cut else "completed", "content": [part]}
        yield event("response.output_item.done", output_index=0, item=item)
        output = len(tokens) * self.tokens_per_delta
        prompt = PROMPT_TOKENS * turn
        usage = {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
        self.chains[response_id] = turn
        if cut:
            details = {"reason": "max_output_tokens"}
            final = response("incomplete", incomplete_details=details, output=[item], usage=usage)
            yield event("response.incomplete", response=final)
        else:
            yield event("response.completed", response=response("completed", output=[item], usage=usage))

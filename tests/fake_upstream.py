"""An OpenAI-compatible upstream with faults on demand, for the upstream engine's tests.

Each ``POST /v1/chat/completions`` takes the next mode from ``script`` (then ``mode``):

``ok``             a role chunk, ``tokens`` content chunks (``token_delay`` apart), a finish
                   chunk, a usage chunk, ``[DONE]``
``stall_headers``  no answer at all (until the client goes away)
``stall_first``    the response starts, then no token (until the client goes away)
``stall_mid``      two tokens, then nothing (until the client goes away)
``reset_mid``      two tokens, then the connection is dropped
``malformed``      two tokens, then a chunk that is not JSON
``inband_error``   two tokens, then ``data: {"error": {...}}``
``truncated``      two tokens, then the stream ends without a finish or ``[DONE]``
``not_a_stream``   200 with a JSON body
``status:<n>``     an error status with an OpenAI error body (429 adds ``Retry-After: 7``)

``open_requests`` counts the requests being answered right now (a request ends when its
answer ends or its client goes away); ``peak`` is the most at once.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

MODEL = "upstream-model"
RETRY_AFTER = "7"


@dataclass
class FakeUpstream:
    mode: str = "ok"
    script: list[str] = field(default_factory=list)
    tokens: int = 5
    token_delay: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    open_requests: int = 0
    peak: int = 0
    disconnects: int = 0

    def reply_tokens(self) -> list[str]:
        return [f" tok{i}" for i in range(self.tokens)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(chunks))
        self.bodies.append(body)
        mode = self.script.pop(0) if self.script else self.mode
        self.open_requests += 1
        self.peak = max(self.peak, self.open_requests)
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnects += 1
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._answer(mode, body, send, gone)
        finally:
            self.open_requests -= 1
            watcher.cancel()

    async def _answer(self, mode: str, body: dict[str, Any], send: Send, gone: asyncio.Event) -> None:
        if mode.startswith("status:"):
            status = int(mode.split(":")[1])
            headers = [(b"retry-after", RETRY_AFTER.encode())] if status == 429 else []
            error = {"error": {"message": f"upstream says {status}", "type": "err", "code": None}}
            await _json(send, status, error, headers)
            return
        if mode == "not_a_stream":
            await _json(send, 200, {"object": "chat.completion", "choices": []})
            return
        if mode == "stall_headers":
            await gone.wait()
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )

        async def chunk(payload: object) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send(
                {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
            )

        def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            return {"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

        await chunk(choice({"role": "assistant", "content": ""}))
        if mode == "stall_first":
            await gone.wait()
            return
        tokens = self.reply_tokens()[: body.get("max_tokens") or None]
        for i, token in enumerate(tokens):
            if i == 2 and mode != "ok":
                break
            if self.token_delay:
                try:
                    await asyncio.wait_for(gone.wait(), self.token_delay)
                    return  # the client went away
                except TimeoutError:
                    pass
            await chunk(choice({"content": token}))
        if mode == "stall_mid":
            await gone.wait()
            return
        if mode == "reset_mid":
            send.__self__.transport.abort()  # type: ignore[attr-defined]  # uvicorn's cycle
            return
        if mode == "malformed":
            await chunk("{this is not json")
        elif mode == "inband_error":
            await chunk({"error": {"message": "the model crashed", "type": "server_error", "code": 500}})
        elif mode == "ok":
            await chunk(choice({}, "length" if len(tokens) < self.tokens else "stop"))
            usage = {"prompt_tokens": 11, "completion_tokens": len(tokens), "total_tokens": 11 + len(tokens)}
            await chunk({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage})
            await chunk("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})

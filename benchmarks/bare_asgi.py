"""The floor: a raw ASGI app that writes pre-encoded SSE bytes, one ``send`` per event.

No framework, no per-event encoding, no disconnect listener (uvicorn drops sends after a
disconnect, so a stream whose client left runs on to its end). ``GET /tasks`` answers the
process's asyncio tasks (a count), any other ``GET`` ``ok``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from benchmarks.reply import (
    MESSAGE_ID,
    PACED,
    TOKEN_INTERVAL,
    TOKENS,
    TTFT,
    completed_data,
    connected_data,
    reply_length,
)
from chatsse.protocol import COMPLETED, CONNECTED, MESSAGE, event_id

Message = dict[str, Any]

_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_CONNECTED = (
    f"id: {event_id(MESSAGE_ID, 0)}\nevent: {CONNECTED}\nretry: 3000\n"
    f"data: {json.dumps(connected_data(), separators=(',', ':'))}\n\n"
).encode()
_MESSAGES = [
    f'id: {event_id(MESSAGE_ID, i + 1)}\nevent: {MESSAGE}\ndata: {{"delta":{json.dumps(token)}}}\n\n'.encode()
    for i, token in enumerate(TOKENS)
]
_completed_cache: dict[int, bytes] = {}


def _completed(tokens: int) -> bytes:
    event = _completed_cache.get(tokens)
    if event is None:
        data = json.dumps(completed_data(tokens), separators=(",", ":"))
        event = _completed_cache[tokens] = (
            f"id: {event_id(MESSAGE_ID, tokens + 1)}\nevent: {COMPLETED}\ndata: {data}\n\n".encode()
        )
    return event


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Message, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["method"] != "POST":
        body = str(len(asyncio.all_tasks())).encode() if scope["path"] == "/tasks" else b"ok"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    tokens = reply_length(body)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _CONNECTED, "more_body": True})
    if PACED:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TTFT
        for chunk in _MESSAGES[:tokens]:
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            deadline += TOKEN_INTERVAL
    else:
        for chunk in _MESSAGES[:tokens]:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": _completed(tokens), "more_body": False})

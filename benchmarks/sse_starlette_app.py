"""Plain sse-starlette usage: ``EventSourceResponse`` over an async generator yielding
``ServerSentEvent`` objects, each event's data encoded with ``json.dumps`` as it is sent.
``GET /tasks`` answers the process's asyncio tasks (a count).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarks.reply import PACED, TOKEN_INTERVAL, TOKENS, TTFT, completed_data, connected_data, reply_length
from chatsse.protocol import COMPLETED, CONNECTED, MESSAGE, event_id


async def chat(request: Request) -> Response:
    tokens = reply_length(await request.body())

    async def events() -> AsyncIterator[ServerSentEvent]:
        connected = connected_data()
        stream_id = connected["message_id"]
        yield ServerSentEvent(json.dumps(connected), event=CONNECTED, id=event_id(stream_id, 0), retry=3000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TTFT
        for i, token in enumerate(TOKENS[:tokens]):
            if PACED:
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                deadline += TOKEN_INTERVAL
            yield ServerSentEvent(json.dumps({"delta": token}), event=MESSAGE, id=event_id(stream_id, i + 1))
        yield ServerSentEvent(
            json.dumps(completed_data(tokens)), event=COMPLETED, id=event_id(stream_id, tokens + 1)
        )

    return EventSourceResponse(events())


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def tasks(request: Request) -> Response:
    return PlainTextResponse(str(len(asyncio.all_tasks())))


app = Starlette(routes=[Route("/chat", chat, methods=["POST"]), Route("/", ok), Route("/tasks", tasks)])

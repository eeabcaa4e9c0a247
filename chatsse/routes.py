"""Every route but ``POST /chat`` (chatsse/chat.py): the chat page, conversations, and the
operator's ``/health``, ``/metrics`` and ``/stats``.

Numbers that cover one worker process say so in their names (``this_worker``); ``/metrics``
and ``/stats`` otherwise report every worker of the server (chatsse/metrics.py).
"""

from __future__ import annotations

import gc
import json
import os
import time
from importlib.resources import files
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response

from chatsse import __version__, protocol
from chatsse.auth import caller_of
from chatsse.errors import ConversationNotFound
from chatsse.models import ConversationInfo, ConversationList, ConversationOut, MessageOut
from chatsse.state import AppState

__all__ = ["add_routes", "chat_page"]

PROTOCOL_PLACEHOLDER = "/*CHATSSE_PROTOCOL*/{}"


def chat_page() -> bytes:
    """The chat page, with chatsse's protocol constants written into its script."""
    page = files("chatsse").joinpath("static/index.html").read_text()
    if PROTOCOL_PLACEHOLDER not in page:
        raise RuntimeError("static/index.html lost its protocol placeholder")
    constants = json.dumps(protocol.page_constants(), separators=(",", ":"))
    return page.replace(PROTOCOL_PLACEHOLDER, constants).encode()


def _conversation_out(info: ConversationInfo, messages: list[MessageOut] | None = None) -> ConversationOut:
    return ConversationOut(**info.to_dict(), messages=messages)


def add_routes(app: FastAPI, state: AppState) -> None:
    _page_route(app)
    _conversation_routes(app, state)
    _operator_routes(app, state)


def _page_route(app: FastAPI) -> None:
    page = chat_page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)


def _conversation_routes(app: FastAPI, state: AppState) -> None:
    manager = state.manager

    # Each route sees the caller's own conversations only; another's is not found (404).
    @app.post("/conversations", status_code=201)
    async def create_conversation(request: Request) -> ConversationOut:
        return _conversation_out(await manager.create(owner=caller_of(request.scope).owner), [])

    @app.get("/conversations")
    async def list_conversations(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> ConversationList:
        owner = caller_of(request.scope).owner
        infos = await manager.list(limit, owner=owner)
        return ConversationList(
            conversations=[_conversation_out(i) for i in infos], total=await manager.count(owner=owner)
        )

    @app.get("/conversations/{conversation_id}")
    async def get_conversation(
        request: Request, conversation_id: str, limit: Annotated[int | None, Query(ge=1)] = None
    ) -> ConversationOut:
        owner = caller_of(request.scope).owner
        info = await manager.get(conversation_id, owner=owner)
        if info is None:
            raise ConversationNotFound(f"no conversation {conversation_id}")
        messages = await manager.messages(conversation_id, limit, owner=owner)
        return _conversation_out(info, [MessageOut(**m.to_dict()) for m in messages])

    @app.delete("/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(request: Request, conversation_id: str) -> Response:
        if not await manager.delete(conversation_id, owner=caller_of(request.scope).owner):
            raise ConversationNotFound(f"no conversation {conversation_id}")
        return Response(status_code=204)


def _operator_routes(app: FastAPI, state: AppState) -> None:
    metrics = state.metrics

    def this_worker() -> dict[str, Any]:
        return {"pid": os.getpid(), "open_streams": state.lifecycle.open_streams}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "draining" if state.lifecycle.draining else "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "engine": state.engine.name,
            "store": state.manager.store.name,
            "this_worker": this_worker(),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics_text() -> Response:
        metrics.conversations.set(await state.manager.count(owner=None))
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        metrics.conversations.set(await state.manager.count(owner=None))
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "engine": state.engine.name,
            "store": state.manager.store.name,
            "all_workers": metrics.summary(),
            # Of the process that answered: see chatsse.serving.tune_garbage_collector.
            "this_worker": {
                **this_worker(),
                "gc": {
                    "thresholds": list(gc.get_threshold()),
                    "frozen_objects": gc.get_freeze_count(),
                    "collections": [generation["collections"] for generation in gc.get_stats()],
                },
            },
        }

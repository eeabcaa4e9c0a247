"""chatsse's OpenAI-compatible fronts, over the same turn machinery as ``POST /chat``
(chatsse/turns.py):

- ``POST /v1/chat/completions``: Chat Completions, stateless (chatsse/openai/completions.py);
- ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: the Responses API, its
  conversation state in chatsse's stores (chatsse/openai/responses.py); ``GET`` with
  ``stream=true`` resumes a streamed response after ``starting_after`` (its replay log,
  chatsse/resume.py), on any worker, and ``POST /v1/responses/{id}/cancel`` stops one;
- ``GET /v1/models``: the one model the engine serves.

What each accepts is chatsse/openai/requests.py; README, "OpenAI APIs", lists it.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Query, Request
from starlette.responses import JSONResponse, Response

from chatsse.auth import caller_of
from chatsse.errors import ApiError, ConversationBusy, ReplayNotFound, ResponseNotFound
from chatsse.models import ErrorBody
from chatsse.openai.completions import ChatCompletionsEndpoint
from chatsse.openai.requests import ChatCompletionRequest, ResponsesRequest
from chatsse.openai.responses import FRONT, ResponseHead, ResponseReplay, ResponsesEndpoint, stored_response
from chatsse.openai.wire import api_error, parse_response_id
from chatsse.resume import find_replay, resume_response, stop_reply
from chatsse.state import AppState

if TYPE_CHECKING:
    from chatsse.app import ChatsseApp

__all__ = ["add_openai_routes"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "A parameter chatsse does not support, or an invalid body (OpenAI's error shape).",
        404: "Unknown model or previous response.",
        409: "The conversation is mid-turn, or the previous response is not its latest.",
        413: "The request is over the size limit.",
        429: "The upstream model is rate-limiting.",
        502: "The upstream model failed.",
        503: "Too many open streams, draining, the store or the upstream unavailable.",
    }.items()
}
_STREAM: dict[str, Any] = {"content": {"text/event-stream": {}, "application/json": {}}}


def add_openai_routes(app: ChatsseApp, state: AppState) -> None:
    completions = ChatCompletionsEndpoint(state)
    responses = ResponsesEndpoint(state)
    for endpoint in (completions, responses):
        app.add_direct_route("POST", endpoint.path, endpoint)

    # The same endpoints declared on FastAPI, for the OpenAPI schema.
    @app.post(completions.path, responses={200: _STREAM, **_ERRORS}, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _answer(completions.start(body, request.scope))

    @app.post(responses.path, responses={200: _STREAM, **_ERRORS}, tags=["openai"])
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await _answer(responses.start(body, request.scope))

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> dict[str, Any]:
        model = {
            "id": state.engine.name,
            "object": "model",
            "created": int(state.started_at),
            "owned_by": "chatsse",
        }
        return {"object": "list", "data": [model]}

    @app.get("/v1/responses/{response_id}", responses={200: _STREAM, **_ERRORS}, tags=["openai"])
    async def get_response(
        request: Request,
        response_id: str,
        stream: Annotated[
            bool, Query(description="stream the response's events from its replay log")
        ] = False,
        starting_after: Annotated[
            int | None, Query(ge=-1, description="with stream: the events after this sequence number")
        ] = None,
    ) -> Response:
        owner = caller_of(request.scope).owner

        async def found() -> Response:
            if stream:
                return await _resume(response_id, starting_after, owner)
            try:
                return JSONResponse(
                    await stored_response(state.manager, state.engine.name, response_id, owner)
                )
            except ResponseNotFound:  # not stored yet: still streaming?
                return JSONResponse(await _in_progress(response_id, owner))

        return await _answer(found())

    async def _resume(value: str, starting_after: int | None, owner: str) -> Response:
        conversation_id, message_id = parse_response_id(value)
        renderer = ResponseReplay(_head(value, message_id), starting_after)
        try:
            first = await find_replay(state, conversation_id, message_id, FRONT, renderer.after, owner=owner)
        except ReplayNotFound:
            raise ResponseNotFound(f"No streamed response with id '{value}' to resume.") from None
        return resume_response(state, message_id, renderer, first)

    async def _in_progress(value: str, owner: str) -> dict[str, Any]:
        conversation_id, message_id = parse_response_id(value)
        try:
            replay = await find_replay(state, conversation_id, message_id, FRONT, owner=owner)
        except ReplayNotFound:
            raise ResponseNotFound(f"Response with id '{value}' not found.") from None
        if replay.done:  # ended between the two reads
            return await stored_response(state.manager, state.engine.name, value, owner)
        return _head(value, message_id).object("in_progress")

    def _head(value: str, message_id: str) -> ResponseHead:
        return ResponseHead(id=value, item_id=message_id, model=state.engine.name, created_at=time.time())

    @app.post("/v1/responses/{response_id}/cancel", responses=_ERRORS, tags=["openai"])
    async def cancel_response(request: Request, response_id: str) -> Response:
        """Stops a streaming response, from any worker; it is stored, and read back, as
        ``cancelled``. A response that has ended is returned as it is."""
        owner = caller_of(request.scope).owner

        async def cancelled() -> Response:
            conversation_id, message_id = parse_response_id(response_id)
            with contextlib.suppress(ReplayNotFound):  # not streamed, or long ended
                await stop_reply(state, conversation_id, message_id, FRONT, owner=owner)
            try:
                return JSONResponse(
                    await stored_response(state.manager, state.engine.name, response_id, owner)
                )
            except ResponseNotFound:  # its worker has not confirmed the stop yet
                return JSONResponse(await _in_progress(response_id, owner))

        return await _answer(cancelled())

    @app.delete("/v1/responses/{response_id}", responses=_ERRORS, tags=["openai"])
    async def delete_response(request: Request, response_id: str) -> Response:
        """Deletes the conversation the response belongs to: every response of its chain."""
        owner = caller_of(request.scope).owner

        async def deleted() -> Response:
            await stored_response(state.manager, state.engine.name, response_id, owner)  # 404 if unknown
            conversation_id, _ = parse_response_id(response_id)
            if not await state.manager.delete(conversation_id, owner=owner):
                raise ConversationBusy("the conversation was deleted meanwhile")
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

        return await _answer(deleted())


async def _answer(work: Any) -> Response:
    """Await a route's answer, turning an ``ApiError`` into OpenAI's error shape."""
    try:
        response: Response = await work
    except ApiError as exc:
        return api_error(exc)
    return response

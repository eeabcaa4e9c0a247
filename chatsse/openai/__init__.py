"""chatsse's OpenAI-compatible fronts, over the same turn machinery as ``POST /chat``
(chatsse/turns.py):

- ``POST /v1/chat/completions``: Chat Completions, stateless (chatsse/openai/completions.py);
- ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: the Responses API, its
  conversation state in chatsse's stores (chatsse/openai/responses.py);
- ``GET /v1/models``: the one model the engine serves.

What each accepts is chatsse/openai/requests.py; README, "OpenAI APIs", lists it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from chatsse.errors import ApiError, ConversationBusy
from chatsse.models import ErrorBody
from chatsse.openai.completions import ChatCompletionsEndpoint
from chatsse.openai.requests import ChatCompletionRequest, ResponsesRequest
from chatsse.openai.responses import ResponsesEndpoint, stored_response
from chatsse.openai.wire import api_error, parse_response_id
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

    @app.get("/v1/responses/{response_id}", responses=_ERRORS, tags=["openai"])
    async def get_response(response_id: str) -> Response:
        async def found() -> Response:
            return JSONResponse(await stored_response(state.manager, state.engine.name, response_id))

        return await _answer(found())

    @app.delete("/v1/responses/{response_id}", responses=_ERRORS, tags=["openai"])
    async def delete_response(response_id: str) -> Response:
        """Deletes the conversation the response belongs to: every response of its chain."""

        async def deleted() -> Response:
            await stored_response(state.manager, state.engine.name, response_id)  # 404 if unknown
            conversation_id, _ = parse_response_id(response_id)
            if not await state.manager.delete(conversation_id):
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

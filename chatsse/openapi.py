"""The OpenAPI schema as chatsse answers: every error a route can give, in the shape it gives it.

FastAPI documents what each route declares, and a 422 in its own shape. chatsse answers more
than any one route says: middleware refuses a key (401, 403) or a body too large (413) before
routing, every store call may fail (503), a turn may be over a limit (429), and errors come
in chatsse's envelope, or OpenAI's on ``/v1/*``. :func:`document_errors` adds those to the
generated schema, so a client (or schemathesis, tests/test_fuzz.py) can trust it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from chatsse.auth import OPERATOR_PATHS, PUBLIC_PATHS

__all__ = ["InvalidRequestBody", "OpenAIErrorBody", "document_errors"]


class _Problem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class _InvalidRequestDetail(BaseModel):
    type: str
    message: str
    details: list[_Problem]


class InvalidRequestBody(BaseModel):
    """422 ``invalid_request``: pydantic's problems as ``details``."""

    error: _InvalidRequestDetail


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str  # OpenAI's category: invalid_request_error, authentication_error, ...
    param: str | None
    code: str  # chatsse's error type


class OpenAIErrorBody(BaseModel):
    error: _OpenAIErrorDetail


TURNS = frozenset({("post", "/chat"), ("post", "/v1/chat/completions"), ("post", "/v1/responses")})
_RATE_HEADERS = {
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}},
    **{
        f"x-ratelimit-{what}-{kind}": {"schema": {"type": "string"}}
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    },
}
_DESCRIPTIONS = {
    "400": "Invalid parameters (OpenAI's error shape).",
    "401": "No API key, or a wrong, unknown or revoked one.",
    "403": "Not an admin key.",
    "404": "Not found (or another key's).",
    "413": "The body is over the size limit.",
    "422": "Invalid parameters.",
    "429": "Over a limit of the key or of the server.",
    "503": "The store, the engine or the server cannot take the request now.",
}


def _error(schema: dict[str, Any], ref: str, status: str, headers: dict[str, Any] | None = None) -> None:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }
    if headers:
        response["headers"] = headers
    schema.setdefault(status, response)


def _patch(schema: dict[str, Any], keyed: bool) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (InvalidRequestBody, OpenAIErrorBody):
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in definition.pop("$defs", {}).items():
            components.setdefault(name, nested)
        components[model.__name__] = definition
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if path in PUBLIC_PATHS:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            openai = path.startswith("/v1/")
            shape = "OpenAIErrorBody" if openai else "ErrorBody"
            if "422" in responses:  # FastAPI's own shape; chatsse answers in its envelope
                del responses["422"]
                if openai:
                    _error(responses, shape, "400")
                else:
                    _error(responses, "InvalidRequestBody", "422")
            if keyed:
                _error(responses, shape, "401", {"WWW-Authenticate": {"schema": {"type": "string"}}})
                if path in OPERATOR_PATHS:
                    _error(responses, shape, "403")
            if "{" in path:
                _error(responses, shape, "404")
            if "requestBody" in operation:
                _error(responses, shape, "413")
            if (method, path) in TURNS:
                _error(responses, shape, "429", _RATE_HEADERS)
            _error(responses, shape, "503")
            for answer in responses.values():  # the documented error bodies are the envelope's
                content = answer.get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref", "").endswith("/ErrorBody") and openai:
                    content["schema"] = {"$ref": "#/components/schemas/OpenAIErrorBody"}


def document_errors(app: FastAPI, *, keyed: bool) -> None:
    """Make ``app.openapi()`` document every error answer (``keyed``: the server has keys)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _patch(schema, keyed)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

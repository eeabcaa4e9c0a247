"""The JSON error responses chatsse answers with before a stream starts (the envelope is
chatsse/protocol.py's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import Response

from chatsse.errors import ApiError
from chatsse.protocol import error_body

__all__ = ["api_error", "invalid_request", "json_error"]


def json_error(
    status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> Response:
    return Response(error_body(error_type, message, **extra), status, headers, media_type="application/json")


def api_error(exc: ApiError) -> Response:
    return json_error(exc.status, exc.type, exc.message, exc.headers)


def invalid_request(errors: Sequence[Any]) -> Response:
    """422 ``invalid_request``, with pydantic's errors as ``details`` (``loc``, ``msg``, ``type``)."""
    details = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
    ]
    summary = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
    return json_error(422, "invalid_request", summary or "invalid request", details=details)

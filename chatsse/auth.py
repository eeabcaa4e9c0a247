"""Who is calling: API keys on every API route (``Authorization: Bearer <key>``, which is how
the OpenAI SDKs send theirs), and the caller each request carries.

With ``CHATSSE_KEYS_FILE`` set, :class:`AuthMiddleware` admits a request to any route but the
public ones (the chat page, ``/health``, the OpenAPI schema and its docs) only with a live key
(chatsse/keys.py), and ``/metrics`` and ``/stats`` only with an admin key (unless
``CHATSSE_OPERATOR_ROUTES_OPEN``). A missing key and a wrong, unknown or revoked one get the
same 401, with ``WWW-Authenticate``. The caller's key is left in the scope; its id owns every
conversation it makes (chatsse/stores/base.py). A server without keys has one caller,
:data:`ANONYMOUS`, and needs no middleware.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from chatsse.keys import ApiKey, KeyRing
from chatsse.middleware import send_error

__all__ = ["ANONYMOUS", "CALLER_SCOPE_KEY", "AuthMiddleware", "Caller", "caller_of"]

CALLER_SCOPE_KEY = "chatsse.caller"
PUBLIC_PATHS = frozenset({"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPERATOR_PATHS = frozenset({"/metrics", "/stats"})
_REALM = 'Bearer realm="chatsse"'


@dataclass(frozen=True, slots=True)
class Caller:
    owner: str  # the key's id: the owner of what it makes ("": no keys)
    key: ApiKey | None = None


ANONYMOUS = Caller("")


def caller_of(scope: Scope) -> Caller:
    """The request's caller (:data:`ANONYMOUS` on a server without keys)."""
    caller: Caller = scope.get(CALLER_SCOPE_KEY, ANONYMOUS)
    return caller


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class AuthMiddleware:
    """``serves(method, path)``: whether a route's handler would answer the request. One that
    reaches none (an unknown path, a method the path does not serve, a CORS preflight) gets its
    404 or 405 without a key: no handler runs, and the schema is public anyway."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        serves: Callable[[str, str], bool],
        operator_routes_open: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.serves = serves
        self.operator_routes_open = operator_routes_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        key = self.keys.authenticate(token) if token else None
        if key is None and not self.serves(scope["method"], path):
            await self.app(scope, receive, send)
            return
        if key is None:
            if token is None:
                message, challenge = "no API key: send it as 'Authorization: Bearer <key>'", _REALM
            else:
                message, challenge = "invalid API key", f'{_REALM}, error="invalid_token"'
            await send_error(send, 401, "invalid_api_key", message, path, [(b"www-authenticate", challenge)])
            return
        if path in OPERATOR_PATHS and not (key.admin or self.operator_routes_open):
            message = f"{path} needs an admin key (chatsse keys create --admin)"
            await send_error(send, 403, "permission_denied", message, path)
            return
        scope[CALLER_SCOPE_KEY] = Caller(key.id, key)
        await self.app(scope, receive, send)

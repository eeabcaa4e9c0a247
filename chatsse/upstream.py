"""The upstream engine: each turn forwarded to an OpenAI-compatible server (vLLM, llama.cpp,
Ollama, a hosted API, another chatsse), its reply streamed back as it arrives.

``CHATSSE_ENGINE=openai`` with ``CHATSSE_UPSTREAM_URL`` (the base URL, ending in ``/v1``) and
``CHATSSE_UPSTREAM_MODEL``. One pooled aiohttp session per worker process, at most
``CHATSSE_UPSTREAM_MAX_CONNECTIONS`` connections. Per turn::

    start()      POST {base}/chat/completions, stream on, usage asked for; wait for the status.
                 A connection failure, 502, 503 or 504 is retried (CHATSSE_UPSTREAM_RETRIES, with
                 a short backoff); nothing has been sent to the client yet, so a retry is safe.
                 A refusal becomes the client's HTTP error (chatsse/errors.py):
                   429 -> 429 upstream_rate_limited, with the upstream's Retry-After
                   400, 422 -> 400 upstream_rejected;  other 4xx, 5xx -> 502 upstream_error
                   unreachable, 503 -> 503 upstream_unavailable;  no answer -> 504 upstream_timeout
    __anext__()  read what has arrived (one network read), parse its events, return the content
                 deltas in it. An in-band error, a malformed chunk, a broken connection or a
                 stream cut before [DONE] raises: the client gets ``event: error`` (engine_error).
    aclose()     the client went away, or a deadline: close the upstream connection at once, so
                 the upstream stops generating and frees its slot. A finished reply returns its
                 connection to the pool instead.

Deadlines: connecting is bounded by ``CHATSSE_UPSTREAM_CONNECT_TIMEOUT`` and ``start`` as a
whole by the first-token deadline; the gaps between tokens are the watchdog's
(``CHATSSE_ENGINE_IDLE_TIMEOUT``, chatsse/lifecycle.py), which calls ``aclose``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Final

import aiohttp

from chatsse.engine import DEFAULT_OPTIONS, CompletionReason, GenerationOptions, count_prompt_tokens
from chatsse.errors import (
    ApiError,
    ChatsseError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from chatsse.eventstream import EventStreamParser
from chatsse.models import Message

__all__ = ["UpstreamEngine", "UpstreamGeneration", "UpstreamStreamError"]

_RETRIED: Final = frozenset({502, 503, 504})
_BACKOFF: Final = 0.1  # seconds before the first retry; doubled for each further one
_ERROR_TEXT_LIMIT: Final = 2048
_loads = json.loads


class UpstreamStreamError(ChatsseError):
    """The upstream's stream failed after it began."""


def _retry_after(response: aiohttp.ClientResponse) -> int:
    try:
        return max(1, int(float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1


async def _error_text(response: aiohttp.ClientResponse) -> str:
    """The upstream's error message (its JSON error's ``message``, or the start of its body)."""
    try:
        raw = await response.content.read(_ERROR_TEXT_LIMIT)
    except (aiohttp.ClientError, OSError):
        raw = b""
    finally:
        response.close()
    text = raw.decode(errors="replace")
    try:
        error = _loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message) if message else text
    except (ValueError, AttributeError):
        return text.strip() or response.reason or ""


class UpstreamEngine:
    """Forwards each turn to an OpenAI-compatible ``/chat/completions`` (module docstring)."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "",
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        start_timeout: float = 60.0,
        retries: int = 1,
    ) -> None:
        self.name = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout
        self.retries = retries
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The worker's pooled session, made in its event loop on first use."""
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
            session = self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False
            )
        return session

    def request_body(self, messages: Sequence[Message], max_tokens: int, options: GenerationOptions) -> bytes:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
        }
        for name in ("temperature", "top_p", "seed", "user"):
            value = getattr(options, name)
            if value is not None:
                body[name] = value
        if options.stop:
            body["stop"] = list(options.stop)
        return json.dumps(body, separators=(",", ":")).encode()

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> UpstreamGeneration:
        return UpstreamGeneration(self, self.request_body(messages, max_tokens, options), messages)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class UpstreamGeneration:
    """One reply from the upstream (the module docstring has its three steps)."""

    __slots__ = (
        "_body", "_done", "_engine", "_failure", "_parser", "_response", "_usage", "completion_tokens",
        "finish_reason", "prompt_tokens",
    )  # fmt: skip

    def __init__(self, engine: UpstreamEngine, body: bytes, messages: Sequence[Message]) -> None:
        self._engine = engine
        self._body = body
        self._response: aiohttp.ClientResponse | None = None
        self._parser = EventStreamParser()
        self._done = False
        self._failure: UpstreamStreamError | None = None  # raised once the deltas before it are out
        self._usage = False  # the upstream reported usage: its counts replace chatsse's
        self.prompt_tokens = count_prompt_tokens(messages)
        self.completion_tokens = 0
        self.finish_reason: CompletionReason | None = None

    async def start(self) -> None:
        engine = self._engine
        try:
            async with asyncio.timeout(engine.start_timeout):
                self._response = await self._post()
        except TimeoutError:
            raise UpstreamTimeout(
                f"the upstream model at {engine.url} did not answer within {engine.start_timeout:g} s"
            ) from None

    async def _post(self) -> aiohttp.ClientResponse:
        engine = self._engine
        failure: ApiError | None = None
        for attempt in range(engine.retries + 1):
            if attempt:
                await asyncio.sleep(_BACKOFF * 2 ** (attempt - 1))
            try:
                response = await engine.session.post(engine.url, data=self._body, headers=engine.headers)
            except (aiohttp.ClientConnectionError, OSError) as exc:
                failure = UpstreamUnavailable(f"cannot reach the upstream model at {engine.url}: {exc}")
                continue
            if response.status == 200:
                if not response.content_type.startswith("text/event-stream"):
                    response.close()
                    raise UpstreamError(f"the upstream answered {response.content_type}, not an event stream")
                return response
            failure = await self._refused(response)
            if response.status not in _RETRIED:
                break
        assert failure is not None
        raise failure

    async def _refused(self, response: aiohttp.ClientResponse) -> ApiError:
        status, text = response.status, await _error_text(response)
        said = f"the upstream model answered {status}: {text}"
        if status == 429:
            return UpstreamRateLimited(said, retry_after=_retry_after(response))
        if status in (400, 422):
            return UpstreamRejected(said)
        if status == 503:
            return UpstreamUnavailable(said)
        if status in (401, 403):
            said += " (check CHATSSE_UPSTREAM_API_KEY)"
        elif status == 404:
            said += f" (is {self._engine.name!r} its model, and {self._engine.url} its URL?)"
        return UpstreamError(said)

    def __aiter__(self) -> UpstreamGeneration:
        return self

    async def __anext__(self) -> list[str]:
        if self._failure is not None:
            self._drop()
            raise self._failure
        response = self._response
        if response is None or self._done:
            if response is not None:
                self._finish()
            raise StopAsyncIteration
        read, feed = response.content.readany, self._parser.feed
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, OSError) as exc:
                raise UpstreamStreamError(f"the upstream connection broke mid-reply: {exc!r}") from None
            if not chunk:
                return self._ended()
            deltas = self._deltas(feed(chunk))
            if deltas:
                if not self._usage:
                    self.completion_tokens += len(deltas)
                return deltas
            if self._done:
                self._finish()
                raise StopAsyncIteration

    def _deltas(self, events: Sequence[Any]) -> list[str]:
        deltas: list[str] = []
        for event in events:
            data = event.data
            if data == "[DONE]":
                self._done = True
                break
            try:
                payload = _loads(data)
                error = payload.get("error")
                choices = payload.get("choices")
            except (ValueError, AttributeError):
                return self._fail(deltas, f"the upstream sent a malformed chunk: {data[:200]!r}")
            if error:
                message = error.get("message") if isinstance(error, dict) else error
                return self._fail(deltas, f"the upstream model failed mid-reply: {message}")
            if choices:
                choice = choices[0]
                content = (choice.get("delta") or {}).get("content")
                if content:
                    deltas.append(content)
                reason = choice.get("finish_reason")
                if reason:
                    self.finish_reason = "length" if reason == "length" else "stop"
            usage = payload.get("usage")
            if usage:
                self._usage = True
                self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
                self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        return deltas

    def _fail(self, deltas: list[str], message: str) -> list[str]:
        """The deltas that came before a failure go out first; the failure is raised next."""
        self._failure = UpstreamStreamError(message)
        if not deltas:
            self._drop()
            raise self._failure
        return deltas

    def _ended(self) -> list[str]:
        """The upstream closed the stream: the end if it said so, else a failure."""
        if self._done or self.finish_reason is not None:
            self._done = True
            self._finish()
            raise StopAsyncIteration
        self._drop()
        raise UpstreamStreamError("the upstream closed the stream before the reply ended")

    def _finish(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "stop"
        response, self._response = self._response, None
        if response is not None:
            response.release()  # read to its end: the connection goes back to the pool

    def _drop(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()  # drops the connection: the upstream sees the client go

    async def aclose(self) -> None:
        self._done = True
        self._drop()

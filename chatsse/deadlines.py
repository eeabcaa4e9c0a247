"""Every time bound chatsse applies, derived from settings in one function: :func:`derive`.

A request's life, and what bounds each wait in it::

    connect -> request line, headers header        (CHATSSE_HEADER_TIMEOUT)
            -> the request's body .. body          (CHATSSE_BODY_TIMEOUT, from the headers' end)
    admit -> begin_turn ............ store         (CHATSSE_STORE_TIMEOUT)
          -> first token ........... first_token   (CHATSSE_ENGINE_FIRST_TOKEN_TIMEOUT)
          -> each next token ....... token_gap     (CHATSSE_ENGINE_IDLE_TIMEOUT)
          -> each socket write ..... write         (CHATSSE_WRITE_TIMEOUT; the last one too)
          -> the whole reply ....... reply         (CHATSSE_REQUEST_TIMEOUT)
          -> finish_turn ........... store

The engine, write and reply bounds are checked by the lifecycle's watchdog every ``tick``
seconds (chatsse/lifecycle.py), so a stream pays no timer per token; a bound is therefore
enforced within one tick of its value. Store calls run under ``asyncio.timeout``. The header
and body bounds are checked by the server's sweep of its connections every ``sweep`` seconds
(chatsse/connection.py), so a request pays no timer either.

On shutdown, streams get ``grace`` seconds; then each still open stores its partial reply
(``store``) and writes its last event (``write``). The server's own graceful timeout, and
gunicorn's after it, cover exactly that, and a turn lock outlives the longest a turn can hold
it (``lock_ttl``), so only a dead worker's lock is ever taken over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatsse.settings import Settings

__all__ = ["Deadlines", "derive"]

LOCK_MARGIN = 30.0
"""Seconds a turn lock outlives the longest turn: room for clock steps and scheduling stalls."""


@dataclass(frozen=True, slots=True)
class Deadlines:
    store: float
    first_token: float
    token_gap: float
    write: float
    reply: float
    grace: float
    keepalive: float
    tick: float
    lock_ttl: float
    server_shutdown: float  # uvicorn's timeout_graceful_shutdown
    gunicorn_graceful: int  # gunicorn's graceful_timeout: after it, gunicorn kills the worker
    gunicorn_timeout: int  # gunicorn's heartbeat timeout; a draining worker sends no heartbeat
    busy_retry_after: int  # the Retry-After of a 503 server_busy: a client's SSE retry delay
    header: float  # a request's line and headers, from its first byte (or the connection's opening)
    body: float  # a request's body, from the end of its headers
    sweep: float  # seconds between two looks of the server at every connection's head and body (0.1 to 0.5)


def derive(settings: Settings) -> Deadlines:
    """The deadlines of a server with these settings."""
    store, write, reply = settings.store_timeout, settings.write_timeout, settings.request_timeout
    first_token, token_gap = settings.engine_first_token_timeout, settings.engine_idle_timeout
    keepalive = settings.sse_keepalive_interval
    tick = max(0.01, min(1.0, keepalive / 2, reply / 4, first_token / 4, token_gap / 4, write / 4))
    # After the grace period: one tick to notice, the partial reply stored, the last event written.
    server_shutdown = settings.shutdown_grace_period + tick + store + write + 1.0
    gunicorn_graceful = math.ceil(server_shutdown) + 1
    return Deadlines(
        store=store,
        first_token=first_token,
        token_gap=token_gap,
        write=write,
        reply=reply,
        grace=settings.shutdown_grace_period,
        keepalive=keepalive,
        tick=tick,
        # begin_turn, the reply (and one tick for the watchdog to end it), finish_turn.
        lock_ttl=store + reply + tick + store + LOCK_MARGIN,
        server_shutdown=server_shutdown,
        gunicorn_graceful=gunicorn_graceful,
        gunicorn_timeout=max(30, gunicorn_graceful + 5),
        busy_retry_after=max(1, round(settings.sse_retry_ms / 1000)),
        header=settings.header_timeout,
        body=settings.body_timeout,
        # In tenths of a second: the server sweeps on uvicorn's own 0.1 s tick.
        sweep=max(1, min(5, math.floor(10 * min(settings.header_timeout, settings.body_timeout) / 4))) / 10,
    )

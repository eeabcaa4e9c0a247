"""What does one SSE event cost the server, framework by framework? (no sockets)

Drives ASGI apps directly with an in-memory ``send`` that discards bytes, so only the
Python work per event is measured: encoding, the response machinery and middleware.
Variants, cheapest first:

- ``bare-asgi``: a raw ASGI app sending pre-encoded event bytes (the floor).
- ``sse-starlette-bytes``: ``EventSourceResponse`` over an async generator of bytes.
- ``sse-starlette-objects``: the same with a ``ServerSentEvent`` object per event
  (the common way to use it).
- ``chatsse-response``: chatsse's ``EventStreamResponse`` with a producer emitting bytes.
- ``chatsse-chat``: the full ``POST /chat`` route (FastAPI, middleware, conversation
  store, engine with zero delays, encoder), CPU per streamed event.

Usage: ``python scripts/bench_sse.py [--events 500] [--requests 200] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from chatsse import Settings, create_app
from chatsse.chat import ChatEvents
from chatsse.conversations import Turn
from chatsse.deadlines import derive
from chatsse.lifecycle import Lifecycle
from chatsse.models import Message
from chatsse.sse import Emit, EventStreamResponse

Scope = dict[str, Any]
App = Callable[[Scope, Any, Any], Awaitable[None]]


def _scope(path: str = "/", method: str = "GET", body: bytes = b"") -> Scope:
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "state": {},
    }  # fmt: skip


async def _drive(app: App, scope: Scope, body: bytes = b"") -> int:
    """Run one request; returns the number of body chunks sent."""
    sent = 0
    done = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        if message["type"] == "http.response.body" and message.get("body"):
            sent += 1

    await app(scope, receive, send)
    done.set()
    # A server's loop runs what a request scheduled (its disconnect listener ending) between
    # requests; without this, every request's leftovers would pile up until the run ends.
    await asyncio.sleep(0)
    return sent


def _event_bytes(n: int) -> list[bytes]:
    user = Message("msg_user", "user", "bench", 0.0)
    enc = ChatEvents(Turn("conv", user, "msg_bench", [user], new=True, token="t"), model="bench", retry_ms=0)
    return [enc.delta(f" tok{i}") for i in range(n)]


def bare_asgi(events: int) -> App:
    chunks = _event_bytes(events)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def sse_starlette_bytes(events: int) -> App:
    chunks = _event_bytes(events)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        async def gen() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        await EventSourceResponse(gen(), ping=600)(scope, receive, send)

    return app


def sse_starlette_objects(events: int) -> App:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        async def gen() -> AsyncIterator[ServerSentEvent]:
            for i in range(events):
                yield ServerSentEvent(json.dumps({"delta": f" tok{i}"}), event="message", id=f"msg_bench:{i}")

        await EventSourceResponse(gen(), ping=600)(scope, receive, send)

    return app


class _BytesProducer:
    """Writes pre-encoded events: chatsse's response machinery and nothing else."""

    def __init__(self, chunks: list[bytes], lifecycle: Lifecycle, slot: Any) -> None:
        self.chunks, self.lifecycle, self.slot = chunks, lifecycle, slot

    async def run(self, emit: Emit) -> bytes:
        for chunk in self.chunks:
            await emit(chunk)
        return b""

    async def stopped(self, reason: Any) -> bytes | None:
        return None

    async def close(self) -> None:
        self.lifecycle.release(self.slot)


def chatsse_response(events: int) -> App:
    chunks = _event_bytes(events)
    settings = Settings(_env_file=None, sse_keepalive_interval=600)  # type: ignore[call-arg]

    class _Gauge:
        def inc(self) -> None: ...

        def dec(self) -> None: ...

    lifecycle = Lifecycle(derive(settings), max_streams=10**6, gauge=_Gauge())

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        slot = lifecycle.admit()
        await EventStreamResponse(_BytesProducer(chunks, lifecycle, slot), slot)(scope, receive, send)

    return app


async def _measure(app: App, requests: int, scope_body: tuple[Scope, bytes]) -> tuple[float, int]:
    scope, body = scope_body
    await _drive(app, dict(scope), body)  # warm-up
    events = 0
    cpu = time.process_time()
    for _ in range(requests):
        events += await _drive(app, dict(scope), body)
    return time.process_time() - cpu, events


async def run(events: int, requests: int) -> dict[str, dict[str, float]]:
    plain = (_scope(), b"")
    variants: dict[str, tuple[App, tuple[Scope, bytes]]] = {
        "bare-asgi": (bare_asgi(events), plain),
        "sse-starlette-bytes": (sse_starlette_bytes(events), plain),
        "sse-starlette-objects": (sse_starlette_objects(events), plain),
        "chatsse-response": (chatsse_response(events), plain),
    }
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        sim_ttft_ms=0, sim_prefill_ms_per_token=0, sim_token_interval_ms=0, sim_jitter=0,
        sim_reply_tokens_min=events, sim_reply_tokens_max=events, max_reply_tokens=events,
        max_conversations=requests * 2 + 10, log_level="warning",
    )  # fmt: skip
    chat_app = create_app(settings)
    body = json.dumps({"message": "How fast is one event?"}).encode()
    variants["chatsse-chat"] = (chat_app, (_scope("/chat", "POST", body), body))  # type: ignore[assignment]
    results: dict[str, dict[str, float]] = {}
    for name, (app, scope_body) in variants.items():
        cpu, sent = await _measure(app, requests, scope_body)
        results[name] = {"events": sent, "cpu_s": cpu, "us_per_event": 1e6 * cpu / sent}
    floor = results["bare-asgi"]["us_per_event"]
    for row in results.values():
        row["x_bare"] = row["us_per_event"] / floor
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=500, help="events per request")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = asyncio.run(run(args.events, args.requests))
    print(f"{'variant':<24}{'events':>10}{'us/event':>10}{'x bare':>8}")
    for name, row in results.items():
        print(f"{name:<24}{int(row['events']):>10}{row['us_per_event']:>10.2f}{row['x_bare']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()

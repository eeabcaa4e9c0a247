"""One streamed chat turn: engine deltas in, SSE events out, the reply stored however it ends.

The flow of one ``POST /chat`` (see README, "Protocol")::

    route: size and capacity checks -> manager.begin_turn (lock, store user message)
    EventStreamResponse (chatsse/sse.py), the body in a task of its own:
        ChatStream.__call__ (producer):  connected -> message* -> store reply -> completed
        cancelled when the client goes away, or by the app's drain after the grace period
        (then ChatStream.shutdown writes the final event)
    EventStreamResponse.__call__ finally: ChatStream.close() -> store a partial reply if
        the producer never finished (client gone), release the stream slot, record metrics

Every turn stores exactly one assistant message: the text the server sent, with a
finish reason of ``stop`` or ``length`` (complete), ``interrupted`` (client disconnected),
``timeout`` (``CHATSSE_REQUEST_TIMEOUT`` passed), ``shutdown`` (the server stopped before
the reply finished, after ``CHATSSE_SHUTDOWN_GRACE_PERIOD``) or ``error`` (the engine failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

from chatsse.conversations import ConversationManager, Turn
from chatsse.engine import Engine, Generation
from chatsse.metrics import Metrics
from chatsse.models import FinishReason, Message
from chatsse.sse import Emit, StreamEncoder

CLEANUP_TIMEOUT = 5.0  # bound on storing a reply after the client is gone


class ChatStream:
    """The producer for one turn's event stream (see module docstring)."""

    def __init__(
        self,
        *,
        turn: Turn,
        engine: Engine,
        manager: ConversationManager,
        metrics: Metrics,
        max_tokens: int,
        timeout: float,
        retry_ms: int,
        arrived: float,
        log_fields: dict[str, Any],
        release: Callable[[], None],
    ) -> None:
        self.turn = turn
        self.engine = engine
        self.manager = manager
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.retry_ms = retry_ms
        self.arrived = arrived
        self.log_fields = log_fields
        self._release = release
        self.encoder = StreamEncoder(turn.reply_id)
        self.parts: list[str] = []
        self.first_token_at: float | None = None
        self.generation: Generation | None = None
        self.finish_reason: FinishReason | None = None
        self._closed = False
        self._generated = False  # the engine ran to its end

    def _ms_since_arrival(self, at: float) -> float:
        return round((at - self.arrived) * 1000, 3)

    async def __call__(self, emit: Emit) -> bytes | None:
        """Stream the turn; returns the ``completed`` event (the response sends it with the
        end of the body), or None after writing an ``error`` event."""
        turn, enc, parts = self.turn, self.encoder, self.parts
        try:
            with anyio.fail_after(self.timeout):
                await emit(
                    enc.event(
                        "connected",
                        {
                            "conversation_id": turn.conversation_id,
                            "user_message_id": turn.user_message.id,
                            "message_id": turn.reply_id,
                            "model": self.engine.name,
                            "created": turn.user_message.created_at,
                        },
                        retry=self.retry_ms,
                    )
                )
                generation = self.generation = self.engine.generate(turn.prompt, max_tokens=self.max_tokens)
                delta_event, append = enc.delta, parts.append
                async for delta in generation:
                    await emit(delta_event(delta))
                    if not parts:
                        self.first_token_at = time.perf_counter()
                    append(delta)
                reason: FinishReason = generation.finish_reason or "stop"
                self._generated = True
        except TimeoutError:
            await self._fail("timeout", f"no complete reply within {self.timeout:g} s", emit)
            return None
        except Exception as exc:
            await self._fail("error", f"{type(exc).__name__}: {exc}", emit, error_type="engine_error")
            return None

        content = "".join(parts)
        try:
            await self._finish(content, reason)
        except Exception as exc:
            await self._emit_error(emit, "storage_error", f"reply not stored: {exc}")
            return None
        done = time.perf_counter()
        prompt_tokens = self.generation.prompt_tokens
        completion_tokens = self.generation.completion_tokens
        return enc.event(
            "completed",
            {
                "conversation_id": turn.conversation_id,
                "message_id": turn.reply_id,
                "content": content,
                "finish_reason": reason,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "timings": {
                    "ttft_ms": (self._ms_since_arrival(self.first_token_at) if self.first_token_at else None),
                    "total_ms": self._ms_since_arrival(done),
                },
            },
        )

    async def _fail(
        self, reason: FinishReason, message: str, emit: Emit, *, error_type: str | None = None
    ) -> None:
        try:
            await self._finish("".join(self.parts), reason)
        except Exception as exc:
            message = f"{message}; partial reply not stored: {exc}"
        await self._emit_error(emit, error_type or reason, message)

    async def _emit_error(self, emit: Emit, error_type: str, message: str) -> None:
        self.log_fields["error"] = error_type
        data = {"type": error_type, "message": message, "message_id": self.turn.reply_id}
        with anyio.move_on_after(CLEANUP_TIMEOUT):
            await emit(self.encoder.event("error", data))

    async def _finish(self, content: str, reason: FinishReason) -> Message | None:
        """Store the reply once; later calls do nothing. Shielded: a cancellation arriving
        mid-write must not leave the turn half-stored."""
        if self.finish_reason is not None:
            return None
        self.finish_reason = reason
        with anyio.CancelScope(shield=True):
            reply = await self.manager.finish_turn(self.turn, content, reason)
        return reply

    async def shutdown(self, emit: Emit) -> None:
        """The server is stopping and the grace period is over: store what was sent and
        tell the client to reconnect elsewhere."""
        await self._fail("shutdown", "the server is shutting down; retry the message", emit)

    async def close(self) -> None:
        """Called once when the response ends, however it ends."""
        if self._closed:
            return
        self._closed = True
        if self._generated and self.finish_reason is not None:  # the usual end: nothing to clean up
            self._release()
            self._record()
            return
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                if self.generation is not None:
                    await self.generation.aclose()
                await self._finish("".join(self.parts), "interrupted")
        finally:
            self._release()
            self._record()

    def _record(self) -> None:
        m = self.metrics
        outcome = self.finish_reason or "interrupted"
        tokens = len(self.parts)
        m.streams.labels(outcome).inc()
        m.stream_events.inc(self.encoder.seq)
        m.stream_tokens.inc(tokens)
        if self.first_token_at is not None:
            m.first_event.observe(self.first_token_at - self.arrived)
        fields = self.log_fields
        fields["conversation_id"] = self.turn.conversation_id
        fields["outcome"] = outcome
        fields["tokens"] = tokens
        fields["events"] = self.encoder.seq
        if self.first_token_at is not None:
            fields["ttft_ms"] = self._ms_since_arrival(self.first_token_at)

"""One turn streamed to one client, whatever the front: :class:`TurnStream`.

The turn machinery every protocol shares. A front (``POST /chat``, chatsse/chat.py;
``POST /v1/chat/completions`` and ``POST /v1/responses``, chatsse/openai/) parses its request
and calls :func:`open_turn` with how to begin its turn and its :class:`ReplyFormat` (the bytes
of its opening, its per-token events, its last event and its error events). ``open_turn``
admits the stream (chatsse/lifecycle.py), begins the turn (for a stateful front, in the store:
chatsse/conversations.py), starts the engine's generation (an upstream model may refuse it
here, before the response starts) and returns the response. The :class:`TurnStream` does the
rest the same way for every front: pulls tokens from the engine, marks what it waits on for
the watchdog, stores the reply once however the stream ends (in its :class:`ReplySink`: the
conversation, or nowhere for a stateless front), classifies the end
(:data:`chatsse.protocol.ENDINGS`) and records one metrics update and one log line.

How a stream can end, and who ends it::

    run() returns ............ the reply completed (or the engine or an encoder failed)
    run() cancelled .......... Slot.stop(reason): client gone, a deadline, the drain
      -> stopped(reason)       store the partial reply, the last event for that reason
    close() .................. always, once: release the slot, record the outcome
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Scope

from chatsse.auth import caller_of
from chatsse.conversations import ConversationManager, Turn
from chatsse.engine import Generation, GenerationOptions
from chatsse.errors import ApiError, StorageUnavailable, TurnLost
from chatsse.lifecycle import FIRST_TOKEN, NEXT_TOKEN, STORING, WRITING, Lifecycle, Slot
from chatsse.limits import Admission
from chatsse.logs import get_logger
from chatsse.metrics import Metrics
from chatsse.middleware import SCOPE_ARRIVED, SCOPE_LOG_FIELDS
from chatsse.models import Message
from chatsse.protocol import ENDINGS, INTERRUPTED, FinishReason, Outcome
from chatsse.replay import ReplayMeta
from chatsse.replay.recorder import Recording, ReplayRecorder
from chatsse.replay.signals import STOP, ReplySignals, SignalKind
from chatsse.sse import CollectedResponse, Emit, EventStreamResponse
from chatsse.state import AppState

__all__ = [
    "Begun",
    "ReplyFormat",
    "ReplySink",
    "StoredReply",
    "TurnResult",
    "TurnStream",
    "Unstored",
    "open_turn",
]

log = get_logger("chatsse.turns")


@dataclass(frozen=True, slots=True)
class RecordingPlan:
    """Where a stream is recorded for resumption, and how it hears signals (stop, resumed)."""

    recorder: ReplayRecorder
    signals: ReplySignals
    reply_id: str
    meta: ReplayMeta
    resume_window: float  # seconds it goes on without a client (CHATSSE_RESUME_WINDOW)


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A completed, stored reply, for a front's last event."""

    content: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None  # request arrival to the first token sent
    total_ms: float  # request arrival to the reply stored


class ReplyFormat(Protocol):
    """How one front writes a turn: each method returns the bytes of one event (or several).
    A buffered front's ``completed`` and ``error`` return the whole body, and set ``status``."""

    status: int

    def opening(self) -> bytes: ...

    def delta(self, text: str) -> bytes:
        """The per-token hot path: keep it to a few string operations."""
        ...

    def completed(self, result: TurnResult) -> bytes: ...

    def error(self, error_type: str, message: str) -> bytes: ...


class ReplySink(Protocol):
    """Where a turn's reply is stored, once, however the stream ends."""

    conversation_id: str | None
    repair_window: float  # how long a store that did not answer may still store it

    async def store(self, content: str, finish_reason: FinishReason) -> None:
        """Raises ``StorageUnavailable`` or ``TurnLost`` if the reply is not stored."""
        ...


class StoredReply:
    """The reply goes into the turn's conversation (and ends the turn there)."""

    __slots__ = ("conversation_id", "manager", "repair_window", "turn")

    def __init__(self, manager: ConversationManager, turn: Turn) -> None:
        self.manager = manager
        self.turn = turn
        self.conversation_id: str | None = turn.conversation_id
        self.repair_window = manager.repair_window

    async def store(self, content: str, finish_reason: FinishReason) -> None:
        await self.manager.finish_turn(self.turn, content, finish_reason)


class Unstored:
    """A stateless front's reply: nothing is kept."""

    __slots__ = ()
    conversation_id: str | None = None
    repair_window = 0.0

    async def store(self, content: str, finish_reason: FinishReason) -> None:
        return None


@dataclass(slots=True)
class Begun:
    """A turn a front has begun: the engine's prompt, where its reply goes, and how to undo
    the beginning if the turn cannot stream after all."""

    prompt: list[Message]
    reply: ReplySink
    undo: Callable[[], Awaitable[None]] | None = None


async def open_turn(
    state: AppState,
    scope: Scope,
    *,
    begin: Callable[[], Awaitable[Begun]],
    reply_format: Callable[[Begun], ReplyFormat],
    max_tokens: int,
    options: GenerationOptions,
    buffered: bool = False,
    replay_front: str | None = None,
) -> Response:
    """Admit a stream, begin its turn, start the engine; the response that streams it (or,
    ``buffered``, that answers it in one body when it ends). An ``ApiError`` on the way is
    counted as a rejection and raised for the front to answer; what was begun is undone.
    ``replay_front``: record the stream in the replay log under that front's name (a stored
    turn only), so a client can resume it (chatsse/replay/)."""
    lifecycle, limits = state.lifecycle, state.limits
    admission: Admission | None = None
    try:
        slot = lifecycle.admit()
        try:
            admission = await limits.admit(caller_of(scope))
            begun = await begin()
            try:
                generation = state.engine.generate(begun.prompt, max_tokens=max_tokens, options=options)
                await generation.start()
            except BaseException:
                if begun.undo is not None:
                    await begun.undo()
                raise
        except BaseException:
            lifecycle.release(slot)
            limits.finish(admission, 0)
            raise
    except ApiError as exc:
        state.metrics.reject(exc.type)
        raise
    writer = reply_format(begun)
    recording: RecordingPlan | None = None
    if replay_front is not None and isinstance(begun.reply, StoredReply):
        turn = begun.reply.turn
        recording = RecordingPlan(
            state.recorder,
            state.signals,
            turn.reply_id,
            ReplayMeta(turn.conversation_id, replay_front),
            state.settings.resume_window,
        )
    stream = TurnStream(
        generation=generation,
        reply=begun.reply,
        slot=slot,
        lifecycle=lifecycle,
        reply_format=writer,
        metrics=state.metrics,
        arrived=scope.get(SCOPE_ARRIVED, time.perf_counter()),
        log_fields=scope.get(SCOPE_LOG_FIELDS, {}),
        recording=recording,
        on_close=None if admission is None else partial(limits.finish, admission),
    )
    headers = None if admission is None else admission.headers
    if buffered:
        return CollectedResponse(stream, slot, lambda: writer.status, headers=headers)
    return EventStreamResponse(stream, slot, headers=headers)


class TurnStream:
    """The producer of one turn's event stream (see the module docstring)."""

    __slots__ = (
        "_closed", "_generated", "_on_close", "_plan", "_stored", "arrived", "final_event", "first_token_at",
        "format", "generation", "lifecycle", "log_fields", "metrics", "opened", "outcome", "parts",
        "recording", "reply", "slot",
    )  # fmt: skip

    def __init__(
        self,
        *,
        generation: Generation,
        reply: ReplySink,
        slot: Slot,
        lifecycle: Lifecycle,
        reply_format: ReplyFormat,
        metrics: Metrics,
        arrived: float,
        log_fields: dict[str, Any],
        recording: RecordingPlan | None = None,
        on_close: Callable[[int], None] | None = None,
    ) -> None:
        self.generation = generation
        self._on_close = on_close  # told the tokens the turn used, once it has ended
        self._plan = recording
        self.recording: Recording | None = None
        self.reply = reply
        self.slot = slot
        self.lifecycle = lifecycle
        self.format = reply_format
        self.metrics = metrics
        self.arrived = arrived
        self.log_fields = log_fields
        self.parts: list[str] = []
        self.first_token_at: float | None = None
        self.outcome: Outcome | None = None
        self.opened = False
        self.final_event = False
        self._stored = False  # the one store of the reply was made (or tried)
        self._generated = False  # the engine ran to its end
        self._closed = False

    def _ms_since_arrival(self, at: float) -> float:
        return round((at - self.arrived) * 1000, 3)

    # --- the stream ---

    async def run(self, emit: Emit) -> bytes:
        """Stream the turn and store the reply; returns the last event (``completed``, or an
        ``error`` if the engine, an encoder or the store failed)."""
        slot = self.slot
        slot.phase = WRITING
        try:
            opening = self.format.opening()
            await emit(opening)
        except Exception as exc:
            return await self._failed("internal_error", exc)
        self.opened = True
        plan = self._plan
        if plan is not None:
            self.recording = plan.recorder.start(plan.reply_id, plan.meta, opening.decode(), self.parts)
            plan.signals.watch(plan.reply_id, self._signal)
            slot.resume_window = plan.resume_window
        generation = self.generation
        next_batch, encode = generation.__anext__, self.format.delta
        send, append = slot.body_send, self.parts.append
        waiting = FIRST_TOKEN
        try:
            while True:
                slot.phase = waiting
                try:
                    batch = await next_batch()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    return await self._failed("engine_error", exc)
                if waiting == FIRST_TOKEN:
                    self.first_token_at = time.perf_counter()
                    waiting = NEXT_TOKEN
                slot.phase = WRITING
                slot.wrote = True
                if slot.disconnected:  # gone, kept for a resume: the log gets the tokens
                    for text in batch:
                        encode(text)  # unsent, but numbered: the events after it keep their ids
                        append(text)
                    continue
                for text in batch:  # the per-token hot path: one event, one send
                    await send({"type": "http.response.body", "body": encode(text), "more_body": True})
                    append(text)
                    if slot.stop_reason is not None:  # stopped while writing (see _stopped_mid_batch)
                        await self._stopped_mid_batch()
        except Exception as exc:
            return await self._failed("internal_error", exc)
        self._generated = True
        return await self._complete(generation.finish_reason or "stop")

    async def _stopped_mid_batch(self) -> None:
        """The slot was stopped while a batch was being written: the watchdog cut a stalled
        connection (after which a server's ``send`` returns at once, the bytes going nowhere),
        or a stop's cancel waits for the loop. Yield to the loop, so that the stop's cancel
        lands here, instead of "sending" the rest of the batch into a closed connection and
        storing the reply as complete."""
        self.slot.stop(self.slot.stop_reason or "internal_error")  # schedules the cancel
        await asyncio.sleep(0)

    def _signal(self, kind: SignalKind) -> None:
        """A signal from any worker (chatsse/replay/signals.py)."""
        if kind == STOP:
            self.slot.stop("stopped")
        else:  # a client resumes it: keep it going, and write what it has not read yet now
            self.slot.resumed()
            if self._plan is not None:
                self._plan.recorder.follow()

    async def stopped(self, reason: Outcome) -> bytes | None:
        """The stream was stopped mid-turn (``Slot.stop``): store what was sent; the last event
        for ``reason``, or None when no event can or need be sent."""
        await self._end_generation()
        if reason == "stopped":  # a client asked for it: the reply so far is the reply
            return await self._complete("stopped")
        ending = ENDINGS[reason]
        stored = await self._store(ending.finish_reason or "interrupted")
        self.outcome = reason
        if ending.error_type is None or self.slot.disconnected:
            return None
        message = self._stop_message(reason)
        if stored is not None:
            message += f"; {stored[1]}"
        # Stopped before it began (a drain reached it still in begin_turn): it opens all the same.
        opening = b"" if self.opened else self.format.opening()
        self.opened = True
        return opening + self._error(ending.error_type, message)

    async def close(self) -> None:
        """Called once when the response ends, however it ends: store a partial reply if the
        stream never did (an unexpected error), release the slot, record the outcome."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._stored:
                slot = self.slot
                fallback: Outcome = "client_disconnected" if slot.disconnected else "internal_error"
                self.outcome = self.outcome or slot.stop_reason or fallback
                await self._end_generation()
                await self._store("interrupted")
        finally:
            if self._plan is not None:
                self._plan.signals.unwatch(self._plan.reply_id)
            self._end_recording()
            self.lifecycle.release(self.slot)
            if self._on_close is not None:
                generation = self.generation
                self._on_close(generation.prompt_tokens + generation.completion_tokens)
            self._record()

    # --- endings ---

    async def _complete(self, finish_reason: FinishReason) -> bytes:
        content = "".join(self.parts)
        failed = await self._store(finish_reason, content)
        if failed is not None:
            self.outcome = failed[0]
            return self._error(failed[0], failed[1])
        self.outcome = finish_reason  # type: ignore[assignment]  # stop, length or stopped
        generation = self.generation
        first = self.first_token_at
        return self._last(
            self.format.completed(
                TurnResult(
                    content=content,
                    finish_reason=finish_reason,
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=generation.completion_tokens,
                    ttft_ms=None if first is None else self._ms_since_arrival(first),
                    total_ms=self._ms_since_arrival(time.perf_counter()),
                )
            )
        )

    async def _failed(self, outcome: Outcome, exc: Exception) -> bytes:
        """The engine or an encoder failed: store what was sent, end with an error event."""
        message = f"{type(exc).__name__}: {exc}"
        if outcome == "internal_error":
            log.error("stream_failed", error=message, exc_info=exc)
        await self._end_generation()
        ending = ENDINGS[outcome]
        failed = await self._store(ending.finish_reason or "error")
        self.outcome = outcome
        if failed is not None:
            message += f"; {failed[1]}"
        return self._error(ending.error_type or outcome, message)

    async def _store(
        self, finish_reason: FinishReason, content: str | None = None
    ) -> tuple[Outcome, str] | None:
        """Store the reply (the one time); the failure, if it failed."""
        if self._stored:
            return None
        self._stored = True
        self.slot.phase = STORING
        try:
            await self.reply.store("".join(self.parts) if content is None else content, finish_reason)
        except StorageUnavailable as exc:
            self.log_fields["store_error"] = exc.message
            later = f"it will be if the store answers again within {self.reply.repair_window:g} s"
            return "storage_error", f"the reply is not stored: {exc.message}; {later}"
        except TurnLost as exc:
            return "turn_lost", str(exc)
        return None

    async def _end_generation(self) -> None:
        """Stop the engine early, bounded by its idle deadline (an engine step like any other)."""
        generation = self.generation
        if self._generated:
            return
        self._generated = True
        try:
            async with asyncio.timeout(self.lifecycle.deadlines.token_gap):
                await generation.aclose()
        except Exception as exc:
            log.warning("engine_close_failed", error=f"{type(exc).__name__}: {exc}")

    def _stop_message(self, reason: Outcome) -> str:
        deadlines = self.lifecycle.deadlines
        if reason == "timeout":
            return f"no complete reply within {deadlines.reply:g} s (CHATSSE_REQUEST_TIMEOUT)"
        if reason == "engine_timeout":
            if self.first_token_at is None:
                return f"the engine sent no first token within {deadlines.first_token:g} s"
            return f"the engine sent no token for {deadlines.token_gap:g} s"
        if reason == "shutdown":
            return "the server is shutting down; send the message again"
        return ENDINGS[reason].meaning

    def _error(self, error_type: str, message: str) -> bytes:
        self.log_fields["error"] = error_type
        return self._last(self.format.error(error_type, message))

    def _end_recording(self) -> None:
        """A recorded stream that sent no last event (its client went away) ends its log with
        one, for a client that resumes it."""
        recording, plan = self.recording, self._plan
        if recording is None or plan is None or recording.final is not None:
            return
        meaning = ENDINGS[self.outcome or "client_disconnected"].meaning
        plan.recorder.finish(recording, self.format.error(INTERRUPTED, meaning).decode())

    def _last(self, event: bytes) -> bytes:
        self.final_event = True
        if self.recording is not None and self._plan is not None:
            self._plan.recorder.finish(self.recording, event.decode())
        return event

    def _record(self) -> None:
        outcome = self.outcome or "client_disconnected"
        tokens = len(self.parts)
        sent_last = self.final_event and not self.slot.disconnected
        events = int(self.opened) + tokens + int(sent_last)
        first = self.first_token_at
        self.metrics.record_stream(outcome, events, tokens, None if first is None else first - self.arrived)
        fields = self.log_fields
        if self.reply.conversation_id is not None:
            fields["conversation_id"] = self.reply.conversation_id
        fields["outcome"] = outcome
        fields["tokens"] = tokens
        fields["events"] = events
        if first is not None:
            fields["ttft_ms"] = self._ms_since_arrival(first)

"""An engine that looks something up before it answers (a tool call, a database query), three
ways: with a blocking call on the event loop, with an async call, or with the blocking call
moved to a thread. It shows why ``Engine.generate`` and every step of a generation must never
block: a worker's streams all share one event loop, and a blocking call stops every one of them.

::

    engine = LookupEngine(SimulatedEngine.from_settings(settings), seconds=0.5, how="time.sleep")
    server = InProcessServer(create_app(settings, engine=engine)).start()

A reply to a message containing ``trigger`` waits ``seconds`` before its first token; other
replies are the wrapped engine's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, get_args

from chatsse.engine import DEFAULT_OPTIONS, CompletionReason, Engine, Generation, GenerationOptions
from chatsse.models import Message

__all__ = ["LOOKUPS", "Lookup", "LookupEngine"]

Lookup = Literal["time.sleep", "asyncio.sleep", "to_thread"]
LOOKUPS: Final[tuple[Lookup, ...]] = get_args(Lookup)


async def _blocking(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251 -- the mistake this module exists to show


async def _thread(seconds: float) -> None:
    await asyncio.to_thread(time.sleep, seconds)


_HOW: Final[dict[str, Callable[[float], Awaitable[None]]]] = {
    "time.sleep": _blocking,
    "asyncio.sleep": asyncio.sleep,
    "to_thread": _thread,
}


class _LookupFirst:
    """A generation whose first step waits for the lookup."""

    def __init__(self, inner: Generation, lookup: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._lookup: Callable[[], Awaitable[None]] | None = lookup

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    @property
    def finish_reason(self) -> CompletionReason | None:
        return self._inner.finish_reason

    async def start(self) -> None:
        await self._inner.start()

    def __aiter__(self) -> _LookupFirst:
        return self

    async def __anext__(self) -> Sequence[str]:
        if self._lookup is not None:
            lookup, self._lookup = self._lookup, None
            await lookup()
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        await self._inner.aclose()


class LookupEngine:
    """``inner``'s replies; one to a message containing ``trigger`` first looks something up
    for ``seconds``, ``how``: ``"time.sleep"`` (blocking the event loop: every stream of the
    worker stops), ``"asyncio.sleep"`` (an async call) or ``"to_thread"`` (the blocking call
    in a thread; both: only this reply waits)."""

    def __init__(self, inner: Engine, *, seconds: float, how: Lookup, trigger: str = "look up") -> None:
        if how not in _HOW:
            raise ValueError(f"how must be one of {LOOKUPS}, got {how!r}")
        if not seconds >= 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        self.inner = inner
        self.name = inner.name
        self.seconds = seconds
        self.how = how
        self.trigger = trigger.lower()

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> Generation:
        generation = self.inner.generate(messages, max_tokens=max_tokens, options=options)
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        if self.trigger not in last.lower():
            return generation
        how, seconds = _HOW[self.how], self.seconds
        return _LookupFirst(generation, lambda: how(seconds))

    async def aclose(self) -> None:
        await self.inner.aclose()

"""Shared helpers for the tests: a real-socket SSE chat client and test engines."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

from chatsse.engine import (
    DEFAULT_OPTIONS,
    CompletionReason,
    GenerationOptions,
    SimulatedEngine,
    SimulatedGeneration,
    StopSequences,
)
from chatsse.models import Message


@dataclass
class ChatResult:
    status: int
    headers: httpx.Headers
    events: list[ServerSentEvent] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    def named(self, name: str) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event == name]

    def data(self, name: str) -> dict[str, Any]:
        (event,) = self.named(name)
        payload: dict[str, Any] = json.loads(event.data)
        return payload

    @property
    def deltas(self) -> list[str]:
        return [json.loads(e.data)["delta"] for e in self.named("message")]

    @property
    def conversation_id(self) -> str:
        return str(self.data("connected")["conversation_id"])


def chat(client: httpx.Client, message: str, conversation_id: str | None = None, **extra: Any) -> ChatResult:
    """POST /chat and read the whole stream with httpx-sse (an independent parser)."""
    body = {"message": message, "conversation_id": conversation_id, **extra}
    with connect_sse(client, "POST", "/chat", json=body) as source:
        result = ChatResult(source.response.status_code, source.response.headers)
        if source.response.status_code != 200:
            source.response.read()
            return result
        for event in source.iter_sse():
            result.events.append(event)
            result.arrivals.append(time.perf_counter())
    return result


class RecordingEngine(SimulatedEngine):
    """The simulated engine, remembering every prompt it was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list[list[Message]] = []
        self.options: list[GenerationOptions] = []

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> SimulatedGeneration | StopSequences:
        self.prompts.append(list(messages))
        self.options.append(options)
        return super().generate(messages, max_tokens=max_tokens, options=options)


class EngineFailure(RuntimeError):
    pass


class FailingGeneration:
    """Yields ``good_tokens`` tokens, then raises, like a backend dying mid-reply."""

    def __init__(self, good_tokens: int) -> None:
        self.tokens = [f" t{i}" for i in range(good_tokens)]
        self.prompt_tokens = 1
        self.completion_tokens = 0
        self.finish_reason: CompletionReason | None = None

    async def start(self) -> None:
        return None

    def __aiter__(self) -> FailingGeneration:
        return self

    async def __anext__(self) -> list[str]:
        if self.completion_tokens >= len(self.tokens):
            raise EngineFailure("backend went away")
        self.completion_tokens += 1
        return [self.tokens[self.completion_tokens - 1]]

    async def aclose(self) -> None:
        return None


class FailingEngine:
    name = "failing"

    def __init__(self, good_tokens: int = 3) -> None:
        self.good_tokens = good_tokens

    def generate(
        self, messages: Sequence[Message], *, max_tokens: int, options: GenerationOptions = DEFAULT_OPTIONS
    ) -> FailingGeneration:
        return FailingGeneration(self.good_tokens)

    async def aclose(self) -> None:
        return None


class FakeClock:
    """A clock that moves only when told: ``clock.advance(seconds)``."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text exposition (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def require_binary(name: str, install: str) -> str:
    """The path of a program a test needs. Without it the test skips, naming the program,
    except under ``CHATSSE_REQUIRE_BINARIES=1`` (CI), where a missing program fails."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed ({install})"
        if os.environ.get("CHATSSE_REQUIRE_BINARIES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
